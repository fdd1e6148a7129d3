"""FLOPs of one training step per image, and the peaks of common GPUs: the two halves of MFU.

The closed form counts the ViT blocks' matmuls from the config alone (no model, no device), so the trainer's
log line (metrics.StepLogger), `python -m msn_fast.check` (its rooflines and step MFU) and the benchmarks use
one count; tests/test_flops.py checks it against torch's FlopCounterMode. The peak table names the GPU by a
substring of its device name.
"""

from __future__ import annotations

import torch

from .config import Config
from .masking import num_kept

# Dense bf16 peak (FLOP/s; torchtitan's table) and memory bandwidth (B/s; vendor datasheets, SXM parts) of
# common GPUs, for MFU and the kernel rooflines of `python -m msn_fast.check`.
GPU_PEAKS: dict[str, tuple[float, float]] = {
    "H200": (989e12, 4.8e12),
    "H100": (989e12, 3.35e12),
    "A100": (312e12, 2.0e12),
    "B200": (2.25e15, 8.0e12),
    "L40S": (362e12, 0.864e12),
    "A10": (125e12, 0.6e12),
}


def tokens_per_image(cfg: Config) -> tuple[int, int, int]:
    """(all target, all masked anchor, all focal) tokens per image, CLS included; an anchor keeps
    masking.num_kept; views_per_image gives the views they are spread over."""
    v, d = cfg.vit, cfg.data
    n = (d.global_size // v.patch_size) ** 2
    g, _, f = views_per_image(cfg)
    return g * (1 + n), g * (1 + num_kept(n, cfg.mask.ratio)), f * (1 + (d.focal_size // v.patch_size) ** 2)


def views_per_image(cfg: Config) -> tuple[int, int, int]:
    """(target, anchor, focal) views per image: 1, 1 and data.num_focal; 2, 2 and data.num_focal with
    loss.symmetric."""
    g = 2 if cfg.loss.symmetric else 1
    return g, g, cfg.data.num_focal


def step_flops_per_image(cfg: Config) -> float:
    """Closed-form FLOPs of one training step per image: target forward + student forward and backward (3x).

    Per block and token: 2·(4 + 2·mlp_ratio)·D² for the linears, 4·n·D for attention over n tokens. The last
    block computes only the CLS row (vit.Block's cls_only): k and v of every token (2·D² each, 4·D² together), then q,
    the projection and the MLP of one token and its attention over n keys. Patch embedding (or the conv stem:
    7% of a cpu_photos step), head and loss are excluded.
    """
    v = cfg.vit
    linear = 2 * (4 + 2 * v.mlp_ratio) * v.dim**2

    def fwd(n_tokens: int, views: int) -> float:
        n = n_tokens // views  # tokens of one view
        last = views * (2 * 2 * n * v.dim**2 + 2 * (2 + 2 * v.mlp_ratio) * v.dim**2 + 4 * n * v.dim)
        return (v.depth - 1) * n_tokens * (linear + 4 * n * v.dim) + last

    (t, a, f), (vt, va, vf) = tokens_per_image(cfg), views_per_image(cfg)
    return fwd(t, vt) + 3 * (fwd(a, va) + (fwd(f, vf) if f else 0.0))


def linear_gemms(cfg: Config, batch: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of every matmul of the ViT blocks' linear layers in one training step of `batch` images.

    Target forward: x [m, k] @ Wᵀ per linear; student (anchor and focal views): that forward and its two
    backward matmuls, grad-input [m, n] @ W [n, k] and grad-weight xᵀ [k, m] @ grad [m, n]. m is batch x tokens of
    the view group; (k, n) are (D, 3D), (D, D), (D, mlp·D), (mlp·D, D) in each of the first depth - 1 blocks.
    The last block computes the CLS rows alone: (D, 2D) (k and v) over every token, then (D, D) (q), (D, D),
    (D, mlp·D), (mlp·D, D) over m = batch x views rows. Their 2·m·k·n add up to the linear part of
    step_flops_per_image x batch: the GEMM shapes a CPU step is made of, for a ceiling measured at the step's
    own sizes (bench/test_cpu_training.py).
    """
    v = cfg.vit
    d, hidden = v.dim, int(v.mlp_ratio * v.dim)
    layers = [(d, 3 * d), (d, d), (d, hidden), (hidden, d)]
    out = []
    for tokens, views, trained in zip(tokens_per_image(cfg), views_per_image(cfg), (False, True, True)):
        m, rows = batch * tokens, batch * views
        if not m:  # no focal views
            continue
        last = [(m, d, 2 * d), (rows, d, d)] + [(rows, k, n) for k, n in layers[1:]]
        for mm, k, n in [(m, k, n) for k, n in layers] * (v.depth - 1) + last:
            out.append((mm, k, n))
            if trained:
                out += [(mm, n, k), (k, mm, n)]
    return out


def gpu_peaks(name: str) -> tuple[float, float] | None:
    """(dense bf16 FLOP/s, bytes/s) of the GPU whose device name ("NVIDIA H200") holds a GPU_PEAKS key, or None.
    Longer keys are tried first, so an "A100" is never taken for an "A10"."""
    key = next((k for k in sorted(GPU_PEAKS, key=len, reverse=True) if k in name), None)
    return None if key is None else GPU_PEAKS[key]


def gpu_peak_flops(device: torch.device) -> float | None:
    """Dense bf16 FLOP/s of `device`, or None off CUDA or for a GPU the table does not know (no MFU then)."""
    if device.type != "cuda":
        return None
    peaks = gpu_peaks(torch.cuda.get_device_name(device))
    return None if peaks is None else peaks[0]
