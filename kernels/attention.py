"""Non-causal multi-head attention for ViT training: one public function, several backends.

`attention(q, k, v)` takes SDPA's layout [B, H, N, D] and returns [B, H, N, D]. Backends:
"torch" (F.scaled_dot_product_attention), "eager" (the readable reference: softmax(q kᵀ·scale) v
computed in fp32), "xformers" (memory_efficient_attention, CUDA only, when installed) and
"triton": a FlashAttention-2-style kernel (Dao 2023, arXiv:2307.08691; layout after the Triton
tutorial 06-fused-attention) with online softmax in exp2, any N via masked loads, head dims
32/64/80/96/128 padded to a power of two inside the kernel, and a split, atomic-free backward.
MSN_FAST_AUTOTUNE=0 in the environment skips autotuning (first config only: faster start-up).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from . import selfcheck
from ._utils import (
    check_dtype,
    check_finite,
    check_same_device,
    interpreting,
    next_power_of_2,
    resolve_backend,
    tl,
    triton,
)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 128)
LOG2E = 1.4426950408889634  # softmax runs in base 2: exp(x) == exp2(x·log2 e)


def _configs(block_q: str, block_kv: str, sizes_q, sizes_kv) -> list[triton.Config]:
    """A small Hopper list (6 per kernel, each compiled once per head dim and dtype): keep() drops
    8 warps on small tiles and 4 warps on 128x128 tiles, which get 2 stages instead of 3."""

    def keep(c: triton.Config) -> bool:
        return (c.num_warps == 8) == (c.kwargs[block_q] * c.kwargs[block_kv] >= 128 * 128)

    configs = [
        triton.Config({block_q: a, block_kv: b}, num_warps=w, num_stages=3 if w == 4 else 2)
        for a in sizes_q
        for b in sizes_kv
        for w in (4, 8)
    ]
    return [c for c in configs if keep(c)]


def _pruner(block_q: str, block_kv: str):
    """Per call: fp32 (a correctness path; IEEE dots compile slowly and big fp32 tiles overflow shared
    memory) and MSN_FAST_AUTOTUNE=0 get the first config; otherwise drop blocks longer than the padded
    sequence."""

    def prune(configs, named_args, **kwargs):
        if named_args["Q"].dtype == torch.float32 or os.environ.get("MSN_FAST_AUTOTUNE", "1") == "0":
            return configs[:1]
        cap_q, cap_kv = (max(64, next_power_of_2(named_args[n])) for n in ("N_Q", "N_KV"))
        kept = [c for c in configs if c.kwargs[block_q] <= cap_q and c.kwargs[block_kv] <= cap_kv]
        return kept or configs[:1]

    return {"early_config_prune": prune}


# The interpreter cannot autotune over several configs, so it gets the first: unequal blocks (a
# transposed index shows) and several blocks per row at the test lengths.
FWD_CONFIGS = _configs("BLOCK_M", "BLOCK_N", (64, 128), (32, 64, 128))
DKDV_CONFIGS = _configs("BLOCK_M1", "BLOCK_N1", (32, 64, 128), (64, 128))
DQ_CONFIGS = _configs("BLOCK_M2", "BLOCK_N2", (64, 128), (32, 64, 128))


def _tuned(configs: list[triton.Config]) -> list[triton.Config]:
    return configs[:1] if interpreting() else configs


# The autotuner adds every tensor argument's dtype to the key. HEAD_DIM is a runtime int (only
# BLOCK_D is constexpr) so that D = 80, 96 and 128 share one compiled kernel per config.
_TUNE_KEY = ["N_Q", "N_KV", "HEAD_DIM"]
_PRE_BLOCK_M = 64


@triton.autotune(_tuned(FWD_CONFIGS), _TUNE_KEY, _pruner("BLOCK_M", "BLOCK_N"))
@triton.jit
def _attention_fwd_kernel(
    Q, K, V, Out, LSE, qk_scale,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_oz, stride_oh, stride_om, stride_od,
    H, N_Q, N_KV,
    HEAD_DIM, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1).to(tl.int64)
    off_z = off_hz // H
    off_h = off_hz % H
    Q += off_z * stride_qz + off_h * stride_qh
    K += off_z * stride_kz + off_h * stride_kh
    V += off_z * stride_vz + off_h * stride_vh
    Out += off_z * stride_oz + off_h * stride_oh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_Q
    mask_d = offs_d < HEAD_DIM
    q_ptrs = Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    kt_ptrs = K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # (BLOCK_D, BLOCK_N)
    v_ptrs = V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd  # (BLOCK_N, BLOCK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max, base-2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N_KV, BLOCK_N):
        mask_n = start_n + offs_n < N_KV
        kt = tl.load(kt_ptrs + start_n * stride_kn, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        # Every block holds at least one real key, so m_new is finite and no row turns into NaN.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs + start_n * stride_vn, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(LSE + off_hz * N_Q + offs_m, m_i + tl.log2(l_i), mask=mask_m)
    o_ptrs = Out + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _attention_bwd_preprocess_kernel(
    Out, DO, Delta,
    stride_oz, stride_oh, stride_om, stride_od,
    stride_doz, stride_doh, stride_dom, stride_dod,
    H, N_Q,
    HEAD_DIM, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Delta = rowsum(O * dO) in fp32, the softmax-backward correction term."""
    off_hz = tl.program_id(1).to(tl.int64)
    Out += (off_hz // H) * stride_oz + (off_hz % H) * stride_oh
    DO += (off_hz // H) * stride_doz + (off_hz % H) * stride_doh
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < N_Q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(Out + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, mask=mask, other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + off_hz * N_Q + offs_m, delta, mask=offs_m < N_Q)


@triton.autotune(_tuned(DKDV_CONFIGS), _TUNE_KEY, _pruner("BLOCK_M1", "BLOCK_N1"))
@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, Delta, qk_scale, sm_scale,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_doz, stride_doh, stride_dom, stride_dod,
    stride_dkz, stride_dkh, stride_dkn, stride_dkd,
    stride_dvz, stride_dvh, stride_dvn, stride_dvd,
    H, N_Q, N_KV,
    HEAD_DIM, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr,
):  # fmt: skip
    """One program per key block: dV = Pᵀ dO and dK = scale · dSᵀ Q, looping over all query blocks.

    Rows of a padded key (k = v = 0) hold junk, possibly inf, but each output row depends on its
    own row of P only, and those rows are never stored.
    """
    start_n = tl.program_id(0)
    off_hz = tl.program_id(1).to(tl.int64)
    off_z = off_hz // H
    off_h = off_hz % H
    Q += off_z * stride_qz + off_h * stride_qh
    K += off_z * stride_kz + off_h * stride_kh
    V += off_z * stride_vz + off_h * stride_vh
    DO += off_z * stride_doz + off_h * stride_doh
    DK += off_z * stride_dkz + off_h * stride_dkh
    DV += off_z * stride_dvz + off_h * stride_dvh
    LSE += off_hz * N_Q
    Delta += off_hz * N_Q

    offs_n = start_n * BLOCK_N1 + tl.arange(0, BLOCK_N1)
    offs_m = tl.arange(0, BLOCK_M1)
    offs_d = tl.arange(0, BLOCK_D)
    mask_nd = (offs_n < N_KV)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=mask_nd, other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=mask_nd, other=0.0)
    qt_ptrs = Q + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd  # (BLOCK_D, BLOCK_M1)
    do_ptrs = DO + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod  # (BLOCK_M1, BLOCK_D)

    dk = tl.zeros([BLOCK_N1, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N1, BLOCK_D], tl.float32)
    for start_m in range(0, N_Q, BLOCK_M1):
        mask_m = start_m + offs_m < N_Q
        qt = tl.load(qt_ptrs + start_m * stride_qm, mask=(offs_d < HEAD_DIM)[:, None] & mask_m[None, :], other=0.0)
        # A padded query row gets lse = +inf, hence p = 0: it adds nothing to dK or dV.
        lse = tl.load(LSE + start_m + offs_m, mask=mask_m, other=float("inf"))
        pt = tl.exp2(tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale - lse[None, :])  # (BLOCK_N1, BLOCK_M1)
        do = tl.load(do_ptrs + start_m * stride_dom, mask=mask_m[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
        delta = tl.load(Delta + start_m + offs_m, mask=mask_m, other=0.0)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=DOT_PRECISION)

    dk *= sm_scale
    tl.store(DK + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=mask_nd)


@triton.autotune(_tuned(DQ_CONFIGS), _TUNE_KEY, _pruner("BLOCK_M2", "BLOCK_N2"))
@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, Delta, qk_scale, sm_scale,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_doz, stride_doh, stride_dom, stride_dod,
    stride_dqz, stride_dqh, stride_dqm, stride_dqd,
    H, N_Q, N_KV,
    HEAD_DIM, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
):  # fmt: skip
    """One program per query block: dQ = scale · dS K, looping over all key blocks."""
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1).to(tl.int64)
    off_z = off_hz // H
    off_h = off_hz % H
    Q += off_z * stride_qz + off_h * stride_qh
    K += off_z * stride_kz + off_h * stride_kh
    V += off_z * stride_vz + off_h * stride_vh
    DO += off_z * stride_doz + off_h * stride_doh
    DQ += off_z * stride_dqz + off_h * stride_dqh

    offs_m = start_m * BLOCK_M2 + tl.arange(0, BLOCK_M2)
    offs_n = tl.arange(0, BLOCK_N2)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_Q
    mask_d = offs_d < HEAD_DIM
    mask_md = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=mask_md, other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=mask_md, other=0.0)
    lse = tl.load(LSE + off_hz * N_Q + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(Delta + off_hz * N_Q + offs_m, mask=mask_m, other=0.0)
    kt_ptrs = K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # (BLOCK_D, BLOCK_N2)
    vt_ptrs = V + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd  # (BLOCK_D, BLOCK_N2)

    dq = tl.zeros([BLOCK_M2, BLOCK_D], tl.float32)
    for start_n in range(0, N_KV, BLOCK_N2):
        mask_n = start_n + offs_n < N_KV
        mask_dn = mask_d[:, None] & mask_n[None, :]
        kt = tl.load(kt_ptrs + start_n * stride_kn, mask=mask_dn, other=0.0)
        vt = tl.load(vt_ptrs + start_n * stride_vn, mask=mask_dn, other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale - lse[:, None]
        # A padded key (k = 0) would get weight exp2(-lse), inf for very negative logits, and inf * 0 = NaN.
        p = tl.exp2(tl.where(mask_n[None, :], s, float("-inf")))
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)

    dq *= sm_scale
    tl.store(DQ + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=mask_md)


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
    _attention_fwd_kernel[grid](
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
    _attention_bwd_preprocess_kernel[(triton.cdiv(n_q, _PRE_BLOCK_M), b * h)](
        out, do, delta, *out.stride(), *do.stride(), h, n_q,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=_PRE_BLOCK_M,
    )  # fmt: skip
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    grid_kv = lambda meta: (triton.cdiv(n_kv, meta["BLOCK_N1"]), b * h)  # noqa: E731
    _attention_bwd_dkdv_kernel[grid_kv](
        q, k, v, do, dk, dv, lse, delta, scale * LOG2E, scale,
        *strides, *dk.stride(), *dv.stride(), h, n_q, n_kv,
        HEAD_DIM=d, BLOCK_D=block_d, DOT_PRECISION=precision,
    )  # fmt: skip
    grid_q = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M2"]), b * h)  # noqa: E731
    _attention_bwd_dq_kernel[grid_q](
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
        return dict(q=selfcheck.marked(q[:1, :1], q), k=selfcheck.marked(k[:1, :1], k),
                    v=selfcheck.marked(v[:1, :1], v), scale=scale)

    return selfcheck.use_triton("attention", key, sample, q, strict=strict)


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, backend: str = "auto") -> Tensor:
    """Non-causal attention, softmax(q kᵀ · scale) v, differentiable in q, k and v.

    Args:
        q: [B, H, Nq, D]; k, v: [B, H, Nkv, D]; one dtype (fp32, fp16 or bf16; fp64 on the torch backends),
            one device, any strides. Nkv >= 1; Nq = 0 gives an empty output (and zero dK, dV).
        scale: a finite number; defaults to D ** -0.5.
        backend: "auto" (Triton on CUDA, SDPA elsewhere; also SDPA where the Triton kernel does not
            apply: fp64, head dims outside 32/64/80/96/128), "triton", "torch" (SDPA), "eager", "xformers".
    Returns:
        [B, H, Nq, D] in the input dtype; softmax statistics and products are accumulated in fp32.
        A bad input raises ValueError (TypeError for a dtype) naming it, alike for every backend.
    """
    _check_inputs(q, k, v, scale)
    if backend == "auto" and (q.dtype not in SUPPORTED_DTYPES or q.shape[-1] not in SUPPORTED_HEAD_DIMS):
        backend = "torch"
    requested, backend = backend, resolve_backend(backend, q, "attention", extra=("eager", "xformers"))
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
