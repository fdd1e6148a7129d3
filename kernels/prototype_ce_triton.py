"""Triton kernels of the prototype cross-entropy (the op itself is `prototype_ce.prototype_cross_entropy`).

Row-wise kernels around cuBLAS GEMMs (kernels_notes.md section 3): the forward GEMM multiplies the *raw* anchors
by the normalised prototypes, and the row kernel folds each row's L2 normalisation in as a scale,
s = (a·p̂) / (max(‖a‖, eps) τ), so no normalised copy of the anchors is written. One program owns BLOCK_M whole
rows of K prototypes (K = 1024 in MSN, so a row fits one tile), which is what makes per-row softmax statistics and
per-program column sums possible without atomics. Forward: prototype norm, GEMM, one row kernel, two small sums.
Backward: one row kernel that overwrites the logits with ∂L/∂s (Liger style), two GEMMs, two normalisation
backwards. Maths runs in the dtype of the logits buffer: fp32, or fp64 for fp64 inputs (tests). Scalar
arguments are Python floats, which compiled Triton passes as fp32 (the interpreter keeps them exact).
"""

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
    X, G, DX, n_rows, n_cols, stride_xr, stride_xd, stride_gr, stride_dxr,
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
    tl.store(DX + rows[:, None] * stride_dxr + cols[None, :], (g - x * proj[:, None]).to(DX.dtype.element_ty), mask=m)


@triton.jit
def _prototype_ce_fwd_kernel(
    S, A, Q, LSE, RNORM, CE_PART, P_PART,
    n_rows, n_batch, n_protos, n_dim, stride_sr, stride_ar, stride_ad, stride_qb, stride_qk, inv_tau, inv_rows,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Per anchor row i: s = a·p̂ / (‖a‖ τ) (written back in place), lse, and CE_i = -Σ q_{i mod B} (s - lse).
    # Per program: Σ over its rows of CE_i / N and of softmax(s) / N, each into its own slot of CE_PART and
    # P_PART (deterministic partial sums of the mean CE and of the mean prediction; no atomics).
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
    s = tl.where(col_ok[None, :], s, float("-inf"))  # padding rows stay finite (all zeros)
    mx = tl.max(s, 1)
    lse = mx + tl.log(tl.sum(tl.exp(s - mx[:, None]), 1))
    log_p = tl.where(m, s - lse[:, None], 0.0)
    p = tl.where(m, tl.exp(log_p), 0.0)
    # The targets repeat over views: anchor row i (view-major) pairs with target row i mod B.
    q = tl.load(Q + (rows % n_batch)[:, None] * stride_qb + cols[None, :] * stride_qk, mask=m, other=0.0).to(acc)
    tl.store(ptrs, s, mask=m)
    tl.store(LSE + rows, lse, mask=row_ok)
    tl.store(RNORM + rows, rnorm, mask=row_ok)
    tl.store(CE_PART + pid, -tl.sum(tl.sum(q * log_p, 1), 0) * inv_rows)
    tl.store(P_PART + pid * n_protos + cols, tl.sum(p, 0) * inv_rows, mask=col_ok)


@triton.jit
def _prototype_ce_bwd_kernel(
    S, LSE, RNORM, Q, G_CE, G_MEAN, n_rows, n_batch, n_protos, stride_sr, stride_qb, stride_qk, scale,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # In place s -> ∂L/∂s · rnorm·scale, scale = 1/(τN), where with g = ∂L/∂ce and γ = ∂L/∂mean_probs
    #   N ∂L/∂s_i = g (p_i Σq - q_{i mod B}) + p_i ⊙ (γ - <γ, p_i>)
    # (the rnorm/τ factor lets the backward GEMMs give ∂L/∂p̂ and rnorm·∂L/∂â directly).
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    cols = tl.arange(0, BLOCK_K)
    col_ok = cols < n_protos
    m = row_ok[:, None] & col_ok[None, :]
    acc = S.dtype.element_ty
    ptrs = S + rows[:, None] * stride_sr + cols[None, :]
    s = tl.load(ptrs, mask=m, other=float("-inf"))
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    p = tl.where(m, tl.exp(s - lse[:, None]), 0.0)
    q = tl.load(Q + (rows % n_batch)[:, None] * stride_qb + cols[None, :] * stride_qk, mask=m, other=0.0).to(acc)
    g = tl.load(G_CE).to(acc)
    gamma = tl.load(G_MEAN + cols, mask=col_ok, other=0.0).to(acc)
    ds = g * (p * tl.sum(q, 1)[:, None] - q) + p * (gamma[None, :] - tl.sum(p * gamma[None, :], 1)[:, None])
    rnorm = tl.load(RNORM + rows, mask=row_ok, other=0.0)
    tl.store(ptrs, ds * (rnorm * scale)[:, None], mask=m)


# ----------------------------------------------------------------------------------------------- launchers


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every kernel output is allocated here (the tests poison it to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _tile(n_cols: int, block_m: int | None) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_COLS, num_warps) for whole rows: about 2048 elements a program on a GPU (ptxas, sm_90,
    8 warps: 60-80 registers, no spills), 64K under the interpreter (fewer programs)."""
    if n_cols > MAX_COLS:
        raise ValueError(f"prototype_cross_entropy: rows of {n_cols} elements exceed the supported {MAX_COLS}")
    block = next_power_of_2(n_cols)
    if block_m is None:
        block_m = max(1, min(64, (65536 if interpreting() else 2048) // block))
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


def l2norm_bwd(x: torch.Tensor, g: torch.Tensor, prescaled: bool, block_m: int | None = None) -> torch.Tensor:
    """Backward of F.normalize(x), returned in x's dtype.

    x: [R, d] the raw input; g: [R, d] ∂L/∂y in the accumulation dtype, or ∂L/∂y / max(‖x‖, eps) when `prescaled`.
    """
    n, d = x.shape
    assert g.shape == x.shape and g.stride(1) == 1
    bm, bd, warps = _tile(d, block_m)
    dx = _empty((n, d), x.dtype, x.device)
    _l2norm_bwd_kernel[(triton.cdiv(n, bm),)](
        x, g, dx, n, d, x.stride(0), x.stride(1), g.stride(0), dx.stride(0),
        PRESCALED=prescaled, BLOCK_M=bm, BLOCK_D=bd, num_warps=warps,
    )
    return dx


def prototype_ce_fwd(logits: torch.Tensor, anchor: torch.Tensor, targets: torch.Tensor, inv_tau: float,
                     block_m: int | None = None):
    """Turns logits [N, K] (raw a @ p̂ᵀ, fp32/fp64, row-contiguous) into the scaled logits s in place.

    anchor: [N, d] raw embeddings; targets: [B, K] (any strides), N = V*B. Returns (ce 0-dim, mean_probs [K],
    lse [N], rnorm [N]) in the logits' dtype: the mean over rows of -Σ_k q log p, the mean over rows of p,
    and per row the log-sum-exp of s and 1 / max(‖a‖, eps).
    """
    (n, k), (b, d) = logits.shape, (targets.shape[0], anchor.shape[1])
    assert logits.stride(1) == 1 and anchor.shape[0] == n and targets.shape[1] == k and n % b == 0
    bm, bk, warps = _tile(k, block_m)
    grid = triton.cdiv(n, bm)
    acc, dev = logits.dtype, logits.device
    lse, rnorm, ce_part = _empty((n,), acc, dev), _empty((n,), acc, dev), _empty((grid,), acc, dev)
    p_part = _empty((grid, k), acc, dev)
    _prototype_ce_fwd_kernel[(grid,)](
        logits, anchor, targets, lse, rnorm, ce_part, p_part,
        n, b, k, d, logits.stride(0), anchor.stride(0), anchor.stride(1), targets.stride(0), targets.stride(1),
        inv_tau, 1.0 / n, BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=next_power_of_2(d), num_warps=warps,
    )
    return ce_part.sum(), p_part.sum(dim=0), lse, rnorm


def prototype_ce_bwd(logits: torch.Tensor, lse: torch.Tensor, rnorm: torch.Tensor, targets: torch.Tensor,
                     grad_ce: torch.Tensor, grad_mean: torch.Tensor, tau: float, block_m: int | None = None) -> None:
    """Overwrites the scaled logits [N, K] of `prototype_ce_fwd` with ∂L/∂s · rnorm/τ, in place.

    grad_ce: 0-dim ∂L/∂ce and grad_mean: [K] ∂L/∂mean_probs, both device tensors (no host sync).
    """
    n, k = logits.shape
    assert grad_ce.numel() == 1 and grad_mean.shape == (k,) and grad_mean.is_contiguous()
    bm, bk, warps = _tile(k, block_m)
    _prototype_ce_bwd_kernel[(triton.cdiv(n, bm),)](
        logits, lse, rnorm, targets, grad_ce, grad_mean,
        n, targets.shape[0], k, logits.stride(0), targets.stride(0), targets.stride(1), 1.0 / (tau * n),
        BLOCK_M=bm, BLOCK_K=bk, num_warps=warps,
    )
