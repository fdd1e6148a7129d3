"""In-process A/B of attention's q, k, v split: `qkv.unbind(0)` (commit 9d30344) against `qkv[0], qkv[1], qkv[2]`
(before), one cpu_demo model at batch 32 on both threads, random inputs, 8 interleaved rounds of 3 warm-up + 10
timed train_steps. Run from outside the repository root (so that the installed msn_fast.dataloading resolves):

    cd /tmp && python /work/main/bench/results/2026-12-06-cpu-loader-placement/unbind_ab.py

Printed on 2026-12-06, AMD EPYC (Zen 4, 2 cores), the README's figure of 3%:
    old median 165.3 ms [163, 164, 164, 181, 167, 166, 169, 165]
    new median 160.2 ms [158, 160, 164, 161, 160, 159, 160, 167]
    new/old 0.968663686423461
and again, later that day, as committed here: old 132.4 ms, new 128.1 ms, new/old 0.968.
"""

import statistics
import time
from types import SimpleNamespace

import torch

from msn_fast import vit
from msn_fast.build import build_model, build_optimizer
from msn_fast.distributed import DistInfo
from msn_fast.kernels.attention import attention
from msn_fast.recipes import get_recipe
from msn_fast.train import fitted_schedules, train_step


def old_forward(self, x):
    b, n, d = x.shape
    qkv = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    out = attention(qkv[0], qkv[1], qkv[2], backend=self.impl)
    return self.proj(out.transpose(1, 2).reshape(b, n, d))


def main() -> None:
    new_forward = vit.Attention.forward
    torch.manual_seed(0)
    cfg, dev = get_recipe("cpu_demo"), torch.device("cpu")
    model = build_model(cfg, dev, DistInfo())
    opt = build_optimizer(cfg, model, dev)
    sched = fitted_schedules(cfg, 10000, 1000, warn=False)
    batch = SimpleNamespace(globals=torch.randn(2, 32, 3, 32, 32), focals=torch.randn(4, 32, 3, 16, 16))
    res = {"old": [], "new": []}
    order = [("old", old_forward), ("new", new_forward)]
    for r in range(8):
        for name, forward in order if r % 2 == 0 else order[::-1]:
            vit.Attention.forward = forward
            for i in range(3):
                train_step(model, batch, opt, sched, i, cfg)
            t = time.perf_counter()
            for i in range(10):
                train_step(model, batch, opt, sched, i, cfg)
            res[name].append((time.perf_counter() - t) / 10 * 1e3)
    for k, v in res.items():
        print(k, f"median {statistics.median(v):.1f} ms", [round(x) for x in v])
    print("new/old", statistics.median(res["new"]) / statistics.median(res["old"]))


if __name__ == "__main__":
    main()
