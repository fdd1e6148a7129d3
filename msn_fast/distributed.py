"""Process groups and FSDP2 sharding for the trainer (torchrun, single node to many; one process works too).

torchtitan's pattern: `fully_shard` every transformer block, then the root, with
MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32). The EMA target is sharded the same way,
so its EMA update is a local foreach over matching shards; it reshards after its no-grad forward
(its root would otherwise keep unsharded params, since no backward reshards them). Prototypes stay
a replicated fp32 parameter whose gradient is averaged here. BatchNorm statistics in the head (and the
conv stem) are computed over the global batch by `SyncBatchNorm1d` (`2d`), which also works on CPU/gloo.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the torchrun process group if WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU); else single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank)


def init_single_process_group(device: torch.device) -> None:
    """FSDP2 needs a process group; a one-process run (e.g. bf16 on one GPU) gets a private one."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)


def world_size(group=None) -> int:
    """Processes in `group` (default: all), 1 without an initialised process group."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _sync_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """The forward of SyncBatchNorm1d / 2d: statistics per channel (dim 1) over every other dim and, when
    training with several processes, over every process's batch; fp32 statistics for bf16 inputs."""
    if not (bn.training and world_size() > 1):  # one process (or eval): plain BN, in fp32 for bf16 inputs
        w, b = (bn.weight.float(), bn.bias.float()) if bn.affine else (None, None)
        use_batch = bn.training or bn.running_mean is None
        if bn.training and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
        mom = bn.momentum if bn.momentum is not None else 0.1
        return F.batch_norm(x.float(), bn.running_mean, bn.running_var, w, b, use_batch, mom, bn.eps).to(x.dtype)
    from torch.distributed.nn.functional import all_reduce

    xf = x.float()
    dims, shape = [0, *range(2, x.dim())], (1, -1) + (1,) * (x.dim() - 2)  # per channel; broadcast over the rest
    c = x.shape[1]
    stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), xf.new_full((1,), x.numel() // c)])
    stats = all_reduce(stats)
    n = stats[-1]
    mean, sq = stats[:c] / n, stats[c:2 * c] / n
    var = (sq - mean * mean).clamp_min(0)
    with torch.no_grad():
        m = bn.momentum if bn.momentum is not None else 0.1
        bn.running_mean.lerp_(mean.detach().to(bn.running_mean.dtype), m)
        bn.running_var.lerp_((var.detach() * n / (n - 1).clamp_min(1)).to(bn.running_var.dtype), m)
        bn.num_batches_tracked += 1
    y = (xf - mean.view(shape)) * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        y = y * bn.weight.float().view(shape) + bn.bias.float().view(shape)
    return y.to(x.dtype)


class SyncBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the batch of every process (SyncBatchNorm semantics).

    Sums and sums of squares are all-reduced with a differentiable all-reduce, so gradients account for
    the other processes' rows as torch's SyncBatchNorm does; unlike it, this runs on CPU/gloo too, and it
    takes bf16 inputs with fp32 statistics (FSDP's bf16 policy casts parameters, not BN buffers).
    x: [B, C] -> [B, C]; statistics in fp32.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _sync_batch_norm(self, x)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """SyncBatchNorm1d for feature maps (the conv stem's): x [B, C, H, W] -> [B, C, H, W], statistics per channel
    over batch, height and width of every process, in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _sync_batch_norm(self, x)


_SYNC = {nn.BatchNorm1d: SyncBatchNorm1d, nn.BatchNorm2d: SyncBatchNorm2d}


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d / 2d in `module` by SyncBatchNorm1d / 2d, keeping parameters and buffers."""
    for name, child in module.named_children():
        if type(child) in _SYNC:
            new = _SYNC[type(child)](child.num_features, child.eps, child.momentum, child.affine,
                                     child.track_running_stats, device=child.weight.device, dtype=child.weight.dtype)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert_sync_batchnorm(child)
    return module


def shard_encoder(encoder: nn.Module, param_dtype: torch.dtype | None, reshard_root: bool) -> None:
    """fully_shard each ViT block, then the whole encoder (trunk + head), with bf16 compute if asked."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in encoder.trunk.blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(encoder, mp_policy=mp, reshard_after_forward=reshard_root)


def average_replicated_grads(params: Iterable[nn.Parameter]) -> None:
    """Average over processes the gradients of the parameters that every process holds whole: the prototypes
    always, and the whole student when it is not sharded (dist.fsdp off: replicated data parallelism, as DDP
    but after the backward). FSDP2's shards (DTensor) are skipped: FSDP has reduced their gradients. One
    all-reduce of the gradients laid end to end; parameters without a gradient are left as they are (every
    process runs the same graph, so they agree on which those are).

    Fidelity note: the official code all-reduces the prototype gradient as a *sum* (AllReduceSum), so
    its gradient is world_size times ours. Under AdamW the update m/(sqrt(v)+eps) is invariant to a
    constant gradient scale except through eps (1e-8), so the two are nearly equivalent; the mean
    matches the encoder's averaging and keeps the gradient independent of the process count.
    """
    world = world_size()
    if world == 1:
        return
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None and not isinstance(p.grad, DTensor)]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


__all__ = ["DistInfo", "init_distributed", "init_single_process_group", "world_size", "SyncBatchNorm1d",
           "SyncBatchNorm2d", "convert_sync_batchnorm", "shard_encoder", "average_replicated_grads"]
