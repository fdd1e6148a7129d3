"""Triton kernels of the fused MSN prototype loss (the op itself is `prototype_loss.msn_prototype_loss`).

Row-wise kernels around two cuBLAS GEMMs (kernels_notes.md section 3): the GEMMs multiply the *raw*
embeddings by the normalised prototypes, and each row kernel folds in the row's L2 normalisation as
a scale, s = (x·p̂) / (max(‖x‖, eps) τ), so no normalised copy of the embeddings is written. One
program owns BLOCK_M whole rows of K prototypes (K = 1024 in MSN, so a row fits one tile), which is
what makes per-row softmax statistics and per-program column sums possible without atomics.
A step is 7 launches forward (prototype norm, 2 GEMMs, targets with Sinkhorn, anchor rows, a column
sum, gradient rows + statistics) and 4 backward, plus 3 casts for bf16 embeddings, against 94-119
aten ops in the eager chain (torch profiler on a CPU, Sinkhorn off/on), which also syncs for its statistics;
this never does. Maths runs in the dtype of the logits buffer: fp32, or fp64 for fp64 inputs
(tests). Scalar arguments are Python floats, which compiled Triton passes as fp32 (the interpreter
keeps them exact).
"""

import math

import torch

from ._utils import interpreting, next_power_of_2, tl, triton

MAX_COLS = 32768  # a whole row of prototypes (or of embedding features) lives in one tile
# The kernels hard-code F.normalize's eps, 1e-12: x / max(‖x‖, eps).


@triton.jit
def _row_rnorm(X, rows, row_ok, n_cols, stride_xr, stride_xd, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    """1 / max(‖x_row‖, eps) for BLOCK_M rows of X, computed in ACC."""
    cols = tl.arange(0, BLOCK_D)
    m = row_ok[:, None] & (cols < n_cols)[None, :]
    x = tl.load(X + rows[:, None] * stride_xr + cols[None, :] * stride_xd, mask=m, other=0.0).to(ACC)
    return 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, 1)), 1e-12)


@triton.jit
def _l2norm_fwd_kernel(
    X, Y, n_rows, n_cols, stride_xr, stride_xd, stride_yr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    m = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    x = tl.load(X + rows[:, None] * stride_xr + cols[None, :] * stride_xd, mask=m, other=0.0).to(Y.dtype.element_ty)
    rnorm = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, 1)), 1e-12)
    tl.store(Y + rows[:, None] * stride_yr + cols[None, :], x * rnorm[:, None], mask=m)


@triton.jit
def _l2norm_bwd_kernel(
    X, G, DX, GRAD_OUT, n_rows, n_cols, stride_xr, stride_xd, stride_gr, stride_dxr,
    PRESCALED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # y = x / max(‖x‖, eps);  with G' = G / max(‖x‖, eps):  dx = G' - x (x·G') / ‖x‖²  (projection only if ‖x‖ > eps)
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    m = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    acc = G.dtype.element_ty
    x = tl.load(X + rows[:, None] * stride_xr + cols[None, :] * stride_xd, mask=m, other=0.0).to(acc)
    g = tl.load(G + rows[:, None] * stride_gr + cols[None, :], mask=m, other=0.0)
    norm = tl.sqrt(tl.sum(x * x, 1))
    rnorm = 1.0 / tl.maximum(norm, 1e-12)
    if not PRESCALED:  # G is ∂L/∂y; the prescaled form (G already times 1/‖x‖) comes from the anchor path
        g = g * rnorm[:, None]
    proj = tl.where(norm > 1e-12, tl.sum(x * g, 1) * rnorm * rnorm, 0.0)
    dx = (g - x * proj[:, None]) * tl.load(GRAD_OUT).to(acc)
    tl.store(DX + rows[:, None] * stride_dxr + cols[None, :], dx.to(DX.dtype.element_ty), mask=m)

@triton.jit
def _target_probs_kernel(
    S, X, n_rows, rows_per_program, n_protos, n_dim, stride_sr, stride_xr, stride_xd, inv_temp,
    SINKHORN_ITERS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # In place on raw logits x·p̂: p⁺ = softmax(x̂·p̂ / (τT)), the sharpened target (no pow needed).
    # With SINKHORN_ITERS > 0 a single program holds every target row and also balances them.
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    col_ok = cols < n_protos
    acc = S.dtype.element_ty
    colsum = tl.zeros([BLOCK_K], dtype=acc)
    for r0 in range(0, rows_per_program, BLOCK_M):  # one block, or all rows for Sinkhorn
        rows = pid * rows_per_program + r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        m = row_ok[:, None] & col_ok[None, :]
        scale = _row_rnorm(X, rows, row_ok, n_dim, stride_xr, stride_xd, acc, BLOCK_D) * inv_temp
        ptrs = S + rows[:, None] * stride_sr + cols[None, :]
        s = tl.load(ptrs, mask=m, other=0.0) * scale[:, None]
        s = tl.where(col_ok[None, :], s, float("-inf"))  # padding rows stay finite (all zeros)
        e = tl.exp(s - tl.max(s, 1)[:, None])
        q = tl.where(m, e / tl.sum(e, 1)[:, None], 0.0)
        tl.store(ptrs, q, mask=m)
        colsum += tl.sum(q, 0)
    if SINKHORN_ITERS > 0:
        # Sinkhorn-Knopp as scalings Q = diag(r) Q0 diag(c) of Q0 = p⁺ᵀ: the prototype step sets
        # r = 1/(K Q0 c), the sample step c = 1/(B Q0ᵀ r), and the result B·Q0 r c has unit rows. Same
        # maths as `sinkhorn`'s alternating normalisations (its first division by the total cancels).
        tl.debug_barrier()  # the passes below re-read what other threads of this program wrote
        r = tl.where(col_ok, 1.0 / (n_protos * tl.where(col_ok, colsum, 1.0)), 0.0)
        for _ in range(SINKHORN_ITERS - 1):
            colsum = tl.zeros([BLOCK_K], dtype=acc)
            for r0 in range(0, n_rows, BLOCK_M):
                rows = r0 + tl.arange(0, BLOCK_M)
                row_ok = rows < n_rows
                m = row_ok[:, None] & col_ok[None, :]
                q = tl.load(S + rows[:, None] * stride_sr + cols[None, :], mask=m, other=0.0)
                c = tl.where(row_ok, 1.0 / (n_rows * tl.where(row_ok, tl.sum(q * r[None, :], 1), 1.0)), 0.0)
                colsum += tl.sum(q * c[:, None], 0)
            r = tl.where(col_ok, 1.0 / (n_protos * tl.where(col_ok, colsum, 1.0)), 0.0)
        for r0 in range(0, n_rows, BLOCK_M):  # the last sample step, then x B: rows of Q0 r normalised
            rows = r0 + tl.arange(0, BLOCK_M)
            m = (rows < n_rows)[:, None] & col_ok[None, :]
            ptrs = S + rows[:, None] * stride_sr + cols[None, :]
            q = tl.load(ptrs, mask=m, other=0.0) * r[None, :]
            tl.store(ptrs, q / tl.where(rows < n_rows, tl.sum(q, 1), 1.0)[:, None], mask=m)


@triton.jit
def _prototype_loss_fwd_kernel(
    S, A, Q, LSE, RNORM, CE, PART, QMAX, QARG,
    n_rows, n_batch, n_protos, n_dim, stride_sr, stride_ar, stride_ad, stride_qb, stride_qk, inv_tau, inv_rows,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Per anchor row i: s = a·p̂ /(‖a‖ τ) (written back in place), lse, CE_i = -Σ q⁺_{i mod B} (s - lse);
    # per program: Σ_rows softmax(s) / N into its own row of PART (deterministic partial sums of p̄).
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    cols = tl.arange(0, BLOCK_K)
    col_ok = cols < n_protos
    m = row_ok[:, None] & col_ok[None, :]
    acc = S.dtype.element_ty
    rnorm = _row_rnorm(A, rows, row_ok, n_dim, stride_ar, stride_ad, acc, BLOCK_D)
    ptrs = S + rows[:, None] * stride_sr + cols[None, :]
    s = tl.load(ptrs, mask=m, other=0.0) * (rnorm * inv_tau)[:, None]
    s = tl.where(col_ok[None, :], s, float("-inf"))
    mx = tl.max(s, 1)
    lse = mx + tl.log(tl.sum(tl.exp(s - mx[:, None]), 1))
    log_p = tl.where(m, s - lse[:, None], 0.0)
    p = tl.where(m, tl.exp(log_p), 0.0)
    # The targets repeat over views: anchor row i (view-major) pairs with target row i mod B.
    q = tl.load(Q + (rows % n_batch)[:, None] * stride_qb + cols[None, :] * stride_qk, mask=m, other=0.0).to(acc)
    tl.store(ptrs, s, mask=m)
    tl.store(LSE + rows, lse, mask=row_ok)
    tl.store(RNORM + rows, rnorm, mask=row_ok)
    tl.store(CE + rows, -tl.sum(q * log_p, 1), mask=row_ok)
    tl.store(PART + pid * n_protos + cols, tl.sum(p, 0) * inv_rows, mask=col_ok)
    # View 0's rows see every target row once: the target statistics come from there.
    first = row_ok & (rows < n_batch)
    q_valid = tl.where(m, q, -1.0)
    tl.store(QMAX + rows, tl.max(q_valid, 1), mask=first)
    tl.store(QARG + rows, tl.argmax(q_valid, 1), mask=first)


@triton.jit
def _prototype_loss_bwd_kernel(
    S, LSE, RNORM, Q, PSUM, CE, QMAX, QARG, LOSS, STATS,
    n_rows, n_batch, n_protos, stride_sr, stride_qb, stride_qk, inv_world, scale, me_max_weight, log_k,
    WRITE_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
):
    # p̄ = PSUM / world: the all-reduced mean prediction. WRITE_GRAD: in place s -> ∂L/∂s · rnorm·scale,
    # scale = 1/(τN), where  N ∂L/∂s_i = p_i Σq - q_i + λ p_i ⊙ (log p̄ - Σ_j p_ij log p̄_j)
    # (the rnorm/τ factor lets the backward GEMMs give ∂L/∂p̂ and rnorm·∂L/∂â directly).
    # Program 0 also writes the loss and the logged statistics (CE, ME-MAX, #targets, mean max p⁺).
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    col_ok = cols < n_protos
    acc = S.dtype.element_ty
    p_mean = tl.load(PSUM + cols, mask=col_ok, other=0.0) * inv_world
    log_pbar = tl.log(tl.where(col_ok, p_mean, 1.0))
    if WRITE_GRAD:
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        m = row_ok[:, None] & col_ok[None, :]
        ptrs = S + rows[:, None] * stride_sr + cols[None, :]
        s = tl.load(ptrs, mask=m, other=float("-inf"))
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
        p = tl.where(m, tl.exp(s - lse[:, None]), 0.0)
        q = tl.load(Q + (rows % n_batch)[:, None] * stride_qb + cols[None, :] * stride_qk, mask=m, other=0.0)
        q = q.to(acc)
        c = tl.sum(p * log_pbar[None, :], 1)
        ds = p * tl.sum(q, 1)[:, None] - q + me_max_weight * p * (log_pbar[None, :] - c[:, None])
        rnorm = tl.load(RNORM + rows, mask=row_ok, other=0.0)
        tl.store(ptrs, ds * (rnorm * scale)[:, None], mask=m)
    if pid == 0:
        me_max = tl.sum(tl.where(p_mean > 0, p_mean * log_pbar, 0.0), 0) + log_k  # Σ xlogy(p̄, p̄) + log K
        ce = tl.zeros([BLOCK_K], dtype=acc)
        for r0 in range(0, n_rows, BLOCK_K):
            ce += tl.load(CE + r0 + cols, mask=r0 + cols < n_rows, other=0.0)
        ce_mean = tl.sum(ce, 0) / n_rows
        q_max = tl.zeros([BLOCK_B], dtype=acc)
        hit = tl.zeros([BLOCK_K], dtype=tl.int32)  # 1 where a prototype is some target's argmax
        for b0 in range(0, n_batch, BLOCK_B):
            b = b0 + tl.arange(0, BLOCK_B)
            q_max += tl.load(QMAX + b, mask=b < n_batch, other=0.0)
            arg = tl.load(QARG + b, mask=b < n_batch, other=-1)
            hit = tl.maximum(hit, tl.max((arg[:, None] == cols[None, :]).to(tl.int32), 0))
        tl.store(LOSS, ce_mean + me_max_weight * me_max)
        tl.store(STATS, ce_mean)
        tl.store(STATS + 1, me_max)
        tl.store(STATS + 2, tl.sum(hit, 0).to(acc))
        tl.store(STATS + 3, tl.sum(q_max, 0) / n_batch)


# ----------------------------------------------------------------------------------------------- launchers


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every kernel output is allocated here (the tests poison it to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _tile(n_cols: int, block_m: int | None, elems: int = 2048) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_COLS, num_warps) for whole rows: about `elems` elements a program on a GPU
    (ptxas, sm_90, 8 warps: 60-80 registers, no spills), 64K under the interpreter (fewer programs)."""
    if n_cols > MAX_COLS:
        raise ValueError(f"msn_prototype_loss: rows of {n_cols} elements exceed the supported {MAX_COLS}")
    block = next_power_of_2(n_cols)
    if block_m is None:
        block_m = max(1, min(64, (65536 if interpreting() else elems) // block))
    if block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two, got {block_m}")
    return block_m, block, min(16, max(4, block_m * block // 256))


def l2norm_fwd(x: torch.Tensor, acc: torch.dtype, block_m: int | None = None) -> torch.Tensor:
    """[R, d] any float dtype -> [R, d] x / max(‖x‖, 1e-12) in `acc` (contiguous); maths in `acc`."""
    n, d = x.shape
    bm, bd, warps = _tile(d, block_m)
    y = _empty((n, d), acc, x.device)
    _l2norm_fwd_kernel[(triton.cdiv(n, bm),)](
        x, y, n, d, x.stride(0), x.stride(1), y.stride(0), BLOCK_M=bm, BLOCK_D=bd, num_warps=warps
    )
    return y


def l2norm_bwd(
    x: torch.Tensor, g: torch.Tensor, grad_out: torch.Tensor, prescaled: bool, block_m: int | None = None
) -> torch.Tensor:
    """Backward of F.normalize(x) times a scalar upstream gradient, returned in x's dtype.

    x: [R, d] the raw input; g: [R, d] ∂L/∂y in the accumulation dtype (or ∂L/∂y / max(‖x‖, eps) when
    `prescaled`); grad_out: [1] tensor multiplying the result (no host sync).
    """
    n, d = x.shape
    assert g.shape == x.shape and g.stride(1) == 1 and grad_out.numel() == 1
    bm, bd, warps = _tile(d, block_m)
    dx = _empty((n, d), x.dtype, x.device)
    _l2norm_bwd_kernel[(triton.cdiv(n, bm),)](
        x, g, dx, grad_out, n, d, x.stride(0), x.stride(1), g.stride(0), dx.stride(0),
        PRESCALED=prescaled, BLOCK_M=bm, BLOCK_D=bd, num_warps=warps,
    )
    return dx



def target_probs_(
    raw: torch.Tensor, x: torch.Tensor, inv_temp: float, sinkhorn_iters: int = 0, block_m: int | None = None
) -> torch.Tensor:
    """In place on raw [B, K] = x @ p̂ᵀ (fp32/fp64, row-contiguous): softmax(raw / (‖x‖ temp)) by rows.

    sinkhorn_iters > 0 also balances the rows as `prototype_loss.sinkhorn` does for one process; one
    program then holds all B rows (B is the per-GPU batch, 64-128 in MSN).
    """
    (b, k), d = raw.shape, x.shape[1]
    assert raw.stride(1) == 1 and x.shape[0] == b
    bm, bk, warps = _tile(k, block_m, elems=4096 if sinkhorn_iters > 0 else 2048)  # Sinkhorn: 1 wide program
    rows_per_program = b if sinkhorn_iters > 0 else bm
    _target_probs_kernel[(triton.cdiv(b, rows_per_program),)](
        raw, x, b, rows_per_program, k, d, raw.stride(0), x.stride(0), x.stride(1), inv_temp,
        SINKHORN_ITERS=sinkhorn_iters, BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=next_power_of_2(d), num_warps=warps,
    )
    return raw


def prototype_loss_fwd(logits: torch.Tensor, anchor: torch.Tensor, q: torch.Tensor, inv_tau: float, block_m=None):
    """Row statistics of the anchors; turns logits [N, K] (raw a @ p̂ᵀ) into the scaled logits in place.

    anchor: [N, d] raw embeddings; q: [B, K] targets (any strides), N = V*B. Returns lse, rnorm and
    per-row CE [N], this process's mean prediction [K], and max/argmax (int64) [B] of the target rows.
    """
    (n, k), (b, d) = logits.shape, (q.shape[0], anchor.shape[1])
    assert logits.stride(1) == 1 and anchor.shape[0] == n and q.shape[1] == k and n % b == 0
    bm, bk, warps = _tile(k, block_m)
    grid = triton.cdiv(n, bm)
    acc, dev = logits.dtype, logits.device
    lse, rnorm, ce = (_empty((n,), acc, dev) for _ in range(3))
    part = _empty((grid, k), acc, dev)
    q_max, q_arg = _empty((b,), acc, dev), _empty((b,), torch.int64, dev)
    _prototype_loss_fwd_kernel[(grid,)](
        logits, anchor, q, lse, rnorm, ce, part, q_max, q_arg,
        n, b, k, d, logits.stride(0), anchor.stride(0), anchor.stride(1), q.stride(0), q.stride(1), inv_tau, 1.0 / n,
        BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=next_power_of_2(d), num_warps=warps,
    )
    return lse, rnorm, ce, part.sum(dim=0), q_max, q_arg


def prototype_loss_bwd_(
    logits, lse, rnorm, q, p_sum, ce, q_max, q_arg, *, world: int, tau: float, me_max_weight: float,
    write_grad: bool, block_m: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and statistics; with write_grad also scaled logits [N, K] -> ∂L/∂s · rnorm/(τN) in place.

    p_sum: [K] the sum over the `world` processes of their mean predictions. Returns (loss 0-dim,
    stats [4] = CE, ME-MAX, number of distinct target argmaxes, mean max target probability).
    """
    n, k = logits.shape
    assert p_sum.is_contiguous() and p_sum.dtype == logits.dtype
    bm, bk, warps = _tile(k, block_m)
    loss, stats = _empty((), logits.dtype, logits.device), _empty((4,), logits.dtype, logits.device)
    _prototype_loss_bwd_kernel[(triton.cdiv(n, bm) if write_grad else 1,)](
        logits, lse, rnorm, q, p_sum, ce, q_max, q_arg, loss, stats,
        n, q.shape[0], k, logits.stride(0), q.stride(0), q.stride(1), 1.0 / world, 1.0 / (tau * n), me_max_weight,
        math.log(k), WRITE_GRAD=write_grad, BLOCK_M=bm, BLOCK_K=bk, BLOCK_B=max(1, 16384 // bk), num_warps=warps,
    )
    return loss, stats
