"""What the trainer builds before its loop: the device, the (sharded) MSN model and its optimizer.

Kept apart from train.py so the trainer reads top to bottom, and beside distributed.py, whose sharding it
applies. Wrapping order follows torchtitan: activation checkpointing -> per-block torch.compile -> FSDP2
(per block, then root). Used as is by `python -m msn_fast.check` and the benchmarks, so they time the
trainer's own model.
"""

from __future__ import annotations

import torch

from .cli import UsageError
from .config import Config
from .distributed import DistInfo, convert_sync_batchnorm, init_single_process_group, shard_encoder
from .model import MSN, param_groups


def resolve_device(name: str, info: DistInfo) -> torch.device:
    """run.device -> a torch.device: auto is CUDA when available; a bare "cuda" is this process's local GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"run.device={name} but no CUDA device is available")
        if dev.index is None:
            dev = torch.device("cuda", info.local_rank)
    return dev


def param_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """The encoders' compute dtype: dist.param_dtype, where auto is bf16 on CUDA and fp32 elsewhere."""
    if cfg.dist.param_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if cfg.dist.param_dtype == "bf16" else torch.float32


def use_fsdp(cfg: Config, info: DistInfo, device: torch.device) -> bool:
    """dist.fsdp, where auto shards with several processes or bf16 (FSDP2's policy does the casting)."""
    if cfg.dist.fsdp == "auto":
        return info.world > 1 or param_dtype(cfg, device) != torch.float32
    return cfg.dist.fsdp == "on"


def build_model(cfg: Config, device: torch.device, info: DistInfo) -> MSN:
    """MSN on `device`, identical on every rank (same seed), then AC / compile / FSDP2 as configured."""
    model = MSN(cfg).to(device)
    if info.world > 1 or param_dtype(cfg, device) != torch.float32:
        convert_sync_batchnorm(model.student)
        convert_sync_batchnorm(model.target)
    for enc in (model.student, model.target):
        blocks = enc.trunk.blocks
        for i, blk in enumerate(blocks):
            if cfg.dist.activation_checkpointing and enc is model.student:
                from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

                blk = checkpoint_wrapper(blk, preserve_rng_state=False)
            if cfg.dist.compile:
                blk.compile()
            blocks[i] = blk
    if use_fsdp(cfg, info, device):
        if not torch.distributed.is_initialized():
            init_single_process_group(device)
        dtype = param_dtype(cfg, device)
        shard_encoder(model.student, dtype, reshard_root=False)
        shard_encoder(model.target, dtype, reshard_root=True)
    elif param_dtype(cfg, device) != torch.float32:
        raise UsageError("dist.param_dtype=bf16 needs FSDP (dist.fsdp auto or on)")
    return model


def build_optimizer(cfg: Config, model: MSN, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over model.param_groups (torch's fused one; apex FusedAdam with dist.optimizer=apex)."""
    groups = param_groups(model)
    o = cfg.optim
    if cfg.dist.optimizer == "apex":
        try:
            from apex.optimizers import FusedAdam
        except ImportError:
            raise UsageError("dist.optimizer=apex but apex is not installed (pip install the NVIDIA apex build)")
        if device.type != "cuda" or torch.distributed.is_initialized():
            raise UsageError("dist.optimizer=apex needs CUDA and no FSDP (apex cannot step DTensor shards)")
        return FusedAdam(groups, lr=o.start_lr, betas=o.betas, weight_decay=o.weight_decay, adam_w_mode=True)
    # Fused on every device: it can skip a non-finite step on the device (found_inf), with no host sync.
    return torch.optim.AdamW(groups, lr=o.start_lr, betas=o.betas, weight_decay=o.weight_decay, fused=True)
