"""Attention benchmarks at MSN's ViT shapes: fwd, bwd and fwd+bwd for torch SDPA, Triton, xformers.

Shapes: ViT-S/16 (H=6) and B/16 (H=12) at N = 37 (96 px focal), 167 (224 px, 15% of patches
dropped), 197 (224 px); L/7 (H=16) at N = 170, 308, 1025; D = 64 throughout. q, k, v are views of
one packed [B, N, 3, H, D] projection, as in the ViT. On a GPU: bf16 with about 128k tokens per
batch; the Triton cases also record `speedup_vs_sdpa`. On a CPU only SDPA runs (fp32, B=2).

    pytest bench/test_attention.py --benchmark-only --benchmark-json=bench/results/attention_<gpu>.json
"""

import importlib.util

import pytest
import torch

from bench.timing import HAS_CUDA, sync
from msn_fast.kernels.attention import attention, attention_ref

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
GPU_TOKENS = 128 * 1024  # batch = GPU_TOKENS // N: a training step's worth of views on an H200
CPU_BATCH = 2
FLOPS_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}  # x 4·B·H·N²·D (Triton tutorial convention)
REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}

CASES = [
    (model, h, 64, n)
    for model, h, lengths in (
        ("vit_s16", 6, (37, 167, 197)),
        ("vit_b16", 12, (37, 167, 197)),
        ("vit_l7", 16, (170, 308, 1025)),
    )
    for n in lengths
]
PROVIDER_BACKEND = {"sdpa": "torch", "triton": "triton", "xformers": "xformers"}


def _inputs(B, H, N, D):
    qkv = torch.randn(B, N, 3, H, D, device=DEVICE, dtype=DTYPE, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D), non-contiguous
    return q, k, v, torch.randn(B, H, N, D, device=DEVICE, dtype=DTYPE)


def _check_once(backend, q, k, v, do, mode):
    """Output (and the grads, for the bwd modes) on the first two images against the fp32 reference."""
    out = attention(q, k, v, backend=backend)
    got = [out[:2]]
    if mode != "fwd":
        got += [g[:2] for g in torch.autograd.grad(out, (q, k, v), do)]
    leaves = [t[:2].detach().float().requires_grad_() for t in (q, k, v)]
    ref_out = attention_ref(*leaves)
    ref = [ref_out] + (list(torch.autograd.grad(ref_out, leaves, do[:2].float())) if mode != "fwd" else [])
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        err = (g.float() - r).abs().max().item() / r.abs().max().item()
        assert err <= REL_TOL[DTYPE], f"{backend} {mode} {name}: relative max error {err:.2e}"


def _target(backend, q, k, v, do, mode):
    if mode == "fwd":
        return lambda: (attention(q, k, v, backend=backend), sync())
    if mode == "bwd":
        out = attention(q, k, v, backend=backend)
        return lambda: (torch.autograd.grad(out, (q, k, v), do, retain_graph=True), sync())
    return lambda: (torch.autograd.grad(attention(q, k, v, backend=backend), (q, k, v), do), sync())


@pytest.mark.parametrize("provider", list(PROVIDER_BACKEND))
@pytest.mark.parametrize("mode", list(FLOPS_FACTOR))
@pytest.mark.parametrize("model,H,D,N", CASES)
def test_attention(benchmark, bench_report, model, H, D, N, mode, provider):
    if provider != "sdpa" and not HAS_CUDA:
        pytest.skip(f"{provider} not timed: no GPU on this machine (the CPU bench runs torch SDPA only)")
    if provider == "xformers" and importlib.util.find_spec("xformers") is None:
        pytest.skip("xformers is not installed")
    backend = PROVIDER_BACKEND[provider]
    B = GPU_TOKENS // N if HAS_CUDA else CPU_BATCH
    q, k, v, do = _inputs(B, H, N, D)
    _check_once(backend, q, k, v, do, mode)  # also runs the Triton autotuner for this shape

    target = _target(backend, q, k, v, do, mode)
    benchmark.group = f"attention-{mode}"
    rounds, iterations = (30, 5) if HAS_CUDA else (3, 1)
    benchmark.pedantic(target, rounds=rounds, iterations=iterations, warmup_rounds=2)

    flops = 4 * B * H * N * N * D * FLOPS_FACTOR[mode]
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        model=model, B=B, H=H, N=N, D=D, dtype=str(DTYPE).replace("torch.", ""), mode=mode, provider=provider,
        tflops=float(f"{flops / median / 1e12:.4g}"), median_ms=float(f"{median * 1e3:.4g}"),
        device=torch.cuda.get_device_name() if HAS_CUDA else "cpu", torch=torch.__version__,
    )  # fmt: skip
    if not HAS_CUDA:
        benchmark.extra_info["note"] = "CPU: only torch SDPA timed; Triton and xformers not timed (no GPU)"
    if provider == "triton":
        import triton
        import triton.testing

        sdpa = _target("torch", q, k, v, do, mode)
        ms_sdpa = triton.testing.do_bench(sdpa, warmup=25, rep=200)
        ms_triton = triton.testing.do_bench(target, warmup=25, rep=200)
        benchmark.extra_info.update(
            triton=triton.__version__, sdpa_ms=float(f"{ms_sdpa:.4g}"), speedup_vs_sdpa=round(ms_sdpa / ms_triton, 3)
        )
    info = benchmark.extra_info
    row = {k: info.get(k) for k in ("model", "B", "N", "mode", "provider", "median_ms", "tflops", "speedup_vs_sdpa")}
    bench_report.add_row(f"attention ({info['dtype']}, H per model, D={D})", row)
    if not HAS_CUDA:
        bench_report.add_note(f"attention ({info['dtype']}, H per model, D={D})", info["note"])
