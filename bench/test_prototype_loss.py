"""MSN prototype loss benchmarks: msn_fast.loss.msn_loss on the fused Triton op vs the eager reference, fwd + bwd.

Shapes: the ViT-S/16 recipe (per-GPU batch 64 x 11 views = 704 anchor rows, 64 targets, K = 1024
prototypes, d = 256) and L/7 (batch 128 x 11 = 1408 rows), Sinkhorn off and on (3 iterations, the
released config). Anchors and targets bf16 (the head's output under autocast), prototypes fp32.
Memory of intermediates: bytes saved for backward (saved_tensors_hooks, inputs excluded) and, on a
GPU, the peak allocated above the inputs during fwd+bwd (gradients included). On a CPU only the eager
path is timed; the fused cases skip and say so.

    pytest bench/test_prototype_loss.py --benchmark-only --benchmark-json=bench/results/prototype_loss_<gpu>.json
"""

import pytest
import torch

from bench.timing import HAS_CUDA, sync
from msn_fast.loss import msn_loss, msn_loss_ref

DEVICE = "cuda" if HAS_CUDA else "cpu"
VIEWS, K, DIM = 11, 1024, 256
BATCH = {"vit_s16": 64, "vit_l7": 128}  # per GPU
PROVIDERS = {"eager": msn_loss_ref, "fused": lambda *a, **kw: msn_loss(*a, **kw, backend="triton")}


def _inputs(batch):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    target = torch.randn(batch, DIM, device=DEVICE, generator=g)
    anchor = target.repeat(VIEWS, 1) + 0.8 * torch.randn(VIEWS * batch, DIM, device=DEVICE, generator=g)
    protos = torch.rand(K, DIM, device=DEVICE, generator=g) * 0.125 - 0.0625
    return anchor.bfloat16().requires_grad_(), target.bfloat16(), protos.requires_grad_()


def _fwd_bwd(fn, anchor, target, protos, sinkhorn_iters):
    loss, _ = fn(anchor, target, protos, num_views=VIEWS, sinkhorn_iters=sinkhorn_iters)
    return (loss.detach(), *torch.autograd.grad(loss, (anchor, protos)))


def _saved_bytes(fn, anchor, target, protos, sinkhorn_iters):
    """Bytes autograd keeps for backward, the inputs themselves excluded (each storage counted once)."""
    seen = {anchor.untyped_storage().data_ptr(), protos.untyped_storage().data_ptr()}
    total = 0

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = fn(anchor, target, protos, num_views=VIEWS, sinkhorn_iters=sinkhorn_iters)
    del loss
    return total


def _check_once(fn, anchor, target, protos, sinkhorn_iters):
    """Loss and both gradients against the eager objective computed in float64."""
    got = _fwd_bwd(fn, anchor, target, protos, sinkhorn_iters)
    leaves = [t.detach().double().requires_grad_() for t in (anchor, protos)]
    ref = _fwd_bwd(msn_loss_ref, leaves[0], target.double(), leaves[1], sinkhorn_iters)
    for name, g, r, tol in zip(("loss", "d_anchor", "d_prototypes"), got, ref, (1e-4, 2e-2, 1e-3)):
        err = ((g.double() - r).abs().max() / r.abs().max()).item()
        assert err <= tol, f"{name}: relative max error {err:.2e}"


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("sinkhorn_iters", [0, 3])
@pytest.mark.parametrize("model", list(BATCH))
def test_prototype_loss_fwd_bwd(benchmark, model, sinkhorn_iters, provider):
    if provider == "fused" and not HAS_CUDA:
        pytest.skip("fused Triton loss not timed: no GPU on this machine (the CPU bench times the eager path only)")
    fn = PROVIDERS[provider]
    anchor, target, protos = _inputs(BATCH[model])
    _check_once(fn, anchor, target, protos, sinkhorn_iters)

    benchmark.group = "prototype_loss-fwd_bwd"
    rounds, iterations = (50, 10) if HAS_CUDA else (5, 1)
    benchmark.pedantic(lambda: (_fwd_bwd(fn, anchor, target, protos, sinkhorn_iters), sync()),
                       rounds=rounds, iterations=iterations, warmup_rounds=2)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        model=model, rows=VIEWS * BATCH[model], targets=BATCH[model], K=K, d=DIM, sinkhorn_iters=sinkhorn_iters,
        dtype="bf16 embeddings, fp32 prototypes", provider=provider, median_ms=round(median * 1e3, 4),
        saved_for_backward_bytes=_saved_bytes(fn, anchor, target, protos, sinkhorn_iters),
        rows_by_k_fp32_bytes=VIEWS * BATCH[model] * K * 4,
        device=torch.cuda.get_device_name() if HAS_CUDA else "cpu", torch=torch.__version__,
    )  # fmt: skip
    if HAS_CUDA:
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _fwd_bwd(fn, anchor, target, protos, sinkhorn_iters)
        sync()
        benchmark.extra_info["peak_intermediate_bytes"] = torch.cuda.max_memory_allocated() - base
    else:
        benchmark.extra_info["note"] = "CPU: only the eager torch path timed; the fused Triton kernels need a GPU"
    if provider == "fused":
        import triton
        import triton.testing

        def run(f):
            return lambda: _fwd_bwd(f, anchor, target, protos, sinkhorn_iters)

        ms_eager = triton.testing.do_bench(run(msn_loss_ref), warmup=25, rep=200)
        ms_fused = triton.testing.do_bench(run(fn), warmup=25, rep=200)
        benchmark.extra_info.update(triton=triton.__version__, eager_ms=round(ms_eager, 4),
                                    speedup_vs_eager=round(ms_eager / ms_fused, 3))
