"""SDPA against the eager form (`attention_ref`: two matmuls and a softmax) on a CPU, at ViT token counts.

    cd /tmp && python /work/main/bench/results/2026-12-07-cpu-short-attention/attention_cpu.py > attention_cpu.log

q, k, v are strided views of one [B, N, 3, H, D] projection (as msn_fast.vit.Attention makes them), B = 4096 // N
(a batch of about 4,096 tokens, like `cpu_photos`' 32 images of 17-65 tokens). With autograd: forward and backward
(the gradient reaches the projection); without: the forward alone. Each row is the median over 7 rounds of the
ratio eager time / SDPA time, 5 calls of each per round, the order alternating; and SDPA's ms a call in the last
round. Both thread counts a `cpu_photos` run can have: 2 (the batched loader in the training process) and 1.
"""

import statistics
import time

import torch
import torch.nn.functional as F

from msn_fast.kernels.attention import attention_ref


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def eager(q, k, v):
    return attention_ref(q, k, v)


def case(b, n, h, d, grad):
    x = torch.randn(b, n, 3 * h * d, requires_grad=grad)
    g = torch.randn(b, h, n, d)

    def once(fn):
        q, k, v = x.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        out = fn(q, k, v)
        if grad:
            out.backward(g)
    return once


def main() -> None:
    print(f"torch {torch.__version__}")
    for threads in (2, 1):
        torch.set_num_threads(threads)
        for h, d in ((4, 32), (6, 64)):
            for n in (17, 33, 45, 65, 97, 129, 197):
                b = 4096 // n
                for grad in (True, False):
                    with torch.set_grad_enabled(grad):
                        once = case(b, n, h, d, grad)
                        for fn in (sdpa, eager, sdpa, eager):
                            once(fn)
                        ratios = []
                        for r in range(7):
                            t = {}
                            for fn in ((sdpa, eager) if r % 2 else (eager, sdpa)):
                                t0 = time.perf_counter()
                                for _ in range(5):
                                    once(fn)
                                t[fn.__name__] = time.perf_counter() - t0
                            ratios.append(t["eager"] / t["sdpa"])
                    print(f"{threads} thread(s)  H {h} D {d}  N {n:3d}  B {b:3d}  "
                          f"{'forward + backward' if grad else 'forward only      '}  eager / SDPA "
                          f"{statistics.median(ratios):.2f}  (SDPA {t['sdpa'] / 5 * 1e3:.2f} ms)", flush=True)


if __name__ == "__main__":
    main()
