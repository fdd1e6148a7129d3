"""Vision Transformer with token dropping, as MSN uses it (arXiv 2204.07141, official deit.py semantics).

Pre-norm blocks (LayerNorm eps 1e-6, qkv bias, MLP ratio 4, GELU), a learned position embedding
and CLS token (trunc_normal 0.02), a final LayerNorm. Tokens are dropped AFTER the position
embedding is added and CLS is always kept, so the encoder only processes kept tokens. The position
embedding is bicubically interpolated for other input sizes (the 96 px focal views).
Attention goes through `msn_fast.kernels.attention`, so `attn_impl` picks the backend. `stem="conv"` replaces the
linear patch projection with a few convolutions (`ConvStem`, the `cpu_photos` recipe's).

MSN reads only the CLS token (the projection head's input, the evaluation feature), so `forward` and
`extract_features` run the last block for the CLS row alone: k and v of every token, q, attention output,
projection and MLP of CLS only (`Block(x, cls_only=True)`), the same values as the full block's CLS row. For the
CPU recipes' ViT (depth 4, MLP ratio 2) that is 18% fewer FLOPs a step; `forward_features` keeps every token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from msn_fast.kernels import attention, embed_kept_patches, gather_tokens


@dataclass(frozen=True)
class ViTArch:
    """Shape of a ViT; the registry below names the official ones."""

    dim: int
    depth: int
    heads: int
    patch_size: int
    mlp_ratio: float = 4.0


ARCHS: dict[str, ViTArch] = {
    "vit_tiny": ViTArch(dim=192, depth=12, heads=3, patch_size=16),  # DeiT-Ti
    "vit_s16": ViTArch(dim=384, depth=12, heads=6, patch_size=16),
    "vit_b16": ViTArch(dim=768, depth=12, heads=12, patch_size=16),
    "vit_b8": ViTArch(dim=768, depth=12, heads=12, patch_size=8),
    "vit_b4": ViTArch(dim=768, depth=12, heads=12, patch_size=4),
    "vit_l16": ViTArch(dim=1024, depth=24, heads=16, patch_size=16),
    "vit_l7": ViTArch(dim=1024, depth=24, heads=16, patch_size=7),
    "vit_h14": ViTArch(dim=1280, depth=32, heads=16, patch_size=14),
}
ALIASES = {"vit_small": "vit_s16", "vit_base": "vit_b16", "vit_large": "vit_l16", "vit_huge": "vit_h14"}


def get_arch(name: str) -> ViTArch:
    name = ALIASES.get(name, name)
    if name not in ARCHS:
        known = ", ".join(list(ARCHS) + list(ALIASES))
        raise ValueError(f"unknown model {name!r}; known models: {known}")
    return ARCHS[name]


class Attention(nn.Module):
    """Multi-head self-attention; the maths lives in `msn_fast.kernels.attention` (backend `impl`)."""

    def __init__(self, dim: int, heads: int, impl: str = "auto", device=None, dtype=None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.impl = heads, impl
        self.qkv = nn.Linear(dim, 3 * dim, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
        """x: [B, N, D] -> [B, N, D]; with `cls_only`, the first token's row alone, [B, 1, D] (its query
        attends to every key; the other tokens' queries and outputs are never computed)."""
        b, n, d = x.shape
        heads, hd = self.heads, d // self.heads
        if cls_only:  # q of the first token, k and v of all: the qkv weight's rows are q, then k, then v
            # split, not two slices: its backward is one concatenation, not two full-size zero-fills and an add
            (wq, wkv), (bq, bkv) = self.qkv.weight.split([d, 2 * d]), self.qkv.bias.split([d, 2 * d])
            q = F.linear(x[:, :1], wq, bq).view(b, 1, heads, hd).transpose(1, 2)  # (B, H, 1, d)
            kv = F.linear(x, wkv, bkv).view(b, n, 2, heads, hd).permute(2, 0, 3, 1, 4)  # (2, B, H, N, d)
            k, v = kv.unbind(0)
        else:
            qkv = self.qkv(x).view(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)  # (3, B, H, N, d)
            q, k, v = qkv.unbind(0)  # one backward op (a stack); qkv[0], [1], [2] would zero-fill and copy 3x
        out = attention(q, k, v, backend=self.impl)  # (B, H, Nq, d)
        return self.proj(out.transpose(1, 2).reshape(b, q.shape[2], d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, impl: str, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.attn = Attention(dim, heads, impl, **dd)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, **dd)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, **dd), nn.GELU(), nn.Linear(hidden, dim, **dd))

    def forward(self, x: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
        """x: [B, N, D] -> [B, N, D], or with `cls_only` the first (CLS) token's output alone, [B, 1, D]: what
        the last block owes when only CLS is read (about a quarter of a block's matmuls at 65 tokens, MLP ratio 2)."""
        if cls_only:
            x = x[:, :1] + self.attn(self.norm1(x), cls_only=True)
        else:
            x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ConvStem(nn.Module):
    """Early convolutions in place of the patch projection (`vit.stem conv`; Xiao et al. 2021, arXiv 2106.14881).

    log2(P) 3x3 convolutions of stride 2, each followed by BatchNorm and ReLU, of widths D/4 (at least 8) and
    then each twice the last (at most D), then a 1x1 convolution to D: [B, C, H, W] -> [B, D, H/P, W/P], one
    token per P x P patch as the linear projection gives. A view that is not whole patches loses its last rows
    and columns, as with the projection.

    The mask leaks: the 3x3 windows overlap, so at P 4 a token sees a 7 x 7 window (its own 16 pixels and 33 of
    its upper and left neighbours'), and a masked view's kept tokens see most of the dropped patches' pixels.
    At 64 patches and mask ratio 0.3 (44 kept), 8% of the pixels are hidden from every kept token, against 31%
    with the projection (eval mode; in train mode BatchNorm's batch statistics also mix in every pixel weakly).
    `hide_dropped` (`vit.stem_hides_dropped`) closes it: a masked view's dropped patches are zeroed before the
    stem (in train mode BatchNorm's batch statistics then count those zeros too). In one paired held-out run it
    scored 0.8 ± 0.3 points lower at 1 shot and level at 2 and 5 (README, sixth round): not conclusive.

    PyTorch's default init of the convolutions. BatchNorm runs in train mode during training, as the projection
    head's; its running statistics, updated by each encoder's own forwards, serve the evaluation's eval mode (a
    random-init encoder's are the initial 0 / 1, so its stem normalises nothing). With several processes or bf16
    the trainer converts it to SyncBatchNorm2d (fp32 statistics over every process's batch).
    """

    def __init__(self, in_chans: int, dim: int, patch_size: int, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if patch_size < 2 or patch_size & (patch_size - 1):
            raise ValueError(f"vit.stem conv needs a patch size that is a power of two, at least 2; got {patch_size}")
        layers, c, width, s = [], in_chans, max(dim // 4, 8), 1
        while s < patch_size:
            layers += [nn.Conv2d(c, width, 3, stride=2, padding=1, bias=False, **dd), nn.BatchNorm2d(width, **dd),
                       nn.ReLU(inplace=True)]
            c, width, s = width, min(2 * width, dim), 2 * s
        layers.append(nn.Conv2d(c, dim, 1, **dd))
        self.layers = nn.Sequential(*layers)
        self.in_channels = in_chans

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, D, H/P, W/P]"""
        return self.layers(x)


STEMS = ("linear", "conv")


def kept_pixel_mask(keep_idx: torch.Tensor, gh: int, gw: int, p: int, dtype, device) -> torch.Tensor:
    """1 on the kept patches' pixels, 0 on the dropped ones': keep_idx [K] or [B, K] -> [B or 1, 1, gh·p, gw·p]."""
    idx = (keep_idx if keep_idx.dim() == 2 else keep_idx[None]).to(device=device, dtype=torch.long)
    m = torch.zeros(idx.shape[0], gh * gw, dtype=dtype, device=device).scatter_(1, idx, 1.0)
    return m.view(-1, 1, gh, 1, gw, 1).expand(-1, -1, -1, p, -1, p).reshape(-1, 1, gh * p, gw * p)


class VisionTransformer(nn.Module):
    """ViT encoder returning the CLS token; `keep_idx` drops patch tokens after the pos-embed add.

    Args:
        arch: the shape (dim, depth, heads, patch size).
        img_size: the size the position embedding is learned at (224 for the official models).
        attn_impl: attention backend, see `msn_fast.kernels.attention`.
        embed_impl: backend of the fused kept-patch embedding of masked views (`embed_kept_patches`), or with
            the conv stem of the gather of their kept tokens (`gather_tokens`).
        stem: "linear" (the official P x P patch projection, `patch_embed` an nn.Conv2d) or "conv" (`ConvStem`:
            every patch goes through the stem, then a masked view keeps its tokens).
        hide_dropped: with the conv stem, zero a masked view's dropped patches before the stem (`kept_pixel_mask`).
    """

    def __init__(self, arch: ViTArch, img_size: int = 224, in_chans: int = 3, attn_impl: str = "auto",
                 embed_impl: str = "auto", stem: str = "linear", hide_dropped: bool = False, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; known: {', '.join(STEMS)}")
        if hide_dropped and stem != "conv":
            raise ValueError("hide_dropped needs the conv stem (the linear projection never sees dropped patches)")
        self.stem, self.hide_dropped = stem, hide_dropped
        self.arch, self.img_size, self.patch_size = arch, img_size, arch.patch_size
        self.embed_impl = embed_impl
        self.grid = img_size // arch.patch_size
        if self.grid < 1:
            raise ValueError(f"img_size {img_size} is smaller than the patch size {arch.patch_size}")
        self.num_patches = self.grid**2
        self.embed_dim = arch.dim
        self.patch_embed = (ConvStem(in_chans, arch.dim, arch.patch_size, **dd) if stem == "conv" else
                            nn.Conv2d(in_chans, arch.dim, arch.patch_size, stride=arch.patch_size, **dd))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, arch.dim, **dd))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, arch.dim, **dd))
        self.blocks = nn.ModuleList(
            Block(arch.dim, arch.heads, arch.mlp_ratio, attn_impl, **dd) for _ in range(arch.depth)
        )
        self.norm = nn.LayerNorm(arch.dim, eps=1e-6, **dd)
        if device is None or torch.device(device).type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Official init (msn_spec.md, ViT): trunc_normal(0.02) for linears (zero bias), pos-embed and CLS;
        LayerNorm 1/0; Kaiming normal with fan-in and the ReLU gain, std sqrt(2 / (3·P·P)), for the
        patch conv (a conv stem keeps PyTorch's defaults)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.stem == "linear":
            nn.init.kaiming_normal_(self.patch_embed.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(self.patch_embed.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def set_attn_impl(self, impl: str) -> None:
        for blk in self.blocks:
            blk.attn.impl = impl

    def set_embed_impl(self, impl: str) -> None:
        self.embed_impl = impl

    def patch_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """[1, gh*gw, D] position embedding of the patches, bicubic-interpolated when the grid differs."""
        pos = self.pos_embed[:, 1:]
        if (grid_h, grid_w) == (self.grid, self.grid):
            return pos
        pos = pos.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
        pos = F.interpolate(pos.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return pos.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)

    def embed(self, x: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Images [B, C, H, W] -> tokens [B, 1 + K, D] (CLS first); K = N, or keep_idx.shape[-1].

        keep_idx: kept PATCH indices in [0, N), shared [K] or per-sample [B, K]; None keeps all.
        A masked view with the linear projection goes through the fused kernel, which reads only the kept
        patches' pixels. Otherwise every patch goes through `patch_embed` (the projection, or the conv stem
        on the whole patches) and a masked view then keeps its tokens (`gather_tokens`, position embedding
        added in the same pass).
        """
        p = self.patch_size
        gh, gw = x.shape[-2] // p, x.shape[-1] // p
        cls = self.cls_token + self.pos_embed[:, :1]  # (1, 1, D)
        pos = self.patch_pos_embed(gh, gw)
        if keep_idx is not None and self.stem == "linear":
            return embed_kept_patches(x, self.patch_embed.weight, self.patch_embed.bias, pos, keep_idx,
                                      cls_token=cls, validate=False, backend=self.embed_impl)
        x = x[..., : gh * p, : gw * p]  # whole patches only (the strided projection ignores the rest anyway)
        if keep_idx is not None and self.hide_dropped:
            x = x * kept_pixel_mask(keep_idx, gh, gw, p, x.dtype, x.device)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        tokens = tokens + pos if keep_idx is None else gather_tokens(tokens, keep_idx, pos, validate=False,
                                                                    backend=self.embed_impl)  # (B, K, D)
        return torch.cat([cls.expand(x.shape[0], -1, -1), tokens], dim=1)

    def forward_features(self, x: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Images [B, C, H, W] -> final-normed tokens [B, 1 + K, D]."""
        t = self.embed(x, keep_idx)
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)

    def cls_features(self, x: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Images [B, C, H, W] -> CLS of the last block before the final LayerNorm, [B, D]. Equals
        forward_features' CLS before that norm: the last block computes the CLS row alone (block.cls_only)."""
        t = self.embed(x, keep_idx)
        for blk in self.blocks[:-1]:
            t = blk(t)
        return self.blocks[-1](t, cls_only=True)[:, 0]

    def forward(self, x: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Images [B, C, H, W] -> CLS after the final LayerNorm, [B, D] (what the projection head sees);
        equals forward_features(x, keep_idx)[:, 0] without the patch tokens' outputs of the last block."""
        return self.norm(self.cls_features(x, keep_idx))

    @torch.no_grad()
    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation features: CLS of the last block BEFORE the final LayerNorm, [B, D] (official eval)."""
        return self.cls_features(x)


def build_vit(name: str, img_size: int = 224, attn_impl: str = "auto", patch_size: int | None = None,
              embed_impl: str = "auto", device=None, dtype=None) -> VisionTransformer:
    """Build a registered ViT by name (`vit_s16`, `vit_l7`, ...; aliases `vit_small`, ...)."""
    arch = get_arch(name)
    if patch_size is not None and patch_size != arch.patch_size:
        arch = ViTArch(arch.dim, arch.depth, arch.heads, patch_size, arch.mlp_ratio)
    return VisionTransformer(arch, img_size=img_size, attn_impl=attn_impl, embed_impl=embed_impl, device=device,
                             dtype=dtype)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["ViTArch", "ARCHS", "get_arch", "ConvStem", "STEMS", "VisionTransformer", "build_vit", "num_params"]
