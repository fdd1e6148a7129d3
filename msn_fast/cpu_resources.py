"""What a CPU run may use: cores (affinity capped by a cgroup v2 quota), training threads, and a batch that fits.

Only the trainer's CPU path asks these questions (train.py: after the model is built, before the loader), and
they change for one reason: how a machine or container hands out cores and memory. The memory rule is a rough
estimate from the config and the parameter count, not a measurement.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from .config import Config
from .flops import tokens_per_image
from .vit import num_params

log = logging.getLogger("msn_fast.train")  # the trainer's lines (the format does not show the name)


def fit_batch_to_cpu_memory(cfg: Config, model: torch.nn.Module) -> None:
    """On a CPU, lower cfg.data.batch_size if a rough estimate of the step's memory exceeds 70% of the RAM."""
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
    with 1 worker, 100 steps of the CPU demo recipe took 39 s with 1 thread and 47 s with 2. Returns None
    (leave torch's default) when the user set OMP_NUM_THREADS.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    per_process = usable_cores(cpu_max) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, per_process - num_workers)
