"""Shared plumbing for the kernels: backend choice, interpreter detection, launch settings.

Every public op in `msn_fast.kernels` takes `backend="auto" | "triton" | "torch"` (attention also
"xformers"). "auto" means Triton on a CUDA tensor and the torch implementation otherwise (also under the
Triton interpreter: tests ask for backend="triton" explicitly). This module imports
only torch and triton, so the kernels can be reused alone.
"""

from __future__ import annotations

import functools
import math
import operator
import os

import torch

BACKENDS = ("auto", "triton", "torch")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install on an odd platform
        return False
    return True


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, x: torch.Tensor, op: str, extra: tuple[str, ...] = ()) -> str:
    """Turn "auto" into a concrete backend for tensor `x`, or fail with a clear error.

    Returns "triton", "torch" or one of `extra`.
    """
    allowed = BACKENDS + extra
    if backend not in allowed:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {', '.join(allowed)}")
    if backend == "auto":
        # CPU tensors always take the torch path, even under the interpreter: the interpreter is for
        # testing kernels (with backend="triton"), not for running models.
        return "triton" if x.is_cuda and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend='triton' requested but triton is not installed")
        if not (x.is_cuda or (interpreting() and x.device.type == "cpu")):
            raise RuntimeError(
                f"{op}: backend='triton' needs CUDA tensors (got device {x.device}); "
                "on a CPU use backend='torch', or set TRITON_INTERPRET=1 before importing msn_fast to test kernels"
            )
    return backend


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def calculate_settings(n: int, max_block: int = 65536) -> tuple[int, int]:
    """Block size and warp count for a row-wise kernel over `n` columns (Liger-Kernel's heuristic)."""
    block = next_power_of_2(n)
    if block > max_block:
        raise ValueError(f"row of {n} elements exceeds the maximum block of {max_block}")
    num_warps = 4
    if block >= 32768:
        num_warps = 32
    elif block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    return block, num_warps


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{op}: tensors on different devices: {devices}")


def check_dtype(op: str, name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{op}: {name} has dtype {str(t.dtype).replace('torch.', '')}; expected one of {names}")


def check_finite(op: str, name: str, value, positive: bool = False) -> None:
    """A scalar argument must be a finite real number (and > 0 with `positive`); ValueError otherwise."""
    try:
        ok = math.isfinite(value) and (value > 0 or not positive)
    except TypeError:  # not a real number
        ok = False
    if not ok:
        raise ValueError(f"{op}: {name} must be a finite number{' > 0' if positive else ''}; got {value!r}")


def check_int(op: str, name: str, value, minimum: int) -> None:
    """A count argument must be an integer (int, numpy integer; not a float) >= minimum; ValueError otherwise."""
    try:
        ok = operator.index(value) >= minimum
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{op}: {name} must be an integer >= {minimum}; got {value!r}")
