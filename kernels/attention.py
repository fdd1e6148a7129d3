"""Non-causal multi-head attention for ViT training: one public function, several backends.

`attention(q, k, v)` takes SDPA's layout [B, H, N, D]. Backends: "torch" (SDPA), "eager" (the readable
reference, softmax(q kᵀ·scale) v in fp32), "xformers" (CUDA, when installed) and "triton": FlashAttention-2
(Dao 2023, arXiv:2307.08691; layout after the Triton tutorial 06-fused-attention), online softmax in exp2,
any N, head dims 32/64/80/96/128, a split atomic-free backward. Here: launchers, reference, custom ops and
the public function; the jit kernels and autotune lists are in attention_triton.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import attention_triton as tri
from . import selfcheck
from ._utils import check_dtype, check_finite, check_same_device, next_power_of_2, resolve_backend, triton

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 128)
LOG2E = 1.4426950408889634  # softmax runs in base 2: exp(x) == exp2(x·log2 e)
CPU_MATMUL_MAX_KEYS, CPU_MATMUL_MAX_HEAD_DIM = 48, 32
"""On a CPU, "auto" runs fp32 attention that autograd records, over at most 48 keys with heads at most 32 wide, as
the eager form (two matmuls and a softmax, `attention_ref`) rather than SDPA's flash kernel, slower on so small a
problem. Forward + backward, q/k/v strided views of one qkv projection, eager time / SDPA time (AMD EPYC,
AVX2; bench/results/2026-12-07-cpu-short-attention/): 4 heads of 32, 17 / 33 / 45 / 65 keys: 0.45 / 0.66 / 0.64 /
0.83 on 2 threads, 0.61 / 0.81 / 0.88 / 1.02 on 1. With heads of 64 the eager form lost on 1 thread from 33 keys
(1.23), and without autograd it lost on 1 thread at 17 keys (1.05), so those keep SDPA."""


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, scale: float | None, kernel: bool = False) -> None:
    """Checks shared by every backend, so a bad input fails alike whichever runs; `kernel` adds the Triton limits."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "attention: expected q, k, v of shape [B, H, N, D]; "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"attention: mismatched shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
            "(need equal B, H, D and k.shape == v.shape)"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_dtype("attention", name, t, SUPPORTED_DTYPES + (torch.float64,))
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    check_same_device("attention", q=q, k=k, v=v)
    if q.shape[-1] == 0:
        raise ValueError(f"attention: head dim D = 0 (q {tuple(q.shape)}); need D >= 1")
    # Zero queries: an empty output. Zero keys: a softmax over nothing (SDPA gives zeros, the kernel 0/0).
    if k.shape[2] == 0:
        raise ValueError(f"attention: k and v have shape {tuple(k.shape)}: Nkv = 0 keys, need Nkv >= 1 "
                         "(a softmax over zero keys is undefined)")  # fmt: skip
    if scale is not None:
        check_finite("attention", "scale", scale)
    if kernel:
        for name, t in (("q", q), ("k", k), ("v", v)):
            check_dtype("attention (triton)", name, t, SUPPORTED_DTYPES)
        if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
            raise ValueError(
                f"attention (triton): head dim {q.shape[-1]} is not supported; choose one of {SUPPORTED_HEAD_DIMS} "
                "or use backend='torch'"
            )


def _check_buffer(name: str, buf: Tensor, shape: tuple[int, ...], like: Tensor, dtype=None) -> None:
    """Shape, dtype (like's by default) and device; the fp32 softmax statistics must also be contiguous."""
    dtype = like.dtype if dtype is None else dtype
    bad = tuple(buf.shape) != tuple(shape) or buf.dtype != dtype or buf.device != like.device
    if bad or (dtype == torch.float32 and buf.dim() == 3 and not buf.is_contiguous()):
        raise ValueError(
            f"attention: {name} buffer is {tuple(buf.shape)} {buf.dtype} on {buf.device} (strides {buf.stride()}); "
            f"expected {tuple(shape)} {dtype} on {like.device}" + (", contiguous" if buf.dim() == 3 else "")
        )


def _empty_bhnd(t: Tensor) -> Tensor:
    """An uninitialised [B, H, N, D] tensor stored as [B, N, H, D], so `.transpose(1, 2).reshape(B, N, H*D)`
    after attention is free, as after SDPA's flash path."""
    b, h, n, d = t.shape
    return t.new_empty((b, n, h, d)).transpose(1, 2)


def _dot_precision(q: Tensor) -> str:
    """fp32 inputs: IEEE products unless the user allowed TF32 matmuls in torch; 16-bit inputs ignore this."""
    if q.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, *, out: Tensor | None = None, lse: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Triton forward. q: [B, H, Nq, D], k, v: [B, H, Nkv, D], any strides, fp32/fp16/bf16.

    Returns out [B, H, Nq, D] in q's dtype (stored [B, Nq, H, D] unless `out` is given; any strides)
    and lse [B, H, Nq] fp32 contiguous, the row log-sum-exp of q kᵀ·scale in base 2 (log2 units).
    Accumulation is fp32.
    """
    _check_inputs(q, k, v, scale, kernel=True)
    b, h, n_q, d = q.shape
    n_kv = k.shape[2]
    scale = d**-0.5 if scale is None else float(scale)
    out = _empty_bhnd(q) if out is None else out
    lse = q.new_empty((b, h, n_q), dtype=torch.float32) if lse is None else lse
    _check_buffer("out", out, q.shape, q)
    _check_buffer("lse", lse, (b, h, n_q), q, torch.float32)
    if q.numel() == 0:
        return out, lse
    grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), b * h)  # noqa: E731
    tri._attention_fwd_kernel[grid](
        q, k, v, out, lse, scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        h, n_q, n_kv,
        HEAD_DIM=d, BLOCK_D=next_power_of_2(d), DOT_PRECISION=_dot_precision(q),
    )  # fmt: skip
    return out, lse


def attention_bwd(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    scale: float | None = None,
    *,
    dq: Tensor | None = None,
    dk: Tensor | None = None,
    dv: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton backward. do, out: [B, H, Nq, D] and lse [B, H, Nq] fp32 as saved by `attention_fwd`.

    Returns dq, dk, dv in the inputs' dtype (stored [B, N, H, D] unless given; any strides), computed
    from fp32 accumulators: Delta = rowsum(O·dO), then one kernel per key block (dK, dV) and one
    per query block (dQ), so every output element is written by exactly one program (deterministic).
    """
    _check_inputs(q, k, v, scale, kernel=True)
    _check_buffer("do", do, q.shape, q)
    _check_buffer("out", out, q.shape, q)
    _check_buffer("lse", lse, q.shape[:3], q, torch.float32)
    b, h, n_q, d = q.shape
    n_kv = k.shape[2]
    scale = d**-0.5 if scale is None else float(scale)
    dq, dk, dv = (_empty_bhnd(t) if g is None else g for t, g in ((q, dq), (k, dk), (v, dv)))
    for name, buf, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        _check_buffer(name, buf, like.shape, like)
    if q.numel() == 0:  # no queries: nothing flows back to the keys
        return dq, dk.zero_(), dv.zero_()
    block_d, precision = next_power_of_2(d), _dot_precision(q)
    delta = torch.empty_like(lse)
    tri._attention_bwd_preprocess_kernel[(triton.cdiv(n_q, tri.PRE_BLOCK_M), b * h)](
        out, do, delta, *out.stride(), *do.stride(), h, n_q,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=tri.PRE_BLOCK_M,
    )  # fmt: skip
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    grid_kv = lambda meta: (triton.cdiv(n_kv, meta["BLOCK_N1"]), b * h)  # noqa: E731
    tri._attention_bwd_dkdv_kernel[grid_kv](
        q, k, v, do, dk, dv, lse, delta, scale * LOG2E, scale,
        *strides, *dk.stride(), *dv.stride(), h, n_q, n_kv,
        HEAD_DIM=d, BLOCK_D=block_d, DOT_PRECISION=precision,
    )  # fmt: skip
    grid_q = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M2"]), b * h)  # noqa: E731
    tri._attention_bwd_dq_kernel[grid_q](
        q, k, v, do, dq, lse, delta, scale * LOG2E, scale,
        *strides, *dq.stride(), h, n_q, n_kv,
        HEAD_DIM=d, BLOCK_D=block_d, DOT_PRECISION=precision,
    )  # fmt: skip
    return dq, dk, dv


def attention_ref(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """Eager reference: softmax(q kᵀ · scale) v with the maths in fp32 (fp64 inputs stay fp64).

    q, k, v: [B, H, N, D] -> [B, H, N, D] in q's dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)) * scale  # (B, H, N, N)
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, v.to(acc)).to(q.dtype)


# Autograd and torch.compile: the forward and backward launchers are registered as opaque custom
# ops, and the forward op gets its backward through register_autograd (one mechanism; this takes
# the place of an autograd.Function). FSDP2 and autocast see ordinary ops on ordinary tensors.
@torch.library.custom_op("msn_fast::attention_fwd", mutates_args=())
def _attention_fwd_op(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    return attention_fwd(q, k, v, scale)


@_attention_fwd_op.register_fake
def _(q, k, v, scale):
    return _empty_bhnd(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("msn_fast::attention_bwd", mutates_args=())
def _attention_bwd_op(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    return attention_bwd(do, q, k, v, out, lse, scale)


@_attention_bwd_op.register_fake
def _(do, q, k, v, out, lse, scale):
    return _empty_bhnd(q), _empty_bhnd(k), _empty_bhnd(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def _backward(ctx, d_out, d_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_op(d_out, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _xformers_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
    try:
        import xformers.ops as xops
    except ImportError as e:
        raise RuntimeError("attention: backend='xformers' requested but xformers is not installed") from e
    if not q.is_cuda:
        raise RuntimeError("attention: backend='xformers' runs on CUDA only (xformers has no CPU kernels)")
    # xformers wants [B, N, H, D]; a transpose view is enough (only the last stride must be 1).
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


def _self_checked(q: Tensor, k: Tensor, v: Tensor, scale: float, strict: bool) -> bool:
    """First use per (dtype, head dim, length classes, grad): the kernel against SDPA on one head of the
    first sample, all its rows (selfcheck.py)."""
    grad = q.requires_grad or k.requires_grad or v.requires_grad
    key = (q.dtype, q.shape[-1], selfcheck.size_class(q.shape[-2]), selfcheck.size_class(k.shape[-2]), grad)

    def sample() -> dict:
        return dict(
            q=selfcheck.marked(q[:1, :1], q),
            k=selfcheck.marked(k[:1, :1], k),
            v=selfcheck.marked(v[:1, :1], v),
            scale=scale,
        )

    return selfcheck.use_triton("attention", key, sample, q, strict=strict)


def _cpu_short_training(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether "auto" takes the eager form (see CPU_MATMUL_MAX_KEYS)."""
    small = k.shape[2] <= CPU_MATMUL_MAX_KEYS and q.shape[-1] <= CPU_MATMUL_MAX_HEAD_DIM
    recorded = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return q.device.type == "cpu" and q.dtype == torch.float32 and small and recorded


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, backend: str = "auto") -> Tensor:
    """Non-causal attention, softmax(q kᵀ · scale) v, differentiable in q, k and v.

    Args:
        q: [B, H, Nq, D]; k, v: [B, H, Nkv, D]; one dtype (fp32, fp16 or bf16; fp64 on the torch backends),
            one device, any strides. Nkv >= 1; Nq = 0 gives an empty output (and zero dK, dV).
        scale: a finite number; defaults to D ** -0.5.
        backend: "auto" (Triton on CUDA, SDPA elsewhere; also SDPA where the Triton kernel does not
            apply: fp64, head dims outside 32/64/80/96/128; on a CPU, fp32 training over few keys with
            narrow heads takes the eager form, faster there: CPU_MATMUL_MAX_KEYS), "triton", "torch" (SDPA),
            "eager", "xformers".
    Returns:
        [B, H, Nq, D] in the input dtype; softmax statistics and products are accumulated in fp32.
        A bad input raises ValueError (TypeError for a dtype) naming it, alike for every backend.
    """
    _check_inputs(q, k, v, scale)
    auto = backend == "auto"
    if auto and (q.dtype not in SUPPORTED_DTYPES or q.shape[-1] not in SUPPORTED_HEAD_DIMS):
        backend = "torch"
    requested, backend = backend, resolve_backend(backend, q, "attention", extra=("eager", "xformers"))
    if auto and backend == "torch" and _cpu_short_training(q, k, v):
        backend = "eager"
    if backend == "triton":
        _check_inputs(q, k, v, scale, kernel=True)
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        if _self_checked(q, k, v, scale, strict=requested == "triton"):
            return _attention_fwd_op(q, k, v, scale)[0]
    if backend == "eager":
        return attention_ref(q, k, v, scale)
    if backend == "xformers":
        return _xformers_attention(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)
