"""Our kernels inside someone else's ViT (timm, or any module with SDPA-style attention), without copying it.

    import timm
    from msn_fast.patching import use_msn_attention, use_msn_token_drop

    vit = timm.create_model("vit_small_patch16_224", patch_drop_rate=0.7)
    use_msn_attention(vit, backend="auto")     # every timm Attention -> msn_fast.kernels.attention
    use_msn_token_drop(vit, backend="auto")    # timm PatchDropout -> msn_fast.kernels.gather_tokens
    ...                                         # train / evaluate as before; restore_attention(vit) undoes it

How: each matching submodule is REPLACED in its parent by a small wrapper (`MSNAttention`,
`MSNTokenDrop`) that re-registers the original's own child modules under the same names, so the
parameters are the same tensors, `state_dict()` keys are unchanged and optimizers built before or
after patching keep working. No class is monkey-patched; other instances are untouched.

Where the kernel does not apply, the wrapper calls `F.scaled_dot_product_attention` exactly as timm
would: an `attn_mask`, `is_causal=True`, or attention dropout while training (the kernel has none).
`backend="auto"` runs Triton on CUDA and SDPA on a CPU (see `msn_fast.kernels.attention` for the
head dims the Triton kernel takes; others fall back to SDPA by themselves).

For your own module that calls `F.scaled_dot_product_attention(q, k, v)` on [B, H, N, D] tensors,
call `msn_fast.patching.scaled_dot_product_attention(q, k, v, backend=...)` instead: same
signature, same fallbacks.

Matching: `use_msn_attention` replaces modules for which `match(name, module)` is true; the default
matches timm's `Attention` class (timm.layers.attention.Attention, used by VisionTransformer, DeiT,
EVA-less plain ViTs). A custom `match` must select modules with timm's layout: `qkv` Linear to 3·H·d
laid out as (3, H, d), `num_heads`, `proj`, optional `q_norm`/`k_norm`/`norm`/`gate`/`attn_drop`/
`proj_drop`, and forward(x [B, N, C]) -> [B, N, C]. (The official MSN/DINO deit.py Attention returns
(x, attn) and needs the attention matrix, so it is not a candidate.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from msn_fast.kernels import attention, gather_tokens

from .masking import sample_keep_indices


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None, *,
                                 backend: str = "auto") -> torch.Tensor:
    """`F.scaled_dot_product_attention` with `msn_fast.kernels.attention` wherever it applies.

    q: [B, H, Nq, D], k/v: [B, H, Nkv, D] -> [B, H, Nq, D] in q's dtype (fp32 accumulation). A mask,
    `is_causal` or `dropout_p > 0` go to SDPA unchanged.
    """
    if attn_mask is None and not is_causal and dropout_p == 0.0 and q.dim() == 4:
        return attention(q, k, v, scale=scale, backend=backend)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                          scale=scale)


class MSNAttention(nn.Module):
    """timm-layout self-attention whose softmax(QKᵀ)V runs in `msn_fast.kernels.attention`.

    Built from an existing module: its children (qkv, proj, norms, dropouts, gate) and any direct
    parameters are registered here under the same names, so weights are shared, not copied.
    """

    def __init__(self, original: nn.Module, backend: str = "auto"):
        super().__init__()
        self.num_heads = int(original.num_heads)
        self.head_dim = int(getattr(original, "head_dim", original.qkv.out_features // 3 // self.num_heads))
        self.attn_dim = int(getattr(original, "attn_dim", self.num_heads * self.head_dim))
        self.scale = float(getattr(original, "scale", self.head_dim**-0.5))
        if original.qkv.out_features != 3 * self.attn_dim:
            raise ValueError(f"qkv has {original.qkv.out_features} outputs; expected 3 x {self.attn_dim}")
        self.backend = backend
        for name, child in original.named_children():
            self.add_module(name, child)
        for name, p in original.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in original.named_buffers(recurse=False):
            self.register_buffer(name, b)
        self.__dict__["original"] = original  # not registered: restore_attention puts it back

    def _child(self, name: str):
        return self._modules.get(name)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """x: [B, N, C] -> [B, N, C] (timm Attention.forward semantics)."""
        b, n, _ = x.shape
        gate = self._child("gate")
        g = gate(x).sigmoid() if gate is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q_norm, k_norm = self._child("q_norm"), self._child("k_norm")
        q = q_norm(q) if q_norm is not None else q
        k = k_norm(k) if k_norm is not None else k
        drop = self._child("attn_drop")
        p = drop.p if (drop is not None and self.training) else 0.0
        out = scaled_dot_product_attention(q, k, v, attn_mask, p, is_causal, self.scale, backend=self.backend)
        out = out.transpose(1, 2).reshape(b, n, self.attn_dim)
        norm = self._child("norm")
        out = norm(out) if norm is not None else out
        if g is not None:
            out = out * g
        out = self.proj(out)
        proj_drop = self._child("proj_drop")
        return proj_drop(out) if proj_drop is not None else out

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, backend={self.backend!r}"


def is_timm_attention(name: str, module: nn.Module) -> bool:
    """timm's plain `Attention` (timm.layers.attention.Attention), not its RoPE/2D/pooling variants."""
    cls = type(module)
    return (cls.__name__ == "Attention" and cls.__module__.startswith("timm.")
            and isinstance(getattr(module, "qkv", None), nn.Linear) and isinstance(getattr(module, "proj", None),
                                                                                   nn.Linear))


def _replace(model: nn.Module, match: Callable[[str, nn.Module], bool], build: Callable[[nn.Module], nn.Module]):
    targets = [(name, m) for name, m in model.named_modules() if name and match(name, m)]
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, build(m))
    return [name for name, _ in targets]


def use_msn_attention(model: nn.Module, backend: str = "auto",
                      match: Callable[[str, nn.Module], bool] = is_timm_attention) -> list[str]:
    """Swap every submodule matched by `match` for an `MSNAttention` (in place); returns their names.

    Raises ValueError when nothing matched (so a silent no-op cannot pass for a speed-up).
    Calling it again on a patched model only changes the backend of the existing wrappers.
    """
    wrapped = [name for name, m in model.named_modules() if isinstance(m, MSNAttention)]
    for name in wrapped:
        model.get_submodule(name).backend = backend
    names = _replace(model, lambda n, m: not isinstance(m, MSNAttention) and match(n, m),
                     lambda m: MSNAttention(m, backend))
    if not names and not wrapped:
        raise ValueError(f"use_msn_attention: no attention module of {type(model).__name__} matched "
                         "(default: timm's Attention; pass match= for other timm-layout modules)")
    return names + wrapped


def restore_attention(model: nn.Module) -> list[str]:
    """Put the original attention modules back (undo `use_msn_attention`); returns their names."""
    return _replace(model, lambda n, m: isinstance(m, MSNAttention), lambda m: m.original)


class MSNTokenDrop(nn.Module):
    """Random token dropping through `msn_fast.kernels.gather_tokens` (replaces timm's `PatchDropout`).

    In training, keeps floor(L·(1 − prob)) of the L patch tokens (MSN's count) after the
    `num_prefix_tokens` CLS/register tokens, which are always kept first; `mode` "shared" draws one
    permutation per batch (official MSN), "per_sample" one per image. Identity in eval mode or at
    prob 0. `last_keep_idx` holds the latest kept patch indices ([K] or [B, K]) for inspection.
    `generator`: an optional torch.Generator for reproducible draws.
    """

    def __init__(self, prob: float, num_prefix_tokens: int = 1, mode: str = "shared", backend: str = "auto",
                 generator: torch.Generator | None = None):
        super().__init__()
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"token drop probability must be in [0, 1); got {prob}")
        self.prob, self.num_prefix_tokens, self.mode, self.backend = prob, num_prefix_tokens, mode, backend
        self.generator = generator
        self.last_keep_idx: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, P + L, D] -> [B, P + K, D]."""
        if not self.training or self.prob == 0.0:
            return x
        p = self.num_prefix_tokens
        b, n = x.shape[0], x.shape[1] - p
        dev = self.generator.device if self.generator is not None else x.device
        idx = sample_keep_indices(b, n, self.prob, self.mode, device=dev, generator=self.generator).to(x.device)
        self.last_keep_idx = idx
        kept = gather_tokens(x[:, p:], idx, validate=False, backend=self.backend)
        return torch.cat([x[:, :p], kept], dim=1) if p else kept

    def extra_repr(self) -> str:
        return f"prob={self.prob}, prefix={self.num_prefix_tokens}, mode={self.mode!r}, backend={self.backend!r}"


def use_msn_token_drop(model: nn.Module, backend: str = "auto", mode: str = "shared", prob: float | None = None,
                       generator: torch.Generator | None = None) -> list[str]:
    """Replace timm `PatchDropout` modules by `MSNTokenDrop` (same prob and prefix count); returns their names.

    `prob` given and no PatchDropout present: installs one at `model.patch_drop` (a timm ViT built
    with patch_drop_rate=0 has an Identity there), with `model.num_prefix_tokens` prefix tokens.
    """

    def is_patch_dropout(name, m):
        return type(m).__name__ == "PatchDropout" and type(m).__module__.startswith("timm.")

    names = _replace(model, is_patch_dropout, lambda m: MSNTokenDrop(prob if prob is not None else m.prob,
                                                                     m.num_prefix_tokens, mode, backend, generator))
    if not names and prob is not None and isinstance(getattr(model, "patch_drop", None), nn.Identity):
        model.patch_drop = MSNTokenDrop(prob, int(getattr(model, "num_prefix_tokens", 1)), mode, backend, generator)
        names = ["patch_drop"]
    if not names:
        raise ValueError(f"use_msn_token_drop: no timm PatchDropout in {type(model).__name__} "
                         "(pass prob= to install one at model.patch_drop)")
    return names
