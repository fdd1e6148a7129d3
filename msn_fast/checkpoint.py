"""Checkpoints that resume exactly, on any number of processes.

Layout: <out_dir>/checkpoints/step_000123/ holds the model (student, target, prototypes, BN buffers) and
the optimizer as torch.distributed.checkpoint (DCP) shards, so a checkpoint written by N processes
(FSDP shards) loads on M; `meta.pt` (step, data position, config; loaded with weights_only=True) and
`rng_<rank>.pt` sit beside them. A step directory counts only once `<out_dir>/checkpoints/latest`
names it; that pointer is replaced atomically after every file is written and synced, so a run killed
mid-write (even by SIGKILL) leaves the previous checkpoint as `latest`.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

log = logging.getLogger(__name__)

FORMAT = "msn-fast/2"
KEEP = 2  # completed checkpoints kept on disk


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or not an msn-fast checkpoint; the message names the path."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


@contextmanager
def _quiet():
    """FutureWarnings and UserWarnings (DCP's chatter) silenced inside the block only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


def save_checkpoint(out_dir: str | os.PathLike, *, model, optimizer, step: int, epoch: int, batch_in_epoch: int,
                    config: dict, extra: dict | None = None) -> Path:
    """Collective on every process: write step_<step>/ and point `latest` at it. Returns the step directory."""
    root = Path(out_dir) / "checkpoints"
    path = root / f"step_{step:07d}"
    rank = _rank()
    if rank == 0:
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
    _barrier()
    with _quiet():
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    torch.save(rng, path / f"rng_{rank}.pt")
    if rank == 0:
        torch.save({"format": FORMAT, "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                    "config": config, "extra": extra or {}}, path / "meta.pt")
    _barrier()
    if rank == 0:
        _fsync_dir(path)
        tmp = root / "latest.tmp"
        tmp.write_text(path.name)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, root / "latest")  # the commit point
        for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def resolve(path: str | os.PathLike) -> Path:
    """A run directory, its checkpoints/ directory or a step directory -> the step directory to load."""
    path = Path(path)
    for root in (path / "checkpoints", path):
        pointer = root / "latest"
        if pointer.is_file():
            step_dir = root / pointer.read_text().strip()
            if not step_dir.is_dir():
                raise CheckpointError(f"{pointer} names {step_dir}, which does not exist")
            return step_dir
    if (path / "meta.pt").is_file():
        return path
    raise CheckpointError(f"no msn-fast checkpoint at {path} (expected checkpoints/latest or meta.pt)")


def load_meta(path: str | os.PathLike) -> dict:
    """Step, data position and config of a checkpoint (no tensors are loaded)."""
    step_dir = resolve(path)
    try:
        meta = torch.load(step_dir / "meta.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {step_dir / 'meta.pt'} is unreadable (truncated or corrupt?): {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{step_dir} is not an msn-fast checkpoint (format {FORMAT})")
    return meta


def load_checkpoint(path: str | os.PathLike, *, model, optimizer=None) -> dict:
    """Collective: load model (and optimizer) state in place, restore this rank's RNG; returns the meta dict."""
    step_dir = resolve(path)
    meta = load_meta(step_dir)
    try:
        with _quiet():
            if optimizer is not None:
                model_sd, optim_sd = get_state_dict(model, optimizer)
                state = {"model": model_sd, "optim": optim_sd}
            else:
                state = {"model": model.state_dict()}
            dcp.load(state, checkpoint_id=str(step_dir))
            if optimizer is not None:
                set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
            else:
                model.load_state_dict(state["model"])
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise CheckpointError(f"checkpoint {step_dir} could not be loaded (corrupt, truncated or from another "
                              f"model?): {(lines[-1] if lines else type(e).__name__)[:300]}") from e
    rng_file = step_dir / f"rng_{_rank()}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, map_location="cpu", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return meta


def load_model(path: str | os.PathLike, device="cpu"):
    """(MSN model with the checkpoint's weights, its Config) in one process, for evaluation and export."""
    from .config import from_dict
    from .model import MSN

    meta = load_meta(path)
    cfg = from_dict(meta["config"])
    model = MSN(cfg).to(device)
    load_checkpoint(path, model=model)
    return model, cfg
