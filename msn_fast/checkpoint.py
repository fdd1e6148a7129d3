"""Checkpoints that resume exactly: model (student, target, prototypes), optimizer, step, data position,
RNG states and the config. Written atomically (temp file + rename) and loaded with weights_only=True."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

LATEST = "checkpoint_latest.pt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or not an msn-fast checkpoint; the message names the file."""


def save_checkpoint(path: str | os.PathLike, *, model, optimizer, step: int, epoch: int, batch_in_epoch: int,
                    config: dict, extra: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": "msn-fast/1",
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "epoch": epoch,
        "batch_in_epoch": batch_in_epoch,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "config": config,
        "extra": extra or {},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: a crash mid-write leaves the previous checkpoint intact
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt?): {e}") from e
    if not isinstance(state, dict) or state.get("format") != "msn-fast/1":
        raise CheckpointError(f"{path} is not an msn-fast checkpoint")
    return state


def restore(state: dict, *, model, optimizer=None) -> None:
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
