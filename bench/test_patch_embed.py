"""Benchmark: fused kept-patch embedding (Triton) vs the unfused torch path (conv2d + pos add + gather).

Anchor views of MSN: ViT-S/16 at 224 px with 15% of patches dropped (B=256) and ViT-L/7 at 224 px with
70% dropped (B=64), plus the same models unmasked (drop 0: the target views, where the caller may pick
either path). "GB/s" divides the compulsory traffic of the fused op (kept pixels + weight + pos rows
+ output) by the time, so it is comparable across providers. On a machine without CUDA only the torch path
runs, at a reduced batch, in fp32, and extra_info records that Triton was not timed.
Run: pytest bench/test_patch_embed.py --benchmark-only
"""

import pytest
import torch

from bench.timing import HAS_CUDA, sync
from msn_fast.kernels.patch_embed import embed_kept_patches, embed_kept_patches_ref

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
TRITON_NOTE = "timed" if HAS_CUDA else "not timed: no GPU on this machine (only the torch path ran, reduced batch)"

# name: (batch on GPU, batch on CPU, patch, embed dim D, fraction of patches dropped)
SHAPES = {
    "S16_224_r0.15": (256, 8, 16, 384, 0.15),
    "L7_224_r0.7": (64, 2, 7, 1024, 0.70),
    "S16_224_r0": (256, 8, 16, 384, 0.0),
    "L7_224_r0": (64, 2, 7, 1024, 0.0),
}


def _case(name: str, shared: bool):
    b_gpu, b_cpu, patch, d, drop = SHAPES[name]
    b, c, img = (b_gpu if HAS_CUDA else b_cpu), 3, 224
    n = (img // patch) ** 2
    k = int(n * (1 - drop))
    images = torch.randn(b, c, img, img, device=DEVICE, dtype=DTYPE)
    weight = (torch.randn(d, c, patch, patch, device=DEVICE) / (c * patch * patch) ** 0.5).to(DTYPE).requires_grad_()
    bias = torch.zeros(d, device=DEVICE, dtype=DTYPE).requires_grad_()
    pos = (0.02 * torch.randn(1, n, d, device=DEVICE)).requires_grad_()  # fp32 parameter, as in the ViT
    if shared:
        idx = torch.randperm(n, device=DEVICE)[:k].to(torch.int32)
    else:
        idx = torch.argsort(torch.rand(b, n, device=DEVICE), dim=1)[:, :k].to(torch.int32)
    return images, weight, bias, pos, idx


def _traffic(images, weight, pos, idx) -> tuple[int, int]:
    """(compulsory bytes of the fused op, estimated bytes of the unfused path), forward only."""
    b, c, h, w = images.shape
    d, patch = weight.shape[0], weight.shape[-1]
    n, k, es = (h // patch) * (w // patch), idx.shape[-1], images.element_size()
    common = weight.numel() * es + d * es
    fused = b * k * c * patch * patch * es + common + min(b * k, n) * d * pos.element_size() + b * k * d * es
    # conv reads the image and writes B*N*D; pos add reads it (+ the table) and writes it; gather reads/writes B*K*D
    unfused = b * c * h * w * es + common + 3 * b * n * d * es + n * d * pos.element_size() + 2 * b * k * d * es
    return fused, unfused


@pytest.mark.parametrize("provider", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared_idx", "per_sample_idx"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_patch_embed(benchmark, name, shared, mode, provider):
    benchmark.group = f"patch_embed-{mode}-{name}"
    if provider == "triton" and not HAS_CUDA:
        pytest.skip("no GPU: the Triton kernel is only timed on CUDA")
    images, weight, bias, pos, idx = _case(name, shared)
    if provider == "triton":

        def fwd():
            return embed_kept_patches(images, weight, bias, pos, idx, validate=False, backend="triton")
    else:

        def fwd():
            return embed_kept_patches_ref(images, weight, bias, pos, idx)

    # correctness once, before timing: against the unfused path computed in fp32
    y = fwd()
    y_ref = embed_kept_patches_ref(images.float(), weight.float(), bias.float(), pos, idx)
    err = (y.float() - y_ref).abs().max().item()
    assert err <= (0.05 if DTYPE == torch.bfloat16 else 1e-4) * max(1.0, y_ref.abs().max().item()), err
    grad_out = torch.randn_like(y)

    def target():
        out = fwd()
        if mode == "fwd_bwd":
            weight.grad = bias.grad = pos.grad = None
            out.backward(grad_out)
        sync()

    rounds = 20 if HAS_CUDA else 3
    with torch.set_grad_enabled(mode == "fwd_bwd"):
        benchmark.pedantic(target, rounds=rounds, warmup_rounds=3 if HAS_CUDA else 1)
    fused_bytes, unfused_bytes = _traffic(images, weight, pos, idx)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        shape=f"B={images.shape[0]} C=3 H=W=224 P={weight.shape[-1]} D={weight.shape[0]} K={idx.shape[-1]}",
        index_mode="shared" if shared else "per_sample",
        dtype=str(DTYPE).replace("torch.", ""),
        device=torch.cuda.get_device_name() if HAS_CUDA else "cpu",
        median_ms=median * 1e3,
        fwd_bytes_fused=fused_bytes,
        fwd_bytes_unfused_est=unfused_bytes,
        gbps_fwd_compulsory=fused_bytes / median / 1e9 if mode == "fwd" else None,
        triton=TRITON_NOTE,
        max_abs_err_vs_fp32=err,
    )
