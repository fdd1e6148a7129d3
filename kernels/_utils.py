"""Shared plumbing for the kernels: backend choice, interpreter detection, launch settings, input checks.

Every public op in `msn_fast.kernels` takes `backend="auto" | "triton" | "torch"` (attention also
"xformers"). "auto" means Triton on a CUDA tensor and the torch implementation otherwise (also under the
Triton interpreter: tests ask for backend="triton" explicitly). This module imports only torch and,
when it is installed, triton (setup.py installs it on Linux only): the kernel modules take `triton` and
`tl` from here, stand-ins where Triton is missing, so the package imports everywhere and the torch
backends serve. Under TRITON_INTERPRET=1 it also fixes the interpreter's bf16 `tl.dot` (see
`install_interpreter_bf16_dot_fix`).
"""

from __future__ import annotations

import functools
import math
import operator
import os
import types

import torch

BACKENDS = ("auto", "triton", "torch")


def missing_triton_message(op: str) -> str:
    return (
        f"msn_fast.kernels: {op} needs Triton, which is not installed (pip install triton; Linux only); "
        "use backend='torch'"
    )


class _MissingKernel:
    """What `@triton.jit` gives without Triton: the module imports, and launching it raises."""

    def __init__(self, fn) -> None:
        functools.update_wrapper(self, fn)
        self.op = fn.__name__.strip("_").removesuffix("_kernel")  # _attention_fwd_kernel -> attention_fwd

    def __getitem__(self, grid) -> "_MissingKernel":
        return self

    def __call__(self, *args, **kwargs):
        raise RuntimeError(missing_triton_message(self.op))


class _MissingConfig:
    """`triton.Config` without Triton: holds the fields the config lists read (kwargs, num_warps, ...)."""

    def __init__(self, kwargs, num_warps: int = 4, num_stages: int = 3, **options) -> None:
        self.kwargs, self.num_warps, self.num_stages = dict(kwargs), num_warps, num_stages
        self.__dict__.update(options)


class _MissingLanguage(types.ModuleType):
    """`triton.language` without Triton: every attribute (tl.constexpr, tl.float32, ...) is a placeholder."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return types.SimpleNamespace(name=f"triton.language.{name} (Triton is not installed)")


def _missing_jit(fn=None, **options):
    return _MissingKernel(fn) if fn is not None else _missing_jit  # @triton.jit or @triton.jit(...)


def _missing_decorator(*args, **kwargs):
    return lambda kernel: kernel  # triton.autotune(...), triton.heuristics(...)


def _missing_triton() -> tuple[types.ModuleType, types.ModuleType]:
    tl = _MissingLanguage("triton.language")
    stub = types.ModuleType("triton", "Stand-in for Triton, which is not installed: kernels import, launches raise.")
    stub.__dict__.update(
        jit=_missing_jit,
        autotune=_missing_decorator,
        heuristics=_missing_decorator,
        Config=_MissingConfig,
        cdiv=lambda a, b: -(-a // b),
        language=tl,
    )
    return stub, tl


try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # ImportError (macOS, Windows), or a broken install on an odd platform
    triton, tl = _missing_triton()
    HAS_TRITON = False


def triton_available() -> bool:
    return HAS_TRITON


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ---- interpreter bf16 tl.dot -------------------------------------------------------------------
# The interpreter stores bf16 as uint16 bit patterns and its tl.dot multiplies those integers
# (triton#11584): every bf16 kernel test would compare garbage. The fix upcasts bf16 dot operands to
# fp32 first, which is exact (a bf16 is the top half of an fp32), so the kernel's own fp32
# accumulation is what runs. GPUs are untouched: it patches only the interpreter's builder, and only
# under TRITON_INTERPRET=1 (a testing mode). Where a Triton version lacks the patch point, bf16
# launches through the public ops raise instead (resolve_backend).
_bf16_dot_fix_error: str | None = None


def install_interpreter_bf16_dot_fix() -> bool:
    """Patch the interpreter's tl.dot for bf16 operands; idempotent. False (and why, kept for the
    error) where this Triton's interpreter lacks InterpreterBuilder.create_dot or TensorHandle."""
    global _bf16_dot_fix_error
    try:
        import numpy as np
        from triton.runtime import interpreter

        builder, handle, bf16 = interpreter.InterpreterBuilder, interpreter.TensorHandle, interpreter.tl.bfloat16
        original = builder.create_dot
    except Exception as e:  # no triton, or interpreter internals renamed in this version
        _bf16_dot_fix_error = f"{type(e).__name__}: {e}"
        return False
    if getattr(original, "_msn_bf16_fix", False):
        return True

    def upcast(t):
        if getattr(t, "dtype", None) == bf16:
            return handle((t.data.astype(np.uint32) << 16).view(np.float32), interpreter.tl.float32)
        return t

    @functools.wraps(original)
    def create_dot(self, a, b, *args, **kwargs):
        return original(self, upcast(a), upcast(b), *args, **kwargs)

    create_dot._msn_bf16_fix = True
    builder.create_dot = create_dot
    _bf16_dot_fix_error = None
    return True


if HAS_TRITON and interpreting():  # at kernel import, as Triton itself reads TRITON_INTERPRET then
    install_interpreter_bf16_dot_fix()


# Tests of the "auto" path (the self-check's fallback) under the interpreter set this to True: "auto" then
# picks Triton for CPU tensors as it does for CUDA ones. Never set in the package.
AUTO_TRITON_ON_INTERPRETER = False


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
        on_interpreter = AUTO_TRITON_ON_INTERPRETER and interpreting() and x.device.type == "cpu"
        return "triton" if (x.is_cuda or on_interpreter) and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(missing_triton_message(op))
        if not (x.is_cuda or (interpreting() and x.device.type == "cpu")):
            raise RuntimeError(
                f"{op}: backend='triton' needs CUDA tensors (got device {x.device}); "
                "on a CPU use backend='torch', or set TRITON_INTERPRET=1 before importing msn_fast to test kernels"
            )
        if interpreting() and x.dtype == torch.bfloat16 and not install_interpreter_bf16_dot_fix():
            raise RuntimeError(
                f"{op}: bf16 under the Triton interpreter needs msn_fast's tl.dot fix, which does not apply to "
                f"triton {triton.__version__} ({_bf16_dot_fix_error}); use float32, or backend='torch'"
            )
    return backend


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def calculate_settings(
    n_cols: int, n_rows: int | None = None, *, max_cols: int = 1024, elems: int = 4096, per_thread: int = 8
) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_COLS, num_warps) for an element-wise, row-wise or gather kernel over [n_rows, n_cols].

    Liger-Kernel's calculate_settings, widened to several rows a program. BLOCK_COLS is n_cols padded to a
    power of two, at most `max_cols` (a power of two: wider rows take a grid axis over column tiles, and a
    kernel that needs whole rows checks n_cols itself); BLOCK_M packs rows (at most next_power_of_2(n_rows))
    until a program holds about `elems` elements. num_warps leaves each thread about `per_thread` of them
    (8: the Triton tutorials' ratio, 1024-element blocks on 4 warps), within 4-16 warps. The token gather passes
    the per-thread count its launch settings had before this function served it (4 warps), as no GPU timing has
    yet said that more warps pay. Kernels with other constraints keep their own: the patch GEMM's tl.dot tile and
    the im2col's 32-row programs (patch_embed.py), and the prototype cross-entropy's whole-row tiles with a larger
    budget under the interpreter (prototype_ce_triton.py `_tile`).
    """
    block_cols = min(next_power_of_2(n_cols), max_cols)
    block_m = max(1, elems // block_cols)
    if n_rows is not None:
        block_m = min(block_m, next_power_of_2(n_rows))
    return block_m, block_cols, min(16, max(4, block_m * block_cols // (32 * per_thread)))


def idx_strides(keep_idx: torch.Tensor) -> tuple[int, int]:
    """(stride over samples, stride over kept tokens) of keep_idx; a shared [K] index has sample stride 0."""
    return (0, keep_idx.stride(0)) if keep_idx.dim() == 1 else (keep_idx.stride(0), keep_idx.stride(1))


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
