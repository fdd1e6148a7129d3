"""Fault injection for tests/test_faults.py: SIGKILL this process at the k-th file-system step of a save.

A "tick" is every call that changes the disk: opening a file for writing, torch.save to a path, mkdir,
rename/replace, fsync, unlink and rmtree (each file it deletes) on a path under the armed root.
`arm(k, root)` patches them so that the k-th tick kills the process (SIGKILL: no cleanup, no `finally`,
exactly what a scheduler does after its grace period) before the call runs; `arm(None, root)` only counts
them, so a test can learn how many points a save has and try each one.

As a script it runs the trainer and arms the kill at tick K of its N-th checkpoint save:
    python tests/kill_points.py N K COUNT_FILE -- <msn_fast.train arguments>
(K = 0: count only; the number of ticks of save N is written to COUNT_FILE).
"""

from __future__ import annotations

import builtins
import io
import os
import shutil
import signal
import sys

_REAL = {}
state = {"ticks": 0, "kill_at": None, "root": ""}


def _tick(name: str):
    state["ticks"] += 1
    if state["kill_at"] is not None and state["ticks"] >= state["kill_at"]:
        os.kill(os.getpid(), signal.SIGKILL)


def _under_root(args, kwargs) -> bool:
    """Calls on paths outside the armed root (a .pyc written by a lazy import, a log file) are not ticks."""
    if not args or isinstance(args[0], int) or kwargs.get("dir_fd") is not None:  # fsync(fd); rmtree's unlinks
        return True
    try:
        return os.path.abspath(os.fspath(args[0])).startswith(state["root"])
    except TypeError:
        return False


def _wrap(owner, name: str, writes=None):
    real = getattr(owner, name)
    _REAL[(owner, name)] = real

    def patched(*args, **kwargs):
        if (writes is None or writes(*args, **kwargs)) and _under_root(args, kwargs):
            _tick(name)
        return real(*args, **kwargs)

    setattr(owner, name, patched)


def _opens_for_writing(file, mode="r", *args, **kwargs) -> bool:
    return any(c in str(mode) for c in "wax+")


def arm(kill_at: int | None, root: str | os.PathLike = "/") -> None:
    """Count (and, with kill_at, die at) the disk-changing calls on paths under `root` from now on."""
    state["ticks"], state["kill_at"], state["root"] = 0, kill_at, os.path.abspath(root)
    if _REAL:
        return
    _wrap(builtins, "open", _opens_for_writing)
    _wrap(io, "open", _opens_for_writing)
    for name in ("mkdir", "rename", "replace", "fsync", "unlink", "remove", "rmdir"):
        _wrap(os, name)
    _wrap(shutil, "rmtree")
    import torch  # torch.save writes through its C++ writer: one tick before it, none inside

    _wrap(torch, "save", lambda obj, f, *a, **k: isinstance(f, (str, os.PathLike)))


def disarm() -> int:
    """Stop counting; returns the number of ticks since arm()."""
    n, state["kill_at"] = state["ticks"], None
    for (owner, name), real in _REAL.items():
        setattr(owner, name, real)
    _REAL.clear()
    return n


def main(argv: list[str]) -> int:
    n_save, kill_at, count_file = int(argv[0]), int(argv[1]), argv[2]
    out = argv[argv.index("--run.out_dir") + 1]
    assert argv[3] == "--"
    import msn_fast.train as train

    real_save = train.save_checkpoint
    calls = {"n": 0}

    def save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] != n_save:
            return real_save(*args, **kwargs)
        arm(kill_at or None, out)
        try:
            return real_save(*args, **kwargs)
        finally:
            ticks = disarm()
            with open(count_file, "w") as f:
                f.write(str(ticks))

    train.save_checkpoint = save
    return train.main(argv[4:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
