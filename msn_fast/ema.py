"""EMA of the target encoder: θ̄ ← m·θ̄ + (1 − m)·θ on parameters only (BN buffers are not averaged,
as in the official code). One foreach lerp over all tensors; works on FSDP2 local shards too."""

from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def ema_update(target: nn.Module, student: nn.Module, momentum: float) -> None:
    t_params = [p for p in target.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError("ema_update: target and student have different parameter lists")
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
