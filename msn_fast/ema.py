"""EMA of the target encoder: θ̄ ← m·θ̄ + (1 − m)·θ on parameters only (BN buffers are not averaged,
as in the official code). One foreach lerp over all tensors; works on FSDP2 local shards too."""

from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def ema_update(target: nn.Module, student: nn.Module, momentum: float, skip: torch.Tensor | None = None) -> None:
    """skip: None, or a 0-dim bool tensor on the parameters' device; where True the target is left exactly as it
    is (a skipped step), decided on the device without a host sync (weight 0: t + 0·(s − t) = t)."""
    t_params = [p for p in target.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError("ema_update: target and student have different parameter lists")
    if skip is None:
        torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
        return
    weight = (~skip).to(torch.float32) * (1.0 - momentum)
    torch._foreach_lerp_(t_params, s_params, [weight] * len(t_params))
