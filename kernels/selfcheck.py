"""First-use self-check of the Triton ops, and `check_op`, the comparison behind it (issue 18).

A Triton kernel that compiles on a GPU and Triton version nobody here has run can still compute something
wrong. So the first call of each op per shape class in a process (the key: op, dtypes, the sizes the
kernel's tiling depends on, whether gradients are needed, the device's compute capability) also runs the
op on a small slice of the same inputs (one head, two images, eight targets) through the Triton path and
through the torch reference, forward and backward, and compares them with the tests' rule (3):

    err(kernel) <= 2 · err(torch at the same dtype) + floor,   both errors against the torch path in fp64,

the floor being LOWP_FLOOR · max(1, max|ref|) for 16-bit dtypes and the rounding bound
ROUNDING_K · eps · sqrt(n) · max|ref| for fp32 (n: the op's longest reduction). tests/conftest.py takes
these constants from here, so the self-check and the tests judge alike.

On a failure (a mismatch, a non-finite value where the reference is finite, or an exception such as a
compile error): with backend="auto" one KernelSelfCheckWarning names the op, the shapes, the device, the
Triton and torch versions and the error, and that shape class takes the torch path for the rest of the
process; with backend="triton" the call raises KernelSelfCheckError. MSN_FAST_SELFCHECK=0 turns the check
off. It is skipped while torch.compile traces (fake tensors cannot be compared). An op called with a
process group to agree over (the prototype cross-entropy, which msn_fast.loss calls with the group its ME-MAX
and Sinkhorn sums cross) agrees its decision across that group: every rank takes the same path.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from ._utils import triton

ROUNDING_K = 8.0  # chained reductions allowed for (a few matmuls, a softmax)
LOWP_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 1e-2}  # >= one ulp of the largest value (interpreter truncates)


def rounding_bound(dtype: torch.dtype, n: int, scale: float = 1.0, k: float = ROUNDING_K) -> float:
    """Largest error the rounding model allows for sums of `n` terms of magnitude `scale` in `dtype`."""
    return k * torch.finfo(dtype).eps * max(n, 1) ** 0.5 * scale


def flash_rule_bound(ref64: torch.Tensor, plain: torch.Tensor, dtype: torch.dtype, n: int) -> float:
    """2 · err(plain) + floor: the error a kernel output in `dtype` may have against the fp64 `ref64`."""
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    err_plain = (plain.double() - ref64).abs().max().item() if ref64.numel() else 0.0
    floor = LOWP_FLOOR[dtype] * max(1.0, scale) if dtype in LOWP_FLOOR else rounding_bound(dtype, n, scale)
    return 2 * err_plain + floor


class KernelSelfCheckError(RuntimeError):
    """A Triton op disagreed with its torch reference (or failed to run) and backend="triton" was asked for."""


class KernelSelfCheckWarning(RuntimeWarning):
    """A Triton op disagreed with its torch reference (or failed to run); the torch path is used instead."""


@dataclass
class CheckResult:
    """One comparison of an op's Triton path with its torch reference (values and gradients)."""

    op: str
    shapes: str
    dtype: str
    ok: bool
    error: str | None = None  # why it failed: the exception, or the first output over its bound
    max_err: dict[str, float] = field(default_factory=dict)  # per output / gradient: kernel vs fp64
    bound: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def enabled() -> bool:
    return os.environ.get("MSN_FAST_SELFCHECK", "1").strip() not in ("0", "false", "no", "off")


# ---- the ops: how to call each one, what its outputs are, its longest reduction --------------------------


def _attention_n(kw) -> int:
    return max(kw["q"].shape[-2], kw["k"].shape[-2]) * kw["q"].shape[-1]


def _patch_n(kw) -> int:
    w, idx = kw["weight"], kw.get("keep_idx")
    rows = kw["images"].shape[0] * (idx.shape[-1] if idx is not None else 1)
    return w[0].numel() + rows


def _ce_n(kw) -> int:
    return kw["anchor"].shape[0] * kw["prototypes"].shape[0]


def _gather_n(kw) -> int:
    return kw["tokens"].shape[0] + 1


_MODULE = {"attention": "attention", "embed_kept_patches": "patch_embed", "gather_tokens": "token_gather",
           "prototype_cross_entropy": "prototype_ce"}  # fmt: skip


def _function(op: str) -> Callable:
    # by module path: the package attribute `attention` is the function, and the modules import this one
    return getattr(importlib.import_module(f"{__package__}.{_MODULE[op]}"), op)


_REDUCTION = {"attention": _attention_n, "embed_kept_patches": _patch_n, "gather_tokens": _gather_n,
              "prototype_cross_entropy": _ce_n}  # fmt: skip
OPS = tuple(_REDUCTION)


def _outputs(op: str, out) -> dict[str, torch.Tensor]:
    if op == "prototype_cross_entropy":
        ce, mean_probs = out
        return {"ce": ce, "mean_probs": mean_probs}
    return {"out": out}


def _describe(kw: dict) -> str:
    parts = [f"{k}={list(v.shape)}" for k, v in kw.items() if isinstance(v, torch.Tensor)]
    return " ".join(parts)


def _is_float(v) -> bool:
    return isinstance(v, torch.Tensor) and v.is_floating_point()


_active = False  # inside check_op: the ops it calls must not check themselves again


def _cotangent(out: torch.Tensor, index: int = 0) -> torch.Tensor:
    """The same pseudo-random upstream gradient of output `index` for every run of a check (the global RNG is
    not touched)."""
    gen = torch.Generator(device=out.device).manual_seed(20220414 + index)
    return torch.randn(out.shape, generator=gen, device=out.device, dtype=torch.float32).to(out.dtype)


def _run(op: str, kw: dict, backend: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Outputs and input gradients of `op` on copies of kw (float tensors cast to `dtype` if given)."""
    grads_of = [k for k, v in kw.items() if _is_float(v) and v.requires_grad]
    args = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().clone()
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            v.requires_grad_(k in grads_of)
        args[k] = v
    outs = _outputs(op, _function(op)(**args, backend=backend))
    if grads_of:  # every differentiable output at once (the cross-entropy's mean prediction has a backward too)
        diff = [o for o in outs.values() if o.requires_grad]
        torch.autograd.backward(diff, [_cotangent(o, i) for i, o in enumerate(diff)])
    grads = {f"d{k}": args[k].grad for k in grads_of}
    return {**outs, **grads}


def check_op(op: str, **kwargs) -> CheckResult:
    """Compare `op`'s Triton path (backend="triton") with its torch path at the same dtype and in fp64.

    kwargs are the public function's arguments without `backend` (tensors that require grad get their
    gradients compared, against a fixed pseudo-random cotangent). Never raises for a kernel failure: the
    result says what failed.
    """
    global _active
    if op not in _REDUCTION:
        raise ValueError(f"check_op: unknown op {op!r}; choose one of {', '.join(OPS)}")
    kw = dict(kwargs)
    lead = next(v for v in kw.values() if _is_float(v))
    res = CheckResult(op, _describe(kwargs), str(lead.dtype).replace("torch.", ""), ok=False)
    t0, outer = time.perf_counter(), _active
    _active = True
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(lead.device.type, enabled=False):
            try:
                got = _run(op, kw, "triton")
            except Exception as e:  # a compile error, a launch failure, a bad config on this GPU
                res.error = f"{type(e).__name__}: {str(e).strip()[:800]}"
                return res
            try:
                plain = _run(op, kw, "torch")
                ref = _run(op, kw, "torch", torch.float64)
            except Exception as e:  # nothing to judge against (out of memory?): do not trust the kernel either
                res.error = f"the torch reference failed: {type(e).__name__}: {str(e).strip()[:800]}"
                return res
        n = _REDUCTION[op](kw)
        for name, g in got.items():
            r64 = ref[name].double()
            dtype = g.dtype if g.is_floating_point() else lead.dtype
            bound = flash_rule_bound(r64, plain[name], dtype, n)
            finite = bool(torch.isfinite(g).all()) or not bool(torch.isfinite(r64).all())
            err = (g.double() - r64).abs().max().item() if g.numel() else 0.0
            if not finite:
                err = math.inf
            res.max_err[name], res.bound[name] = err, bound
            if (err > bound or not finite) and res.error is None:
                res.error = (f"{name}: error {err:.3e} against fp64 > bound {bound:.3e} "
                             f"(2 x torch {dtype} error + floor)")
        res.ok = res.error is None
        return res
    finally:
        _active = outer
        res.seconds = time.perf_counter() - t0


# ---- the first-use hook the public functions call ------------------------------------------------------

_results: dict[tuple, CheckResult] = {}


def _capability(x: torch.Tensor) -> str:
    return _device_label(x.device.type, x.device.index)


@functools.lru_cache(maxsize=None)  # on every call of an op: no device query after the first
def _device_label(kind: str, index: int | None) -> str:
    if kind == "cuda":
        major, minor = torch.cuda.get_device_capability(index)
        return f"sm_{major}{minor} ({torch.cuda.get_device_name(index)})"
    return f"{kind} (Triton interpreter)"


def _message(res: CheckResult, device: str, strict: bool) -> str:
    action = "backend='triton' was asked for" if strict else "using the torch path for this op and shape class"
    return (f"msn_fast.kernels: the Triton {res.op} disagrees with its torch reference on {device} at "
            f"{res.shapes} ({res.dtype}; triton {getattr(triton, '__version__', 'missing')}, torch "
            f"{torch.__version__}): {res.error}; {action} for the rest of this process "
            "(MSN_FAST_SELFCHECK=0 turns the check off)")  # fmt: skip


def use_triton(op: str, key: tuple, sample: Callable[[], dict], like: torch.Tensor, *, strict: bool,
               process_group=None, agree: bool = False) -> bool:
    """Whether `op` may run its Triton path for inputs of shape class `key` (True when checking is off).

    `sample()` returns a small slice of the call's arguments (kwargs of the public function); it runs only
    on the first call of a key. `agree`: all ranks of `process_group` take the same decision.
    """
    if _active or not enabled() or torch.compiler.is_compiling():
        return True
    device = _capability(like)
    full_key = (op, device, torch.is_grad_enabled()) + tuple(key)
    res = _results.get(full_key)
    if res is None:
        try:
            kwargs = sample()
        except Exception as e:  # a bug of the hook, not of the kernel: still never a wrong result
            kwargs, res = None, CheckResult(op, "?", str(like.dtype).replace("torch.", ""), ok=False,
                                            error=f"the check's slice could not be built: {type(e).__name__}: {e}")
        if kwargs is not None:
            res = check_op(op, **kwargs)
        if agree and dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
            flag = torch.tensor([float(res.ok)], device=like.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=process_group)
            if res.ok and flag.item() < 1:
                res.ok, res.error = False, "the self-check failed on another rank (see its warning)"
        _results[full_key] = res
        if not res.ok and not strict:
            warnings.warn(_message(res, device, strict), KernelSelfCheckWarning, stacklevel=3)
    if not res.ok and strict:
        raise KernelSelfCheckError(_message(res, device, strict))
    return res.ok


def marked(t: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    """A detached slice for `sample()`, requiring grad when the call's own input `like` does (so its
    gradient is checked too)."""
    if t is None:
        return None
    return t.detach().requires_grad_(like is not None and like.requires_grad and t.is_floating_point())


def results() -> list[CheckResult]:
    """The self-checks run so far in this process (one per op and shape class)."""
    return list(_results.values())


def reset() -> None:
    """Forget every self-check result: the next call of each op checks again (tests, a new device)."""
    _results.clear()


def size_class(n: int) -> int:
    """Power-of-two bucket of a length: tile edges change with it, not with every length."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
