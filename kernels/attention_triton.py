"""Triton kernels of the FlashAttention-2-style attention (the op itself is `attention.attention`).

Forward with online softmax in exp2 and the row log-sum-exp (base 2) saved for the backward; backward
split into a Delta = rowsum(O·dO) preprocess, one kernel per key block (dK, dV) and one per query block
(dQ), so no atomics. Any N via masked loads; head dims up to 128 padded to BLOCK_D inside the kernels.
The autotune lists sit with the kernels they tune (only attention autotunes): the interpreter and fp32
get the first config, and so does a GPU under MSN_FAST_AUTOTUNE=0 (faster start-up).
"""

from __future__ import annotations

import os

import torch

from ._utils import interpreting, next_power_of_2, tl, triton


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
PRE_BLOCK_M = 64  # rows per program of the Delta preprocess


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
