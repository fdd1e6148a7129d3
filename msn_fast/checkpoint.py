"""Checkpoints that resume exactly, on any number of processes, and that nothing can lose or hijack.

Layout: <out_dir>/checkpoints/step_0000123/ holds the model (student, target, prototypes, BN buffers) and
the optimizer as torch.distributed.checkpoint (DCP) shards, so a checkpoint written by N processes
(FSDP shards) loads on M; `rng_<rank>.pt` and `meta.pt` (step, which fixes the data position, config, process
count) sit beside them. `checkpoints/latest` names the step to resume from.

Commit protocol (a SIGKILL at any point leaves the previous checkpoint loadable; tests/test_faults.py):
  1. every process writes into `checkpoints/.partial_step_0000123/` (removed first if a killed save left it);
  2. rank 0 syncs the files and renames the folder to `step_0000123` (atomic; a complete folder only ever
     appears under a step name), then replaces `latest` atomically (write, fsync, rename);
  3. only then are older steps beyond the newest `keep` removed, never the one `latest` names.
A step that is already committed is not written again (a signal on a checkpoint step, a resumed finished run).
On resume, a `latest` that names a missing or incomplete folder falls back to the newest complete step,
with a warning naming both.

Loading is safe on folders from untrusted sources: `meta.pt` and `rng_<rank>.pt` are read with
`torch.load(weights_only=True)`, DCP's `.metadata` (a pickle) through an unpickler that admits only DCP's
metadata classes, and DCP's non-tensor entries with weights_only=True, so a crafted file is a
`CheckpointError` and never runs code.
"""

from __future__ import annotations

import io
import logging
import os
import pathlib
import pickle
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .distributed import world_size

log = logging.getLogger(__name__)

FORMAT = "msn-fast/2"
PARTIAL = ".partial_"  # prefix of a step folder being written; never loaded


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, unsafe or not an msn-fast checkpoint; the message names the path."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def on_rank0(fn):
    """fn() run by rank 0 alone, its result (or CheckpointError) given to every process, so that all take the
    same path even where they would see a shared file system differently (NFS attribute caches)."""
    if world_size() == 1:
        return fn()
    box = [None]
    if _rank() == 0:
        try:
            box = [("ok", fn())]
        except CheckpointError as e:
            box = [("error", str(e))]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise CheckpointError(value)
    return value


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries (so a rename inside it survives a crash of the machine)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _quiet():
    """FutureWarnings and UserWarnings (DCP's chatter) silenced inside the block only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


# --- safe reading ---------------------------------------------------------------------------------------------


def _allowed_global(module: str, name: str):
    """The objects DCP's `.metadata` pickle may name: its metadata classes and a few torch value types."""
    if module == dcp_metadata.__name__:
        obj = getattr(dcp_metadata, name, None)
        if isinstance(obj, type) and obj.__module__ == module:
            return obj
    if module == "torch.distributed.checkpoint.filesystem" and name == "_StorageInfo":
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        return _StorageInfo
    if module == "torch":
        obj = getattr(torch, name, None)
        if name == "Size" or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
            return obj
    if module == "torch.serialization" and name == "_get_layout":
        return torch.serialization._get_layout
    if module == "pathlib" and name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"):
        return getattr(pathlib, name)
    if (module, name) == ("collections", "OrderedDict"):
        import collections
        return collections.OrderedDict
    return None


def _buildable() -> tuple[type, ...]:
    """The types whose instances a pickle may fill in (BUILD): DCP's metadata records and paths, never a class."""
    import collections

    from torch.distributed.checkpoint.filesystem import _StorageInfo

    records = tuple(obj for obj in vars(dcp_metadata).values()
                    if isinstance(obj, type) and obj.__module__ == dcp_metadata.__name__)
    return records + (_StorageInfo, pathlib.PurePath, collections.OrderedDict)


class _MetadataUnpickler(pickle._Unpickler):
    """Python's own unpickler (not the C one, whose opcodes cannot be overridden) restricted twice: globals
    must be DCP metadata types (find_class), and BUILD may only fill in an instance of one of them, so a crafted
    file can neither call a function nor set attributes on a class (e.g. `PosixPath._str`) for the process."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str):
        obj = _allowed_global(module, name)
        if obj is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not a DCP metadata type)")
        return obj

    def _load_build(self):
        inst = self.stack[-2]  # BUILD pops the state (stack[-1]) and fills in the object under it
        if isinstance(inst, type) or not isinstance(inst, _buildable()):
            raise pickle.UnpicklingError(f"refusing to set the state of {type(inst).__name__} {inst!r:.60}")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = _load_build


def read_dcp_metadata(path: str | os.PathLike):
    """Unpickle a DCP `.metadata` file admitting only DCP's metadata classes. Raises CheckpointError."""
    try:
        with open(path, "rb") as fh:
            md = _MetadataUnpickler(fh).load()
    except Exception as e:
        raise CheckpointError(f"checkpoint metadata {path} is unsafe or corrupt: {e}") from None
    if not isinstance(md, dcp_metadata.Metadata) or not isinstance(md.state_dict_metadata, dict) \
            or not isinstance(md.storage_data, dict):
        raise CheckpointError(f"checkpoint metadata {path} is not DCP metadata (got {type(md).__name__})")
    for info in md.storage_data.values():  # DCP opens these: plain file names inside the step folder only
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or not name or name != os.path.basename(name) or name in (".", "..") \
                or os.path.isabs(name) or "\\" in name:
            raise CheckpointError(f"checkpoint metadata {path} names a shard outside its folder: {name!r:.80}")
    return md


def shard_files(step_dir: Path) -> set[str]:
    """The shard files the step's DCP metadata says hold its tensors."""
    md = read_dcp_metadata(step_dir / ".metadata")
    return {info.relative_path for info in md.storage_data.values()}


class SafeReader(FileSystemReader):
    """DCP's file-system reader with `.metadata` read by the restricted unpickler."""

    def read_metadata(self, *args, **kwargs):
        md = read_dcp_metadata(self._get_metadata_path(kwargs.get("rank")))
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = dcp_metadata.StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, but a non-tensor entry must load with `weights_only=True` before DCP unpickles it."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            torch.load(value, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"checkpoint entry {read_item.dest_index.fqn} is unsafe or corrupt: "
                                  f"{str(e).splitlines()[0][:200]}") from None
        value.seek(0)
        super().load_bytes(read_item, value)


class CheckpointReadError(CheckpointError):
    """The disk could not be read (EIO, permissions, too many files): not evidence that a checkpoint is broken."""


def _load_small(path: Path, what: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path.parent} has no {path.name} ({what})") from None
    except OSError as e:
        raise CheckpointReadError(f"cannot read {path}: {e}") from None
    except Exception as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated, corrupt or unsafe): {first[:200]}") \
            from None


# --- finding a checkpoint -------------------------------------------------------------------------------------


def _step_of(p: Path) -> int | None:
    name = p.name
    return int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else None


def _complete_meta(step_dir: Path) -> dict:
    """The meta dict of a complete msn-fast checkpoint; CheckpointError saying why `step_dir` is not one (cheap: no
    tensors read). A disk error is a CheckpointReadError: it says nothing about the checkpoint."""
    if not step_dir.is_dir():
        raise CheckpointError("it does not exist")
    meta = _load_small(step_dir / "meta.pt", "step, data position and config")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"it is not an msn-fast checkpoint (format {FORMAT})")
    world = meta.get("world", 1)
    if not isinstance(world, int) or not 1 <= world <= 1 << 20:
        raise CheckpointError(f"its meta.pt has an invalid process count {world!r:.40}")
    if not (step_dir / ".metadata").is_file():
        raise CheckpointError("its DCP .metadata is missing")
    missing = sorted(f for f in shard_files(step_dir) if not (step_dir / f).is_file())
    missing += [f"rng_{r}.pt" for r in range(world) if not (step_dir / f"rng_{r}.pt").is_file()]
    if missing:
        raise CheckpointError(f"{missing[0]} is missing")
    return meta


def incomplete_reason(step_dir: Path) -> str | None:
    """Why `step_dir` is not a complete msn-fast checkpoint, or None if it is one."""
    try:
        _complete_meta(step_dir)
    except CheckpointReadError:
        raise  # a disk error says nothing about the checkpoint: never treat it as broken (and replace it)
    except CheckpointError as e:
        return str(e)
    return None


def _complete_steps(root: Path) -> list[Path]:
    """Complete step folders under checkpoints/, oldest first."""
    if not root.is_dir():
        return []
    steps = sorted((s, p) for p in root.iterdir() if (s := _step_of(p)) is not None and p.is_dir())
    return [p for _, p in steps if incomplete_reason(p) is None]


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints (step folders) of a run directory, oldest first."""
    return _complete_steps(Path(run_dir) / "checkpoints")


def find_checkpoint(path: str | os.PathLike) -> Path | None:
    """The step directory to load from a run directory, its checkpoints/ directory or a step directory; None if
    there is no checkpoint at all. A broken `latest` falls back to the newest complete step (warned)."""
    path = Path(path)
    if (path / "meta.pt").is_file() and not (path / "latest").exists():
        return path  # a step directory
    for root in (path / "checkpoints", path):
        pointer = root / "latest"
        if not pointer.is_file():
            complete = _complete_steps(root)
            if complete:
                log.warning("%s is missing; using %s, the newest complete checkpoint", pointer, complete[-1])
                return complete[-1]
            continue
        named = root / pointer.read_text().strip()
        why = incomplete_reason(named)
        if why is None:
            return named
        complete = _complete_steps(root)  # scanned only when `latest` cannot be used
        if not complete:
            raise CheckpointError(f"{pointer} names {named.name}, which is incomplete ({why}), and no complete "
                                  f"checkpoint is left in {root}")
        log.warning("%s names %s, which is incomplete (%s); using %s, the newest complete checkpoint", pointer,
                    named.name, why, complete[-1].name)
        return complete[-1]
    return None


def resolve(path: str | os.PathLike) -> Path:
    """Like find_checkpoint, but no checkpoint at all is a CheckpointError."""
    found = find_checkpoint(path)
    if found is None:
        raise CheckpointError(f"no msn-fast checkpoint at {path} (expected checkpoints/latest or meta.pt)")
    return found


# --- saving ---------------------------------------------------------------------------------------------------


def save_checkpoint(out_dir: str | os.PathLike, *, model, optimizer, step: int, config: dict,
                    extra: dict | None = None, keep: int = 2) -> Path:
    """Collective on every process: commit step_<step>/ and point `latest` at it (the protocol above); keep the
    newest `keep` complete steps. A step already committed is left as it is. Returns the step directory."""
    if keep < 1:
        raise ValueError(f"keep={keep}: at least one checkpoint must be kept")
    root = Path(out_dir) / "checkpoints"
    path = root / f"step_{step:07d}"
    if on_rank0(lambda: _committed_with(path, config)):
        if _rank() == 0 and (not (root / "latest").is_file() or (root / "latest").read_text().strip() != path.name):
            _point_latest(root, path)
        _barrier()
        log.info("checkpoint %s is already committed; not written again", path)
        return path
    partial = root / f"{PARTIAL}{path.name}"
    rank = _rank()
    if rank == 0:
        if partial.exists():
            shutil.rmtree(partial)  # left by a killed save: never committed
        partial.mkdir(parents=True)
    _barrier()
    with _quiet():
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(partial))
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    torch.save(rng, partial / f"rng_{rank}.pt")
    _barrier()
    if rank == 0:
        # No epoch or position in the epoch: a resume derives both from the step and its own steps per epoch
        # (checkpoints of earlier versions hold them too; nothing reads them).
        torch.save({"format": FORMAT, "step": step, "world": world_size(), "config": config, "extra": extra or {}},
                   partial / "meta.pt")
        for f in partial.iterdir():
            _fsync(f)
        _fsync(partial)
        if path.exists():  # incomplete (an older version's crash) or from another config: swapped out
            stale = root / f"{PARTIAL}stale_{path.name}"
            shutil.rmtree(stale, ignore_errors=True)
            os.rename(path, stale)
        os.rename(partial, path)
        _fsync(root)
        _point_latest(root, path)
        _prune(root, path, keep)
    _barrier()
    return path


def _state_config(config: dict) -> dict:
    """The parts of a config that shape the training state (not --run.max_steps, the log cadence, ...)."""
    run = config.get("run", {}) if isinstance(config, dict) else {}
    return {**{k: v for k, v in config.items() if k != "run"}, "seed": run.get("seed")}


def _committed_with(path: Path, config: dict) -> bool:
    """Whether `path` is a complete checkpoint written under the same training config (then a save of the same
    step would write the same state: it is skipped). Another config (a resume with a lower lr) replaces it."""
    try:
        meta = _complete_meta(path)  # one read of meta.pt for both questions
    except CheckpointReadError:
        raise
    except CheckpointError:
        return False  # not complete (or absent): write it
    if _state_config(meta.get("config") or {}) == _state_config(config):
        return True
    log.warning("%s was committed under another config; replacing it with this run's state", path)
    return False


def _point_latest(root: Path, path: Path) -> None:
    tmp = root / "latest.tmp"
    tmp.write_text(path.name)
    _fsync(tmp)
    os.replace(tmp, root / "latest")  # the commit point
    _fsync(root)


def _prune(root: Path, current: Path, keep: int) -> None:
    """Remove leftovers of killed saves and the complete steps older than the newest `keep`, except `current`."""
    for p in root.iterdir():
        if p.name.startswith(PARTIAL) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    others = [p for p in _complete_steps(root) if p != current]
    for old in others[:max(0, len(others) - (keep - 1))]:
        trash = root / f"{PARTIAL}trash_{old.name}"  # renamed first: a kill mid-delete leaves no half step
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(old, trash)
        shutil.rmtree(trash, ignore_errors=True)


# --- loading --------------------------------------------------------------------------------------------------


def load_meta(path: str | os.PathLike) -> dict:
    """Step, data position and config of a checkpoint (no tensors are loaded)."""
    step_dir = resolve(path)
    meta = _load_small(step_dir / "meta.pt", "step, data position and config")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{step_dir} is not an msn-fast checkpoint (format {FORMAT})")
    return meta


def load_checkpoint(path: str | os.PathLike, *, model, optimizer=None) -> dict:
    """Collective: load model (and optimizer) state in place, restore this rank's RNG; returns the meta dict."""
    step_dir = resolve(path)
    meta = load_meta(step_dir)
    meta["path"] = str(step_dir)
    rng_file = step_dir / f"rng_{_rank()}.pt"
    rng = _load_small(rng_file, "this process's RNG state") if rng_file.is_file() else None
    read_dcp_metadata(step_dir / ".metadata")  # checked here for a clean error; DCP reads it again safely
    try:
        with _quiet():
            if optimizer is not None:
                model_sd, optim_sd = get_state_dict(model, optimizer)
                state = {"model": model_sd, "optim": optim_sd}
            else:
                state = {"model": model.state_dict()}
            dcp.load(state, storage_reader=SafeReader(str(step_dir)), planner=SafeLoadPlanner())
            if optimizer is not None:
                set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
            else:
                model.load_state_dict(state["model"])
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        inner = _inner_checkpoint_error(e)
        if inner is not None:
            raise inner from None
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise CheckpointError(f"checkpoint {step_dir} could not be loaded (corrupt, truncated or from another "
                              f"model?): {(lines[-1] if lines else type(e).__name__)[:300]}") from e
    if rng is not None:
        if not (isinstance(rng, dict) and isinstance(rng.get("cpu"), torch.Tensor)):
            raise CheckpointError(f"checkpoint {rng_file} is not an RNG state")
        torch.set_rng_state(rng["cpu"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return meta


def _inner_checkpoint_error(e: BaseException) -> CheckpointError | None:
    """DCP wraps errors raised on each rank in a CheckpointException; find ours inside it."""
    seen = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, CheckpointError):
            return CheckpointError(str(x))
        failures = getattr(x, "_failures", None) or getattr(x, "failures", None)
        if isinstance(failures, dict):
            for v in failures.values():
                stack.append(v[0] if isinstance(v, tuple) else v)
        for nxt in (x.__cause__, x.__context__):
            if nxt is not None:
                stack.append(nxt)
    return None


def load_model(path: str | os.PathLike, device="cpu"):
    """(MSN model with the checkpoint's weights, its Config) in one process, for evaluation and export."""
    from .config import from_dict
    from .model import MSN

    meta = load_meta(path)
    cfg = from_dict(meta["config"])
    model = MSN(cfg).to(device)
    load_checkpoint(path, model=model)
    return model, cfg
