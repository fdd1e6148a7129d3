"""Fused patch embedding of the kept patches only: im2col gather + projection + bias + position embedding.

`embed_kept_patches(images, weight, bias, pos_embed, keep_idx)` equals the unfused ViT path
`conv2d(images, weight, bias, stride=P).flatten(2).transpose(1, 2) + pos_embed`, then a gather of the kept
patch indices, but reads only the kept patches' pixels and writes only the kept tokens: one GEMM whose
rows are the kept patches (m = b*K + t) and whose K-dim is C*P*P in the (c, i, j) order of the conv weight.
For MSN's masked anchor view (70% of L/7's patches dropped) this skips most of the first layer's traffic.
Design notes: kernels_notes.md section 4 (no published kernel fuses this; cf. implicit-GEMM conv).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import selfcheck
from ._utils import (
    check_dtype,
    check_same_device,
    idx_strides,
    next_power_of_2,
    resolve_backend,
    tl,
    triton,
)
from .token_gather import check_keep_idx, check_pos_embed, gather_rows, pos_embed_grad

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _kept_patch_rows(
    Idx, rows, M, T, N, GW, stride_ib, stride_it, stride_xb, stride_xh, stride_xw, PATCH: tl.constexpr
):
    """Per flat row m = b*T + t: (b, t, patch index p, valid, offset of the patch's top-left pixel)."""
    row_mask = rows < M
    b = (rows // T).to(tl.int64)
    t = rows % T
    p = tl.load(Idx + b * stride_ib + t * stride_it, mask=row_mask, other=0).to(tl.int64)
    valid = row_mask & (p >= 0) & (p < N)  # an out-of-range index never reads memory: its row becomes NaN
    p = tl.where(valid, p, 0)
    base = b * stride_xb + (p // GW) * (PATCH * stride_xh) + (p % GW) * (PATCH * stride_xw)
    return b, t, p, valid, base


@triton.jit
def _patch_offsets(k, stride_xc, stride_xh, stride_xw, PATCH: tl.constexpr, KDIM: tl.constexpr):
    """Pixel offset of K-dim column k = (c*P + i)*P + j inside a patch, and the k < KDIM mask."""
    c = k // (PATCH * PATCH)
    r = k % (PATCH * PATCH)
    return c * stride_xc + (r // PATCH) * stride_xh + (r % PATCH) * stride_xw, k < KDIM


@triton.jit
def _patch_embed_fwd_kernel(
    X, Idx, W, Bias, Pos, Out,
    M, T, N, GW, D, OUT_ROW0,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_ib, stride_it,
    stride_wd, stride_wk,
    stride_pn, stride_pd,
    stride_ob, stride_ot, stride_od,
    PATCH: tl.constexpr, KDIM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # 1-D grid, N-tiles fastest: the programs that share a block of kept patches run together (A stays in L2).
    pid = tl.program_id(0)
    num_n = tl.cdiv(D, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    b, t, p, valid, base = _kept_patch_rows(
        Idx, rows, M, T, N, GW, stride_ib, stride_it, stride_xb, stride_xh, stride_xw, PATCH
    )
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < D

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KDIM, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_off, k_mask = _patch_offsets(k, stride_xc, stride_xh, stride_xw, PATCH, KDIM)
        a = tl.load(X + base[:, None] + k_off[None, :], mask=valid[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(
            W + cols[None, :] * stride_wd + k[:, None] * stride_wk, mask=k_mask[:, None] & col_mask[None, :], other=0.0
        )
        acc = tl.dot(a, w, acc, input_precision=PRECISION, out_dtype=tl.float32)

    # Epilogue in fp32, one rounding: + bias[n] + pos[p, n] (a row gather of the position table).
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_POS:
        pos_ptrs = Pos + p[:, None] * stride_pn + cols[None, :] * stride_pd
        acc += tl.load(pos_ptrs, mask=valid[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    acc = tl.where(valid[:, None], acc, float("nan"))
    out_ptrs = Out + b[:, None] * stride_ob + (t + OUT_ROW0)[:, None] * stride_ot + cols[None, :] * stride_od
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=(rows < M)[:, None] & col_mask[None, :])


@triton.jit
def _patch_embed_bwd_kernel(
    X, Idx, A,
    M, T, N, GW,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_ib, stride_it,
    stride_am, stride_ak,
    PATCH: tl.constexpr, KDIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # im2col of the kept patches only: A[m, k], the left operand that dW = dYᵀ·A needs in the backward.
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    b, t, p, valid, base = _kept_patch_rows(
        Idx, rows, M, T, N, GW, stride_ib, stride_it, stride_xb, stride_xh, stride_xw, PATCH
    )
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_off, k_mask = _patch_offsets(k, stride_xc, stride_xh, stride_xw, PATCH, KDIM)
    a = tl.load(X + base[:, None] + k_off[None, :], mask=valid[:, None] & k_mask[None, :], other=0.0)
    tl.store(A + rows[:, None] * stride_am + k[None, :] * stride_ak, a, mask=(rows < M)[:, None] & k_mask[None, :])


def _gemm_settings(d: int, kdim: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the fused forward, a tl.dot GEMM, hence a fixed
    tile rather than calculate_settings: 64 x up to 128 x up to 64 (tl.dot needs each side >= 16 for 16-bit
    inputs), 4 warps, 3 stages."""
    return 64, max(16, min(128, next_power_of_2(d))), max(16, min(64, next_power_of_2(kdim))), 4, 3


def _im2col_settings(m: int, kdim: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps) of the im2col gather: 32 rows a program on 4 warps, and tiles of up to 256
    columns, as C*P*P = 768 (RGB, 16-pixel patches) is three of them. A fixed row count rather than
    calculate_settings' element budget, which would give small patches (C*P*P = 48) 128-row programs: these
    are the settings the kernel was compiled and checked with, and no GPU timing has yet said another pays."""
    return 32, min(256, next_power_of_2(kdim)), 4


def patch_embed_fwd(
    images: torch.Tensor,
    weight2d: torch.Tensor,
    bias: torch.Tensor | None,
    pos: torch.Tensor | None,
    keep_idx: torch.Tensor,
    patch: int,
    out: torch.Tensor | None = None,
    out_row0: int = 0,
) -> torch.Tensor:
    """Launch the fused forward. images [B, C, H, W]; weight2d [D, C*P*P]; bias [D]; pos [N, D];
    keep_idx [K] or [B, K]. Writes rows out[b, out_row0 + t] of out [B, out_row0 + K, D] (allocated when
    None; a caller may pass a NaN-filled one to show unwritten elements) and returns out.
    """
    bsz, c, h, w = images.shape
    d, kdim = weight2d.shape
    assert kdim == c * patch * patch and images.dtype == weight2d.dtype
    gh, gw = h // patch, w // patch
    k = keep_idx.shape[-1]
    if out is None:
        out = torch.empty(bsz, out_row0 + k, d, dtype=images.dtype, device=images.device)
    assert out.shape == (bsz, out_row0 + k, d) and out.dtype == images.dtype, "patch_embed_fwd: bad out buffer"
    m = bsz * k
    block_m, block_n, block_k, num_warps, num_stages = _gemm_settings(d, kdim)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(d, block_n),)
    bias_t = images if bias is None else bias  # dummy pointers for absent operands
    pos_t = weight2d if pos is None else pos
    _patch_embed_fwd_kernel[grid](
        images, keep_idx, weight2d, bias_t, pos_t, out,
        m, k, gh * gw, gw, d, out_row0,
        *images.stride(), *idx_strides(keep_idx), *weight2d.stride(), pos_t.stride(0), pos_t.stride(1),
        *out.stride(),
        PATCH=patch, KDIM=kdim, HAS_BIAS=bias is not None, HAS_POS=pos is not None,
        PRECISION="ieee" if images.dtype == torch.float32 else "tf32",  # fp32 stays exact, as in the reference
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def gather_patches(
    images: torch.Tensor, keep_idx: torch.Tensor, patch: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """im2col of the kept patches: [B*K, C*P*P] in images' dtype, columns in (c, i, j) order."""
    bsz, c, h, w = images.shape
    kdim, k = c * patch * patch, keep_idx.shape[-1]
    m = bsz * k
    if out is None:
        out = torch.empty(m, kdim, dtype=images.dtype, device=images.device)
    assert out.shape == (m, kdim) and out.dtype == images.dtype, "gather_patches: bad out buffer"
    block_m, block_k, num_warps = _im2col_settings(m, kdim)
    grid = (triton.cdiv(m, block_m), triton.cdiv(kdim, block_k))
    _patch_embed_bwd_kernel[grid](
        images, keep_idx, out, m, k, (h // patch) * (w // patch), w // patch,
        *images.stride(), *idx_strides(keep_idx), *out.stride(),
        PATCH=patch, KDIM=kdim, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=num_warps,
    )  # fmt: skip
    return out


def patch_embed_bwd(
    dy: torch.Tensor, images: torch.Tensor, weight2d: torch.Tensor, keep_idx: torch.Tensor, patch: int,
    need_images: bool, need_weight: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """dy [B, K, D] -> (d images [B, C, H, W] or None, d weight2d [D, C*P*P] or None), in images' dtype.

    dW = dYᵀ·A with A the kept patches gathered by the Triton im2col kernel (a cuBLAS GEMM, fp32 accumulate).
    d images = dY·W scattered back to the kept patches' pixels (torch ops: an unfused, rarely used path).
    """
    bsz, c, h, w = images.shape
    k, d = keep_idx.shape[-1], dy.shape[-1]
    dy2 = dy.reshape(bsz * k, d)  # (M, D)
    dweight = dy2.t().mm(gather_patches(images, keep_idx, patch)) if need_weight else None
    dimages = None
    if need_images:
        gh, gw = h // patch, w // patch
        rows = keep_idx.long() + torch.arange(bsz, device=dy.device)[:, None] * (gh * gw)  # (B, K) rows of (B*N)
        dpatches = torch.zeros(bsz * gh * gw, c * patch * patch, dtype=dy.dtype, device=dy.device)
        dpatches.index_add_(0, rows.reshape(-1), dy2.mm(weight2d))
        dimages = torch.zeros(bsz, c, h, w, dtype=images.dtype, device=images.device)
        dpatches = dpatches.view(bsz, gh, gw, c, patch, patch).permute(0, 3, 1, 4, 2, 5)  # (B, C, Gh, P, Gw, P)
        dimages[:, :, : gh * patch, : gw * patch] = dpatches.reshape(bsz, c, gh * patch, gw * patch)
    return dimages, dweight


def embed_kept_patches_ref(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_embed: torch.Tensor | None,
    keep_idx: torch.Tensor | None,
    cls_token: torch.Tensor | None = None,
) -> torch.Tensor:
    """The unfused torch path: conv2d(stride=P) -> [B, N, D] -> + pos_embed (cast to the conv's dtype) ->
    gather of keep_idx (None: all patches) -> optional CLS row prepended. Computes in the inputs' dtype.
    """
    y = F.conv2d(images, weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2)  # (B, N, D)
    if pos_embed is not None:
        y = y + pos_embed.reshape(pos_embed.shape[-2:]).to(y.dtype)
    if keep_idx is not None:
        y = gather_rows(y, keep_idx)
    if cls_token is not None:
        y = torch.cat([cls_token.reshape(1, 1, -1).to(y.dtype).expand(y.shape[0], 1, -1), y], dim=1)
    return y


class PatchEmbedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, images, weight, bias, pos, cls_token, keep_idx):
        d, patch = weight.shape[0], weight.shape[-1]
        weight2d = weight.reshape(d, -1)
        n = (images.shape[2] // patch) * (images.shape[3] // patch)
        row0 = 0 if cls_token is None else 1
        out = patch_embed_fwd(images, weight2d, bias, pos, keep_idx, patch, out_row0=row0)
        if cls_token is not None:
            out[:, 0] = cls_token.reshape(1, d).to(out.dtype)
        ctx.save_for_backward(images, weight2d, keep_idx)
        ctx.meta = (patch, n, weight.shape, None if bias is None else bias.dtype, None if pos is None else pos.dtype)
        ctx.cls_like = None if cls_token is None else (cls_token.shape, cls_token.dtype)
        ctx.mark_non_differentiable(keep_idx)
        return out

    @staticmethod
    def backward(ctx, dy):
        images, weight2d, keep_idx = ctx.saved_tensors
        patch, n, w_shape, bias_dtype, pos_dtype = ctx.meta
        need_x, need_w, need_b, need_pos, need_cls = ctx.needs_input_grad[:5]
        dcls = None
        if ctx.cls_like is not None:
            dcls = dy[:, 0].sum(0, dtype=torch.float32).to(ctx.cls_like[1]).reshape(ctx.cls_like[0])
            dy = dy[:, 1:]
        with torch.autocast(device_type=dy.device.type, enabled=False):
            dx, dw = patch_embed_bwd(dy, images, weight2d, keep_idx, patch, need_x, need_w)
            db = dy.sum((0, 1), dtype=torch.float32).to(bias_dtype) if need_b else None
            dpos = pos_embed_grad(dy, keep_idx, n, pos_dtype) if need_pos else None
        return dx, None if dw is None else dw.reshape(w_shape), db, dpos, dcls if need_cls else None, None


def embed_kept_patches(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    pos_embed: torch.Tensor | None = None,
    keep_idx: torch.Tensor | None = None,
    *,
    cls_token: torch.Tensor | None = None,
    validate: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Patch-embed only the kept patches: gather(conv2d(images, weight, bias, stride=P) + pos_embed, keep_idx).

    Args:
        images: [B, C, H, W], any strides. Pixels beyond the last whole patch (H % P rows, W % P columns)
            are ignored, as by a stride-P conv. N = (H // P) * (W // P).
        weight: the conv weight [D, C, P, P] (P read from it), same dtype as images (fp32/fp16/bf16).
        bias: [D] in weight's dtype, or None.
        pos_embed: [N, D] or [1, N, D], the PATCH positions only (a ViT's pos_embed[:, 1:]), any float
            dtype, or None. Already interpolated to this image size by the caller.
        keep_idx: patch indices in [0, N) (no CLS offset): [K] shared by the batch or [B, K] per sample,
            int32 or int64; None keeps all N patches in order.
        cls_token: optional [D] or [1, 1, D] row written as out[:, 0] (already including its position
            embedding); the output is then [B, 1 + K, D], which saves the caller a torch.cat.
        validate: check indices in range and unique per sample (IndexError / ValueError, any backend): a sort
            + ONE host sync. Pass False in the training step (masks are correct by construction); the caller
            then guarantees 0 <= keep_idx < N, or the result is undefined (a NaN row in the Triton backend,
            never an out-of-bounds read; see `gather_tokens`).
        backend: "auto" (Triton on CUDA / under the interpreter, torch elsewhere), "triton" or "torch".
            Under torch.autocast the Triton path casts images, weight and bias to the autocast dtype.
    Returns:
        [B, K, D] (or [B, 1 + K, D] with cls_token) in images' dtype. The GEMM accumulates in fp32 (exact
        fp32 products for fp32 inputs, no TF32), bias and position embedding are added in fp32, one rounding.
        Gradients: weight, bias, pos_embed, cls_token (sums in fp32, or an fp32-accumulating GEMM), and
        images when images.requires_grad (an unfused torch scatter; zeros at dropped patches).
    """
    op = "embed_kept_patches"
    if images.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"{op}: expected images [B, C, H, W] and weight [D, C, P, P]; got "
                         f"{tuple(images.shape)} and {tuple(weight.shape)}")  # fmt: skip
    requested, backend = backend, resolve_backend(backend, images, op)
    if backend == "triton" and torch.is_autocast_enabled(images.device.type):
        dt = torch.get_autocast_dtype(images.device.type)
        images, weight = images.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    allowed = SUPPORTED_DTYPES + ((torch.float64,) if backend == "torch" else ())
    check_dtype(op, "images", images, allowed)
    if weight.dtype != images.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise TypeError(f"{op}: images ({images.dtype}), weight ({weight.dtype}) and bias "
                        f"({None if bias is None else bias.dtype}) must share one dtype, as for conv2d")  # fmt: skip
    bsz, c, h, w = images.shape
    d, patch = weight.shape[0], weight.shape[-1]
    if weight.shape[1] != c:
        raise ValueError(f"{op}: images have {c} channels but weight {tuple(weight.shape)} expects {weight.shape[1]}")
    if d == 0:
        raise ValueError(f"{op}: weight {tuple(weight.shape)} has D = 0 output channels; need D >= 1")
    if weight.shape[2] != patch:
        raise ValueError(f"{op}: patches must be square; weight is {tuple(weight.shape)}")
    if h < patch or w < patch:
        raise ValueError(f"{op}: image {h}x{w} is smaller than one {patch}x{patch} patch")
    if bias is not None and tuple(bias.shape) != (d,):
        raise ValueError(f"{op}: bias must be [{d}]; got {tuple(bias.shape)}")
    if cls_token is not None and cls_token.numel() != d:
        raise ValueError(f"{op}: cls_token must hold D = {d} values ([D] or [1, 1, D]); got {tuple(cls_token.shape)}")
    n = (h // patch) * (w // patch)
    pos = None if pos_embed is None else check_pos_embed(op, pos_embed, n, d)
    optional = {"bias": bias, "pos_embed": pos, "cls_token": cls_token, "keep_idx": keep_idx}
    check_same_device(op, images=images, weight=weight, **{k: v for k, v in optional.items() if v is not None})
    if keep_idx is None:
        keep_idx = torch.arange(n, dtype=torch.int32, device=images.device)
    else:
        check_keep_idx(op, keep_idx, bsz, n, validate)
    if backend == "torch" or not _self_checked(images, weight, bias, pos, keep_idx, cls_token, requested == "triton"):
        return embed_kept_patches_ref(images, weight, bias, pos, keep_idx, cls_token)
    return PatchEmbedFunction.apply(images, weight, bias, pos, cls_token, keep_idx)


def _self_checked(images, weight, bias, pos, keep_idx, cls_token, strict: bool) -> bool:
    """First use per (dtypes, C, P, D class, optional inputs, index layout, grads): the kernel against the
    reference on the first two images (selfcheck.py)."""
    optional = (bias, pos, cls_token)
    grads = tuple(t is not None and t.requires_grad for t in (images, weight) + optional)
    key = (
        images.dtype,
        None if pos is None else pos.dtype,
        images.shape[1],
        weight.shape[-1],
        selfcheck.size_class(weight.shape[0]),
        tuple(t is None for t in optional),
        keep_idx.dim(),
        grads,
    )

    def sample() -> dict:
        m = selfcheck.marked
        idx = keep_idx[:2] if keep_idx.dim() == 2 else keep_idx
        return dict(
            images=m(images[:2], images),
            weight=m(weight, weight),
            bias=m(bias, bias),
            pos_embed=m(pos, pos),
            keep_idx=idx,
            cls_token=m(cls_token, cls_token),
            validate=False,
        )

    return selfcheck.use_triton("embed_kept_patches", key, sample, images, strict=strict)
