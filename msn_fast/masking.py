"""Random token masking of the anchor view (MSN's "patch drop").

Official rule (deit.py): keep = floor(N·(1 − r)) patch tokens; CLS is always kept (it is not a
patch and is never sampled here). The official code draws ONE permutation per forward, shared by
every image of the local batch ("shared"); "per_sample" draws one per image (as timm/lightly do).
Indices are sampled on the device the encoder runs on, so nothing is shipped from the host.
"""

from __future__ import annotations

import math

import torch

MODES = ("shared", "per_sample")


def num_kept(num_patches: int, ratio: float) -> int:
    """floor(N·(1 − r)), at least 1. 196 -> 166 at r = 0.15; 1024 -> 307 at r = 0.7."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1); got {ratio}")
    # Same float expression as the official code, so the counts agree exactly.
    return max(1, math.floor(num_patches * (1.0 - ratio)))


def sample_keep_indices(
    batch: int, num_patches: int, ratio: float, mode: str = "shared", device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor | None:
    """Kept patch indices (in [0, N), int64), or None when ratio == 0 (keep everything).

    Returns [K] for mode "shared" and [B, K] for "per_sample"; the kept tokens stay in random order
    (harmless: the position embedding was added before the drop).
    """
    if mode not in MODES:
        raise ValueError(f"mask mode must be one of {MODES}; got {mode!r}")
    if ratio == 0:
        return None
    keep = num_kept(num_patches, ratio)
    if mode == "shared":
        return torch.randperm(num_patches, device=device, generator=generator)[:keep]
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    return noise.argsort(dim=1)[:, :keep]
