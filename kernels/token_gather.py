"""Gather the kept rows of already-embedded tokens, adding their position embedding on the way.

`gather_tokens(tokens, keep_idx, pos_embed)` = `tokens[b, keep_idx[b]] + pos_embed[keep_idx[b]]` in one
pass, for ViTs that drop tokens after the patch embedding (timm PatchDropout, MAE, the MSN reference
code). Its backward is a scatter of the output gradient into zeros. MSN-fast's own masked view uses
`embed_kept_patches` (patch_embed.py), which also skips the projection of the dropped patches; the
index checks and the position-embedding gradient that both ops share live here.
"""

from __future__ import annotations

import torch

from . import selfcheck
from ._utils import calculate_settings, check_dtype, check_same_device, idx_strides, resolve_backend, tl, triton

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _token_gather_fwd_kernel(
    X, Idx, Pos, Out,
    M, T, N, D,
    stride_xb, stride_xn, stride_xd,
    stride_ib, stride_it,
    stride_pn, stride_pd,
    stride_ob, stride_ot, stride_od,
    HAS_POS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # flat output rows m = b * T + t
    row_mask = rows < M
    b = (rows // T).to(tl.int64)
    t = rows % T
    p = tl.load(Idx + b * stride_ib + t * stride_it, mask=row_mask, other=0).to(tl.int64)
    valid = row_mask & (p >= 0) & (p < N)  # an out-of-range index never reads memory: its row becomes NaN
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    mask = valid[:, None] & col_mask[None, :]
    x = tl.load(X + b[:, None] * stride_xb + p[:, None] * stride_xn + cols[None, :] * stride_xd, mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_POS:
        x += tl.load(Pos + p[:, None] * stride_pn + cols[None, :] * stride_pd, mask=mask, other=0.0).to(tl.float32)
    x = tl.where(valid[:, None], x, float("nan"))
    out_ptrs = Out + b[:, None] * stride_ob + t[:, None] * stride_ot + cols[None, :] * stride_od
    tl.store(out_ptrs, x.to(Out.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _token_gather_bwd_kernel(
    DY, Idx, DX,
    M, T, N, D,
    stride_yb, stride_yt, stride_yd,
    stride_ib, stride_it,
    stride_xb, stride_xn, stride_xd,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # Scatter with plain stores: exact when each sample's indices are unique (what validate=True checks).
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    b = (rows // T).to(tl.int64)
    t = rows % T
    p = tl.load(Idx + b * stride_ib + t * stride_it, mask=row_mask, other=0).to(tl.int64)
    valid = row_mask & (p >= 0) & (p < N)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = valid[:, None] & (cols < D)[None, :]
    dy = tl.load(DY + b[:, None] * stride_yb + t[:, None] * stride_yt + cols[None, :] * stride_yd, mask=mask)
    tl.store(DX + b[:, None] * stride_xb + p[:, None] * stride_xn + cols[None, :] * stride_xd, dy, mask=mask)


def _tiles(d: int, m: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps) of both gathers: about 4096 elements a program on 4 warps."""
    return calculate_settings(d, m, per_thread=32)


def token_gather_fwd(
    tokens: torch.Tensor, keep_idx: torch.Tensor, pos: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Launch the gather. tokens [B, N, D] (any strides), keep_idx [K] or [B, K], pos [N, D] or None.

    `out` ([B, K, D], tokens' dtype) may be given, e.g. NaN-filled by a test to show unwritten elements.
    """
    bsz, n, d = tokens.shape
    k = keep_idx.shape[-1]
    if out is None:
        out = torch.empty(bsz, k, d, dtype=tokens.dtype, device=tokens.device)
    assert out.shape == (bsz, k, d) and out.dtype == tokens.dtype, "token_gather_fwd: bad out buffer"
    m = bsz * k
    block_m, block_d, num_warps = _tiles(d, m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(d, block_d))
    pos_t = tokens if pos is None else pos  # dummy pointer when there is no position embedding
    _token_gather_fwd_kernel[grid](
        tokens, keep_idx, pos_t, out,
        m, k, n, d,
        *tokens.stride(), *idx_strides(keep_idx), pos_t.stride(-2), pos_t.stride(-1), *out.stride(),
        HAS_POS=pos is not None, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    return out


def token_gather_bwd(dy: torch.Tensor, keep_idx: torch.Tensor, n: int) -> torch.Tensor:
    """Scatter dy [B, K, D] into zeros [B, N, D] (dy's dtype) at the kept rows."""
    bsz, k, d = dy.shape
    dx = torch.zeros(bsz, n, d, dtype=dy.dtype, device=dy.device)
    m = bsz * k
    block_m, block_d, num_warps = _tiles(d, m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(d, block_d))
    _token_gather_bwd_kernel[grid](
        dy, keep_idx, dx, m, k, n, d, *dy.stride(), *idx_strides(keep_idx), *dx.stride(),
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    return dx


def check_keep_idx(op: str, keep_idx: torch.Tensor, batch: int, n: int, validate: bool) -> None:
    """Shape and dtype checks on keep_idx ([K] shared or [B, K] per sample, int32/int64, values in [0, n)).

    With `validate`, also checks the values: in range and unique within each sample. That costs a sort of
    the [B, K] indices, a min/max and ONE host-device synchronisation (a `.tolist()`).
    """
    check_dtype(op, "keep_idx", keep_idx, INDEX_DTYPES)
    if not (keep_idx.dim() == 1 or (keep_idx.dim() == 2 and keep_idx.shape[0] == batch)):
        shape = tuple(keep_idx.shape)
        raise ValueError(f"{op}: keep_idx must be [K] (shared) or [B={batch}, K] (per sample); got {shape}")
    k = keep_idx.shape[-1]
    if k == 0:
        raise ValueError(f"{op}: keep_idx is empty (K = 0); keep at least one patch")
    if k > n:
        raise ValueError(f"{op}: K = {k} kept indices but only N = {n} patches, so some must repeat")
    if not validate:
        return
    s = keep_idx.sort(dim=-1).values
    stats = torch.stack([s[..., 0].min().long(), s[..., -1].max().long(), (s[..., 1:] == s[..., :-1]).sum()])
    lo, hi, dups = stats.tolist()  # the one synchronisation
    if lo < 0 or hi >= n:
        raise IndexError(f"{op}: keep_idx out of range: values in [{lo}, {hi}], patch indices must be in [0, {n})")
    if dups:
        raise ValueError(f"{op}: keep_idx has {dups} duplicate index(es) within a sample; kept patches must be unique")


def check_pos_embed(op: str, pos_embed: torch.Tensor, n: int, d: int) -> torch.Tensor:
    """Accept pos_embed [N, D] or [1, N, D] (patch positions only) and return the [N, D] view."""
    check_dtype(op, "pos_embed", pos_embed, SUPPORTED_DTYPES + (torch.float64,))
    if not (pos_embed.dim() == 2 or (pos_embed.dim() == 3 and pos_embed.shape[0] == 1)):
        raise ValueError(f"{op}: pos_embed must be [N, D] or [1, N, D]; got {tuple(pos_embed.shape)}")
    pos = pos_embed.reshape(pos_embed.shape[-2:])
    if pos.shape[0] == n + 1 and pos.shape[1] == d:
        raise ValueError(
            f"{op}: pos_embed has {n + 1} rows for {n} patches, so it includes the CLS slot; pass the patch part "
            "only (pos_embed[:, 1:]) and add pos_embed[:, :1] to the CLS token yourself"
        )
    if tuple(pos.shape) != (n, d):
        raise ValueError(f"{op}: pos_embed is {tuple(pos_embed.shape)}; expected [{n}, {d}] or [1, {n}, {d}]")
    return pos


def pos_embed_grad(dy: torch.Tensor, keep_idx: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Gradient of a [N, D] position table gathered by keep_idx: dy [B, K, D] summed into its rows (fp32)."""
    d = dy.shape[-1]
    dpos = torch.zeros(n, d, dtype=torch.float32, device=dy.device)
    if keep_idx.dim() == 1:  # shared: sum over the batch first, then one K-row scatter
        dpos.index_add_(0, keep_idx, dy.sum(0, dtype=torch.float32))
    else:
        dpos.index_add_(0, keep_idx.reshape(-1), dy.reshape(-1, d).float())
    return dpos.to(dtype)


def gather_rows(x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """x [B, N, D] -> x[b, keep_idx[b]] [B, K, D] in torch (shared [K] or per-sample [B, K] indices)."""
    if keep_idx.dim() == 1:
        return x[:, keep_idx.long()]
    return torch.gather(x, 1, keep_idx.long()[..., None].expand(-1, -1, x.shape[-1]))


def gather_tokens_ref(
    tokens: torch.Tensor, keep_idx: torch.Tensor, pos_embed: torch.Tensor | None = None
) -> torch.Tensor:
    """Torch reference: gather, then add the gathered position rows in fp32 (fp64 stays fp64).

    tokens [B, N, D]; keep_idx [K] or [B, K]; pos_embed [N, D] or [1, N, D] or None. Returns [B, K, D] in
    tokens' dtype.
    """
    out = gather_rows(tokens, keep_idx)
    if pos_embed is None:
        return out
    acc = torch.float64 if tokens.dtype == torch.float64 else torch.float32
    pos = pos_embed.reshape(pos_embed.shape[-2:])[keep_idx.long()]  # [K, D] or [B, K, D]
    return (out.to(acc) + pos.to(acc)).to(tokens.dtype)


class TokenGatherFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens: torch.Tensor, keep_idx: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(keep_idx)
        ctx.n = tokens.shape[1]
        ctx.pos_dtype = None if pos is None else pos.dtype
        ctx.mark_non_differentiable(keep_idx)
        return token_gather_fwd(tokens, keep_idx, pos)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (keep_idx,) = ctx.saved_tensors
        dtokens = token_gather_bwd(dy, keep_idx, ctx.n) if ctx.needs_input_grad[0] else None
        dpos = pos_embed_grad(dy, keep_idx, ctx.n, ctx.pos_dtype) if ctx.needs_input_grad[2] else None
        return dtokens, None, dpos


def gather_tokens(
    tokens: torch.Tensor,
    keep_idx: torch.Tensor,
    pos_embed: torch.Tensor | None = None,
    *,
    validate: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """out[b, t] = tokens[b, keep_idx[b, t]] (+ pos_embed[keep_idx[b, t]]).

    Args:
        tokens: [B, N, D] fp32/fp16/bf16, any strides (e.g. `x[:, 1:]` to skip a CLS row, without a copy).
        keep_idx: [K] shared by the batch or [B, K] per sample, int32 or int64, values in [0, N).
        pos_embed: None, or [N, D] / [1, N, D] of any float dtype (patch positions only, no CLS slot).
        validate: True (default) checks the values for every backend, at the cost of a sort and ONE host sync:
            an index < 0 or >= N raises IndexError, a duplicate within a sample ValueError. With False (a hot
            loop whose indices are correct by construction) the CALLER guarantees 0 <= keep_idx < N and
            uniqueness per sample; otherwise the result is undefined: the Triton kernel masks the read (an
            out-of-range row comes out NaN, never an out-of-bounds access), torch wraps negative shared indices
            or raises (a device-side assert on CUDA), and a duplicate keeps one row's gradient in Triton.
        backend: "auto" (Triton on CUDA / under the interpreter, torch elsewhere), "triton" or "torch".
    Returns:
        [B, K, D] in tokens' dtype; the position embedding is added in fp32 and rounded once.
        Gradients: tokens (a scatter into zeros, tokens' dtype) and pos_embed (summed in fp32).
    """
    op = "gather_tokens"
    if tokens.dim() != 3:
        raise ValueError(f"{op}: tokens must be [B, N, D]; got {tuple(tokens.shape)}")
    requested, backend = backend, resolve_backend(backend, tokens, op)
    allowed = SUPPORTED_DTYPES + ((torch.float64,) if backend == "torch" else ())
    check_dtype(op, "tokens", tokens, allowed)
    bsz, n, d = tokens.shape
    pos = None if pos_embed is None else check_pos_embed(op, pos_embed, n, d)
    check_same_device(op, tokens=tokens, keep_idx=keep_idx, **({} if pos is None else {"pos_embed": pos}))
    check_keep_idx(op, keep_idx, bsz, n, validate)
    if backend == "torch" or not _self_checked(tokens, keep_idx, pos, strict=requested == "triton"):
        return gather_tokens_ref(tokens, keep_idx, pos)
    return TokenGatherFunction.apply(tokens, keep_idx, pos)


def _self_checked(tokens: torch.Tensor, keep_idx: torch.Tensor, pos: torch.Tensor | None, strict: bool) -> bool:
    """First use per (dtypes, D class, index layout, grad): the kernel against the reference on the first
    two samples (selfcheck.py)."""
    grad = tokens.requires_grad or (pos is not None and pos.requires_grad)
    key = (tokens.dtype, None if pos is None else pos.dtype, selfcheck.size_class(tokens.shape[-1]),
           keep_idx.dim(), keep_idx.dtype, grad)  # fmt: skip

    def sample() -> dict:
        idx = keep_idx[:2] if keep_idx.dim() == 2 else keep_idx
        return dict(
            tokens=selfcheck.marked(tokens[:2], tokens),
            keep_idx=idx,
            pos_embed=selfcheck.marked(pos, pos),
            validate=False,
        )

    return selfcheck.use_triton("gather_tokens", key, sample, tokens, strict=strict)
