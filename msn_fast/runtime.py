"""What the trainer builds before its loop: device, data sources, the (sharded) model, the optimizer, FLOPs.

Kept apart from train.py so the trainer reads top to bottom. Wrapping order follows torchtitan:
activation checkpointing -> per-block torch.compile -> FSDP2 (per block, then root).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from msn_fast.dataloading import Digits, ImageFolder

from .cli import UsageError
from .config import Config
from .distributed import DistInfo, convert_sync_batchnorm, shard_encoder
from .model import MSN, param_groups
from .vit import num_params

log = logging.getLogger("msn_fast.train")

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
PEAK_BF16 = {k: flops for k, (flops, _) in GPU_PEAKS.items()}


def resolve_device(name: str, info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"run.device={name} but no CUDA device is available")
        if dev.index is None:
            dev = torch.device("cuda", info.local_rank)
    return dev


def build_sources(cfg: Config):
    """(pre-training source, low-shot train source or None, low-shot held-out source or None).

    A DIR with the splits of `python -m msn_fast.eval` (train/ + val/ or test/ class folders, or train.txt +
    val.txt or test.txt lists; val before test unless data.eval_split says; BACKGROUND_Google left out) pre-trains
    on its train split and scores the end-of-run low-shot evaluation on the held-out one; any other DIR pre-trains
    on all its images; a tar or brace pattern of tars pre-trains on WebDataset shards (no evaluation).
    """
    from msn_fast.dataloading import DataError
    from msn_fast.dataloading.shards import is_shard_pattern, open_shards
    from msn_fast.dataloading.sources import find_splits, split_layout

    if cfg.data.path is None:
        size = cfg.data.global_size
        train, test = Digits("train", size), Digits("test", size)
        log.info("data: the embedded digits; pre-training on train (%d images), low-shot evaluation on test "
                 "(%d images)", len(train), len(test))
        return train, Digits("train", size), test
    if is_shard_pattern(cfg.data.path):
        shards = open_shards(cfg.data.path)
        log.info("data: %d WebDataset shard(s) %s (%d samples); no low-shot evaluation (shards hold no held-out "
                 "split: score the run with python -m msn_fast.eval on an image folder)", len(shards.urls),
                 shards.pattern, len(shards))
        return shards, None, None
    root = Path(cfg.data.path)
    layout = split_layout(root, cfg.data.eval_split) if root.is_dir() else None
    if layout is None:
        return ImageFolder(root), None, None
    try:
        splits = find_splits(root, eval_split=cfg.data.eval_split)
    except DataError as e:
        if layout[0] == "lists":
            raise
        train = ImageFolder(root / "train")
        log.warning("data: pre-training on %s (%d images); no low-shot evaluation: %s", train.root, len(train), e)
        return train, None, None
    log.info("data: %s; pre-training on train (%d images), low-shot evaluation on %s (%d images)", splits.layout,
             len(splits.train), splits.held_out_name, len(splits.held_out))
    return splits.train, splits.train, splits.held_out


def tokens_per_image(cfg: Config) -> tuple[int, int, int]:
    """(target, masked anchor, all focal) tokens per image, CLS included."""
    v, d = cfg.vit, cfg.data
    n = (d.global_size // v.patch_size) ** 2
    anchor = 1 + (n if cfg.mask.ratio == 0 else max(1, math.floor(n * (1 - cfg.mask.ratio))))
    return 1 + n, anchor, d.num_focal * (1 + (d.focal_size // v.patch_size) ** 2)


def step_flops_per_image(cfg: Config) -> float:
    """Closed-form FLOPs of one training step per image: target forward + student forward and backward (3x).

    Per block and token: 2·(4 + 2·mlp_ratio)·D² for the linears, 4·n·D for attention over n tokens.
    Patch embedding, head and loss are excluded (a few % at most).
    """
    v = cfg.vit
    linear = 2 * (4 + 2 * v.mlp_ratio) * v.dim**2

    def fwd(n_tokens: int, per_view: int) -> float:
        return v.depth * n_tokens * (linear + 4 * per_view * v.dim)

    t, a, f = tokens_per_image(cfg)
    focal_len = f // max(1, cfg.data.num_focal)
    return fwd(t, t) + 3 * (fwd(a, a) + (fwd(f, focal_len) if f else 0.0))


def gpu_peaks(name: str) -> tuple[float, float] | None:
    """(dense bf16 FLOP/s, bytes/s) of the GPU whose device name ("NVIDIA H200") holds a GPU_PEAKS key, or None.
    Longer keys are tried first, so an "A100" is never taken for an "A10"."""
    key = next((k for k in sorted(GPU_PEAKS, key=len, reverse=True) if k in name), None)
    return None if key is None else GPU_PEAKS[key]


def gpu_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    peaks = gpu_peaks(torch.cuda.get_device_name(device))
    return None if peaks is None else peaks[0]


def fit_batch_to_cpu_memory(cfg: Config, model: MSN) -> None:
    """On a CPU, lower the batch if a rough estimate of the step's memory exceeds 70% of the RAM."""
    v, d = cfg.vit, cfg.data
    _, anchor, focal = tokens_per_image(cfg)
    per_image = (anchor + focal) * v.depth * 16 * v.dim * 4  # ~16 saved fp32 activations of width D per token/block
    fixed = num_params(model) * 4 * 4  # student, target, two AdamW moments
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    fits = int((0.7 * ram - fixed) // per_image)
    if fits < d.batch_size:
        new = max(2, fits)
        log.warning("batch %d needs ~%.1f GiB on this CPU (RAM %.1f GiB): using batch %d instead "
                    "(set --data.batch_size to choose)", d.batch_size,
                    (fixed + per_image * d.batch_size) / 2**30, ram / 2**30, new)
        d.batch_size = new


def usable_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a container's --cpus)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def cpu_training_threads(num_workers: int, cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """Intra-op threads for a CPU run: this process's share of the usable cores minus the loader workers (>= 1).

    torch's default (every core) makes its GEMM threads wait on cores the loader workers hold: on 2 cores
    with 1 worker, 100 vit_tiny steps took 39 s with 1 thread and 47 s with 2. Returns None (leave torch's
    default) when the user set OMP_NUM_THREADS.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    per_process = usable_cores(cpu_max) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, per_process - num_workers)


def param_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.dist.param_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if cfg.dist.param_dtype == "bf16" else torch.float32


def use_fsdp(cfg: Config, info: DistInfo, device: torch.device) -> bool:
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
            _init_single_process_group(device)
        dtype = param_dtype(cfg, device)
        shard_encoder(model.student, dtype, reshard_root=False)
        shard_encoder(model.target, dtype, reshard_root=True)
    elif param_dtype(cfg, device) != torch.float32:
        raise UsageError("dist.param_dtype=bf16 needs FSDP (dist.fsdp auto or on)")
    return model


def _init_single_process_group(device: torch.device) -> None:
    """FSDP2 needs a process group; a one-process run (e.g. bf16 on one GPU) gets a private one."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                         init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def build_optimizer(cfg: Config, model: MSN, device: torch.device) -> torch.optim.Optimizer:
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
