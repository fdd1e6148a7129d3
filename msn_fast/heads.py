"""Projection head and prototypes, as in the official MSN code (msn_spec.md, section 2).

Head: Linear(D, 2048) -> BN -> GELU -> Linear(2048, 2048) -> BN -> GELU -> Linear(2048, 256), with
biases. It is part of the encoder, so the EMA target has its own copy. Under torch.distributed the
BatchNorms can be converted to SyncBatchNorm (`nn.SyncBatchNorm.convert_sync_batchnorm`).
Prototypes: K = 1024 learned vectors of size 256, Uniform(±1/√256) init, fp32, no weight decay.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class ProjectionHead(nn.Module):
    """[B, D] -> [B, out_dim]. `hidden_layers` hidden Linear+BN+GELU stages (official: 2)."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 256, use_bn: bool = True,
                 hidden_layers: int = 2, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * hidden_layers
        for a, b in zip(dims[:-1], dims[1:]):
            layers.append(nn.Linear(a, b, **dd))
            if use_bn:
                layers.append(nn.BatchNorm1d(b, **dd))
            layers.append(nn.GELU())
        layers.append(nn.Linear(dims[-1], out_dim, **dd))
        self.mlp = nn.Sequential(*layers)
        if device is None or torch.device(device).type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm1d):
                m.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class Encoder(nn.Module):
    """ViT trunk + projection head: images -> [B, out_dim]. The EMA target is a copy of this."""

    def __init__(self, trunk: nn.Module, head: nn.Module):
        super().__init__()
        self.trunk, self.head = trunk, head

    def forward(self, x: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.trunk(x, keep_idx))


def init_prototypes(num: int, dim: int, device=None) -> nn.Parameter:
    """[K, d] fp32 prototypes, Uniform(−1/√d, 1/√d) like the official code."""
    bound = 1.0 / math.sqrt(dim)
    return nn.Parameter(torch.empty(num, dim, device=device, dtype=torch.float32).uniform_(-bound, bound))
