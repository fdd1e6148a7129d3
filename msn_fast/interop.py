"""Weights in and out: the official MSN checkpoints, timm's `VisionTransformer`, Hugging Face's `ViTMSNModel`.

Official MSN (facebookresearch/msn, src/deit.py + src/msn_train.py): a `torch.save`d dict with
`target_encoder` (the released weights; `encoder`, the student, in training checkpoints too) and
`prototypes` [K, d]; encoder keys carry DDP's `module.` prefix. Trunk keys are timm's:
`patch_embed.proj.*`, `cls_token`, `pos_embed` [1, 1+N, D], `blocks.i.{norm1, attn.qkv, attn.proj,
norm2, mlp.fc1, mlp.fc2}.*`, `norm.*`; the projection head is `fc` = Sequential(OrderedDict(fc1, bn1,
gelu1, fc2, bn2, gelu2, fc3)) (no bn* without use_bn). Our trunk differs only in `patch_embed.*`
(a bare conv) and `mlp.0/mlp.2` (an nn.Sequential); our head is `head.mlp.{0,1,3,4,6}`.

    model, cfg = load_official("vits16_800ep.pth.tar")      # MSN with student = target = the weights
    sd = to_timm_state_dict(model.target.trunk)            # timm layout, no timm needed
    vit = to_timm(model.target.trunk)                       # a timm VisionTransformer (pip install timm)
    trunk = from_timm(timm.create_model("vit_small_patch16_224", pretrained=False))
    hf = to_hf(model)                                        # a transformers ViTMSNModel (pip install "msn-fast[hf]")
    trunk = from_hf(ViTMSNModel.from_pretrained("facebook/vit-msn-small"))

The number of heads is not in the weights: it is inferred from the width as in the official models
(192: 3, 384: 6, 768: 12, 1024 and 1280: 16), or passed as `heads=`.
CLI: `python -m msn_fast.interop export-timm RUN_DIR out.pth` / `export-official RUN_DIR out.pth.tar` /
`export-hf RUN_DIR OUT_DIR` (a `save_pretrained` folder: config.json + model.safetensors).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .config import Config, HeadConfig, ViTConfig
from .model import MSN
from .vit import VisionTransformer, ViTArch

if TYPE_CHECKING:
    from transformers import ViTMSNModel

OFFICIAL_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}


class InteropError(ValueError):
    """Weights that cannot be converted; the message says which key or setting is the problem."""


# --- trunk: ours <-> timm / official (the official trunk layout IS timm's) -------------------------------

_OURS_TO_TIMM = [
    (re.compile(r"^patch_embed\.(weight|bias)$"), r"patch_embed.proj.\1"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.0\.(weight|bias)$"), r"blocks.\1.mlp.fc1.\2"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.2\.(weight|bias)$"), r"blocks.\1.mlp.fc2.\2"),
]
_TIMM_TO_OURS = [
    (re.compile(r"^patch_embed\.proj\.(weight|bias)$"), r"patch_embed.\1"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.fc1\.(weight|bias)$"), r"blocks.\1.mlp.0.\2"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.fc2\.(weight|bias)$"), r"blocks.\1.mlp.2.\2"),
]
_TRUNK_KEY = re.compile(r"^(cls_token|pos_embed|patch_embed\..*|blocks\.\d+\.(norm1|attn\.qkv|attn\.proj|norm2|mlp)"
                        r"\..*|norm\.(weight|bias))$")


def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        if pattern.match(key):
            return pattern.sub(repl, key)
    return key


def _linear_stem_only(sd: dict) -> dict:
    """`sd` if its patch embedding is the linear projection; a conv stem (vit.stem conv) has no counterpart."""
    if any(k.startswith("patch_embed.layers.") for k in sd):
        raise InteropError("this ViT has a conv stem (vit.stem conv): timm, transformers and the official code "
                           "embed patches with one linear projection, so it has no counterpart there")
    return sd


def to_timm_state_dict(trunk: VisionTransformer | dict) -> dict[str, torch.Tensor]:
    """Our trunk (module or state dict) -> timm VisionTransformer keys (= official deit.py trunk keys)."""
    sd = _linear_stem_only(trunk.state_dict() if isinstance(trunk, torch.nn.Module) else trunk)
    return OrderedDict((_rename(k, _OURS_TO_TIMM), v) for k, v in sd.items())


def from_timm_state_dict(sd: dict[str, torch.Tensor], *, drop_head: bool = True) -> dict[str, torch.Tensor]:
    """timm / official trunk keys -> ours. Classifier keys (`head.*`, `fc_norm.*`) are dropped; any other
    key we have no place for (register tokens, layer scale, qk-norm, ...) is an InteropError."""
    out, unknown = OrderedDict(), []
    for k, v in sd.items():
        if drop_head and (k.startswith("head.") or k.startswith("fc_norm.") or k.startswith("head_drop")):
            continue
        if not _TRUNK_KEY.match(k):
            unknown.append(k)
            continue
        out[_rename(k, _TIMM_TO_OURS)] = v
    if unknown:
        raise InteropError(f"keys with no counterpart in an msn-fast ViT: {', '.join(unknown[:8])}"
                           f"{' ...' if len(unknown) > 8 else ''}")
    return out


def arch_from_state_dict(sd: dict[str, torch.Tensor], heads: int | None = None) -> tuple[ViTArch, int]:
    """(ViTArch, img_size) read off a trunk state dict in OUR layout (the linear patch projection's)."""
    _linear_stem_only(sd)
    try:
        w = sd["patch_embed.weight"]
        n_tokens = sd["pos_embed"].shape[1]
        hidden = sd["blocks.0.mlp.0.weight"].shape[0]
    except KeyError as e:
        raise InteropError(f"not a ViT trunk state dict: missing {e.args[0]!r}") from None
    dim, patch = w.shape[0], w.shape[-1]
    if w.shape[-1] != w.shape[-2]:
        raise InteropError(f"non-square patches {tuple(w.shape[-2:])} are not supported")
    grid = round((n_tokens - 1) ** 0.5)
    if grid * grid != n_tokens - 1:
        raise InteropError(f"pos_embed has {n_tokens} rows: expected 1 CLS row + a square grid")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    heads = heads or OFFICIAL_HEADS.get(dim)
    if heads is None:
        raise InteropError(f"width {dim} is not an official model's: pass heads=")
    return ViTArch(dim=dim, depth=depth, heads=heads, patch_size=patch, mlp_ratio=hidden / dim), grid * patch


def trunk_from_state_dict(sd: dict[str, torch.Tensor], heads: int | None = None, **kwargs) -> VisionTransformer:
    """A VisionTransformer built to fit `sd` (our layout) with its weights loaded."""
    arch, img_size = arch_from_state_dict(sd, heads)
    trunk = VisionTransformer(arch, img_size=img_size, **kwargs)
    trunk.load_state_dict(sd)
    return trunk


# --- timm modules (optional dependency) -----------------------------------------------------------------

def _timm():
    try:
        import timm.models.vision_transformer as tvit
    except ImportError as e:
        raise ImportError("timm is not installed: pip install timm (or pip install 'msn-fast[timm]')") from e
    return tvit


def to_timm(trunk: VisionTransformer, num_classes: int = 0, **kwargs):
    """A timm `VisionTransformer` with `trunk`'s weights (classifier head: `num_classes`, default none).

    `vit.forward_features(x)[:, 0]` equals `trunk(x)`; the last block's CLS before the norm (our
    `extract_features`) is `vit.forward_intermediates(x, indices=1, intermediates_only=True,
    output_fmt="NLC", return_prefix_tokens=True)` or simply the blocks' output.
    """
    tvit = _timm()
    a = trunk.arch
    vit = tvit.VisionTransformer(img_size=trunk.img_size, patch_size=a.patch_size, embed_dim=a.dim, depth=a.depth,
                                 num_heads=a.heads, mlp_ratio=a.mlp_ratio, qkv_bias=True, num_classes=num_classes,
                                 global_pool="token", class_token=True, **kwargs)
    missing, unexpected = vit.load_state_dict(to_timm_state_dict(trunk), strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise InteropError(f"timm model does not match: missing {missing}, unexpected {unexpected}")
    return vit.to(trunk.pos_embed.device)


def from_timm(vit, attn_impl: str = "auto") -> VisionTransformer:
    """Our VisionTransformer from a timm `VisionTransformer` in the plain ViT/DeiT layout.

    Rejected (InteropError): register tokens, no CLS token, `no_embed_class`, a pre-norm, layer
    scale, qk-norm, a patch-embed norm, non-square patches; a missing qkv bias becomes a zero bias.
    """
    tvit = _timm()
    if not isinstance(vit, tvit.VisionTransformer):
        raise InteropError(f"expected a timm VisionTransformer, got {type(vit).__name__}")
    problems = []
    if getattr(vit, "cls_token", None) is None or getattr(vit, "num_reg_tokens", 0):
        problems.append("needs exactly one CLS token and no register tokens")
    if getattr(vit, "no_embed_class", False) or getattr(vit, "pos_embed", None) is None:
        problems.append("needs a learned pos_embed that includes the CLS row")
    if not isinstance(vit.norm_pre, torch.nn.Identity) or not isinstance(vit.patch_embed.norm, torch.nn.Identity):
        problems.append("pre-norm / patch-embed norm are not supported")
    blk = vit.blocks[0]
    if not all(isinstance(getattr(blk, n, torch.nn.Identity()), torch.nn.Identity) for n in ("ls1", "ls2")):
        problems.append("layer scale is not supported")
    if not isinstance(getattr(blk.attn, "q_norm", torch.nn.Identity()), torch.nn.Identity):
        problems.append("qk-norm is not supported")
    if not isinstance(blk.mlp.act, torch.nn.GELU) or blk.mlp.act.approximate != "none":
        problems.append("the MLP activation must be exact GELU")
    ph, pw = vit.patch_embed.patch_size
    ih, iw = vit.patch_embed.img_size
    if ph != pw or ih != iw:
        problems.append("non-square patches or images are not supported")
    if problems:
        raise InteropError("cannot convert this timm ViT: " + "; ".join(problems))
    sd = {k: v for k, v in vit.state_dict().items()}
    for i, b in enumerate(vit.blocks):
        if b.attn.qkv.bias is None:
            sd[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(b.attn.qkv.out_features, dtype=b.attn.qkv.weight.dtype,
                                                          device=b.attn.qkv.weight.device)
    eps = {m.eps for m in vit.modules() if isinstance(m, torch.nn.LayerNorm)}
    if eps - {1e-6}:
        raise InteropError(f"LayerNorm eps {sorted(eps)}: an msn-fast ViT uses 1e-6")
    ours = from_timm_state_dict(sd)
    arch, _ = arch_from_state_dict(ours, heads=blk.attn.num_heads)
    trunk = VisionTransformer(arch, img_size=ih, attn_impl=attn_impl, device=vit.pos_embed.device)
    trunk.load_state_dict(ours)
    return trunk


# --- Hugging Face transformers ViTMSNModel (optional dependency) ----------------------------------------
# Two module layouts: transformers >= 5 (`layers.i.attention.q_proj`, `mlp.fc1`) and the one of 4.x, which
# is also what every release writes to disk and what the hub's facebook/vit-msn-* files hold
# (`encoder.layer.i.attention.attention.query`, `intermediate.dense`). Our fused qkv is [q; k; v] by rows.

_HF_TOP = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
           "patch_embed": "embeddings.patch_embeddings.projection", "norm": "layernorm"}
_HF_BLOCK = {"norm1": ("layernorm_before", "layernorm_before"), "norm2": ("layernorm_after", "layernorm_after"),
             "attn.proj": ("attention.o_proj", "attention.output.dense"), "mlp.0": ("mlp.fc1", "intermediate.dense"),
             "mlp.2": ("mlp.fc2", "output.dense")}  # ours -> (5.x modules, 4.x modules = on disk)
_HF_QKV = (("attention.q_proj", "attention.k_proj", "attention.v_proj"),
           ("attention.attention.query", "attention.attention.key", "attention.attention.value"))
_HF_LAYER = ("layers.{}.", "encoder.layer.{}.")
_HF_LAYER_KEY = re.compile(r"^(?:layers|encoder\.layer)\.(\d+)\.(.+)\.(weight|bias)$")
_HF_IGNORED = ("embeddings.mask_token",)  # ViTMSNModel(use_mask_token=True): not part of the MSN encoder
HF_INSTALL = 'transformers is not installed: pip install "msn-fast[hf]" (or pip install transformers)'


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError(HF_INSTALL) from None
    return transformers


def to_hf_state_dict(trunk: VisionTransformer | dict, legacy: bool = False) -> dict[str, torch.Tensor]:
    """Our trunk (module or state dict) -> ViTMSNModel keys; `legacy`: the 4.x / on-disk names."""
    sd = _linear_stem_only(trunk.state_dict() if isinstance(trunk, torch.nn.Module) else trunk)
    out = OrderedDict()
    for k, v in sd.items():
        m = re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$", k)
        if m is None:
            name, _, param = k.partition(".")
            out[_HF_TOP[name] + (f".{param}" if param else "")] = v
            continue
        prefix, sub, param = _HF_LAYER[legacy].format(m[1]), m[2], m[3]
        if sub == "attn.qkv":
            for name, part in zip(_HF_QKV[legacy], v.chunk(3, dim=0)):  # (3D, ...) -> 3 x (D, ...)
                out[f"{prefix}{name}.{param}"] = part
        else:
            out[f"{prefix}{_HF_BLOCK[sub][legacy]}.{param}"] = v
    return out


def from_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ViTMSNModel keys (either layout) -> ours. A missing q/k/v bias (qkv_bias=False) becomes zeros; any
    key we have no place for is an InteropError."""
    top = {v: k for k, v in _HF_TOP.items()}
    block = {name: ours for ours, names in _HF_BLOCK.items() for name in names}
    qkv_index = {name: i for names in _HF_QKV for i, name in enumerate(names)}
    out, qkv, unknown = OrderedDict(), {}, []
    for k, v in sd.items():
        if k in _HF_IGNORED:
            continue
        name, _, param = k.rpartition(".")
        m = _HF_LAYER_KEY.match(k)
        if m is None and (k in top or name in top):
            out[top[k] if k in top else f"{top[name]}.{param}"] = v
        elif m is not None and m[2] in block:
            out[f"blocks.{m[1]}.{block[m[2]]}.{m[3]}"] = v
        elif m is not None and m[2] in qkv_index:
            qkv.setdefault((int(m[1]), m[3]), [None] * 3)[qkv_index[m[2]]] = v
        else:
            unknown.append(k)
    if unknown:
        raise InteropError(f"keys with no counterpart in an msn-fast ViT: {', '.join(unknown[:8])}"
                           f"{' ...' if len(unknown) > 8 else ''}")
    for (i, param), parts in sorted(qkv.items()):
        if any(p is None for p in parts):
            raise InteropError(f"layer {i}: query, key and value {param}s must all be present")
        out[f"blocks.{i}.attn.qkv.{param}"] = torch.cat(parts)  # 3 x (D, ...) -> (3D, ...)
        if param == "weight" and (i, "bias") not in qkv:
            out[f"blocks.{i}.attn.qkv.bias"] = parts[0].new_zeros(3 * parts[0].shape[0])
    return out


def _as_trunk(model) -> VisionTransformer:
    """MSN -> its target encoder's trunk (what the official release ships); Encoder -> its trunk."""
    trunk = model.target.trunk if isinstance(model, MSN) else getattr(model, "trunk", model)
    if not isinstance(trunk, VisionTransformer):
        raise InteropError(f"expected an msn-fast MSN, Encoder or VisionTransformer, got {type(model).__name__}")
    return trunk


def to_hf(model: MSN | VisionTransformer) -> ViTMSNModel:
    """A transformers `ViTMSNModel` (eval mode, same device and dtype) holding the trunk's weights; an `MSN`
    gives its target encoder's trunk. The projection head and the prototypes have no place in it.

    Outputs (fp32): `hf(x).last_hidden_state` [B, 1+N, D] equals `trunk.forward_features(x)`: both apply
    the final LayerNorm to every token, so `last_hidden_state[:, 0]` is `trunk(x)` (the CLS the projection
    head sees). `hf(x, output_hidden_states=True).hidden_states[-1][:, 0]` is the last block's CLS before
    that norm, our `trunk.extract_features(x)` (the official evaluation feature). For an image size other
    than `trunk.img_size` (the 96 px focal views) pass `interpolate_pos_encoding=True`: transformers 5.x
    resizes the position grid bicubically as we do (older releases scale by a factor with DINO's +0.1
    offset, which can differ slightly). LayerNorm eps: ours, 1e-6, is set explicitly (ViTConfig's is 1e-12).
    """
    tf = _transformers()
    trunk = _as_trunk(model)
    a = trunk.arch
    config = tf.ViTMSNConfig(hidden_size=a.dim, num_hidden_layers=a.depth, num_attention_heads=a.heads,
                             intermediate_size=int(a.dim * a.mlp_ratio),  # = our Block's MLP width
                             hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                             layer_norm_eps=trunk.norm.eps, image_size=trunk.img_size, patch_size=a.patch_size,
                             num_channels=trunk.patch_embed.in_channels, qkv_bias=True)
    hf = tf.ViTMSNModel(config)
    legacy = not hasattr(hf, "layers")  # 4.x: hf.encoder.layer
    hf.load_state_dict(to_hf_state_dict(trunk, legacy=legacy))  # strict: every key of both sides
    return hf.to(device=trunk.pos_embed.device, dtype=trunk.pos_embed.dtype).eval()


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


def from_hf(model: ViTMSNModel, attn_impl: str = "auto") -> VisionTransformer:
    """Our VisionTransformer from a transformers `ViTMSNModel` (or the `.vit` of a ViTMSNForImageClassification).

    Rejected (InteropError): another activation than exact GELU, a LayerNorm eps other than our 1e-6,
    non-square images or patches, a head_dim that is not hidden_size / heads. Dropout settings are
    ignored (our trunk has none); the mask token, if any, is dropped.
    """
    tf = _transformers()
    model = getattr(model, "vit", model) if isinstance(model, tf.ViTMSNForImageClassification) else model
    if not isinstance(model, tf.ViTMSNModel):
        raise InteropError(f"expected a transformers ViTMSNModel, got {type(model).__name__}")
    c = model.config
    img, patch = _pair(c.image_size), _pair(c.patch_size)
    problems = []
    if c.hidden_act != "gelu":
        problems.append(f"hidden_act {c.hidden_act!r}: the MLP activation must be exact GELU ('gelu')")
    if c.layer_norm_eps != 1e-6:
        problems.append(f"layer_norm_eps {c.layer_norm_eps}: an msn-fast ViT uses 1e-6")
    if img[0] != img[1] or patch[0] != patch[1]:
        problems.append(f"non-square images {tuple(img)} or patches {tuple(patch)} are not supported")
    if getattr(c, "head_dim", None) not in (None, c.hidden_size // c.num_attention_heads):
        problems.append(f"head_dim {c.head_dim} is not hidden_size / num_attention_heads")
    if problems:
        raise InteropError("cannot convert this ViTMSNModel: " + "; ".join(problems))
    ratio = c.intermediate_size / c.hidden_size
    if int(c.hidden_size * ratio) < c.intermediate_size:  # our Block sizes the MLP as int(dim * mlp_ratio)
        ratio = math.nextafter(ratio, math.inf)
    arch = ViTArch(dim=c.hidden_size, depth=c.num_hidden_layers, heads=c.num_attention_heads, patch_size=patch[0],
                   mlp_ratio=ratio)
    p = model.embeddings.cls_token
    trunk = VisionTransformer(arch, img_size=img[0], in_chans=c.num_channels, attn_impl=attn_impl, device=p.device,
                              dtype=p.dtype)
    trunk.load_state_dict(from_hf_state_dict(model.state_dict()))
    return trunk.eval()


# --- official MSN checkpoints ---------------------------------------------------------------------------

def _strip_module(sd: dict) -> dict:
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in sd.items())


def _head_from_official(sd: dict) -> tuple[dict, bool, int]:
    """fc.* -> our head.mlp.* keys; returns (head state dict, use_bn, hidden layers)."""
    use_bn = any(k.startswith("fc.bn1.") for k in sd)
    idx = {"fc1": 0, "bn1": 1, "fc2": 3, "bn2": 4, "fc3": 6} if use_bn else {"fc1": 0, "fc2": 2, "fc3": 4}
    out = OrderedDict()
    for k, v in sd.items():
        if k.startswith("fc."):
            _, layer, param = k.split(".", 2)
            if layer not in idx:
                raise InteropError(f"unexpected projection-head key {k!r} (expected fc.fc1/bn1/fc2/bn2/fc3)")
            out[f"mlp.{idx[layer]}.{param}"] = v
    return out, use_bn, 2


def _head_to_official(head_sd: dict, use_bn: bool) -> dict:
    names = {0: "fc1", 1: "bn1", 3: "fc2", 4: "bn2", 6: "fc3"} if use_bn else {0: "fc1", 2: "fc2", 4: "fc3"}
    out = OrderedDict()
    for k, v in head_sd.items():
        _, i, param = k.split(".", 2)
        out[f"fc.{names[int(i)]}.{param}"] = v
    return out


def _split_official_encoder(sd: dict) -> tuple[dict, dict]:
    sd = _strip_module(sd)
    trunk = {k: v for k, v in sd.items() if not k.startswith("fc.") and not k.startswith("pred.")}
    head = {k: v for k, v in sd.items() if k.startswith("fc.")}
    return from_timm_state_dict(trunk, drop_head=False), head


def config_from_official(ckpt: dict, heads: int | None = None) -> Config:
    """The msn-fast Config (model shape, head, prototypes) that an official checkpoint's weights fit."""
    trunk, head = _split_official_encoder(ckpt["target_encoder"])
    arch, img_size = arch_from_state_dict(trunk, heads)
    if not head:
        raise InteropError("the checkpoint's target_encoder has no projection head (fc.*)")
    head_sd, use_bn, _ = _head_from_official(head)
    protos = ckpt.get("prototypes")
    cfg = Config(model=f"official_d{arch.dim}_p{arch.patch_size}",
                 vit=ViTConfig(dim=arch.dim, depth=arch.depth, heads=arch.heads, patch_size=arch.patch_size,
                               img_size=img_size, mlp_ratio=arch.mlp_ratio),
                 head=HeadConfig(hidden_dim=head_sd["mlp.0.weight"].shape[0], out_dim=head_sd[
                     f"mlp.{6 if use_bn else 4}.weight"].shape[0], use_bn=use_bn,
                     num_prototypes=protos.shape[0] if protos is not None else 1024))
    cfg.data.global_size = img_size
    return cfg


def official_to_msn_state_dict(ckpt: dict) -> dict[str, torch.Tensor]:
    """An official checkpoint dict -> an `MSN.state_dict()` (student = `encoder` if present, else the target)."""
    if "target_encoder" not in ckpt or ckpt["target_encoder"] is None:
        raise InteropError(f"not an official MSN checkpoint: no 'target_encoder' key (keys: {sorted(ckpt)[:8]})")
    out = OrderedDict()
    sources = {"target": ckpt["target_encoder"], "student": ckpt.get("encoder") or ckpt["target_encoder"]}
    for name in ("student", "target"):
        trunk, head = _split_official_encoder(sources[name])
        for k, v in trunk.items():
            out[f"{name}.trunk.{k}"] = v
        for k, v in _head_from_official(head)[0].items():
            out[f"{name}.head.{k}"] = v
    if "prototypes" in ckpt:
        out["prototypes"] = ckpt["prototypes"].float()
    return out


def load_official(path_or_ckpt, heads: int | None = None, device="cpu", attn_impl: str = "auto") -> tuple[MSN, Config]:
    """(MSN, Config) from an official checkpoint file or dict. Without `prototypes` they stay random."""
    ckpt = path_or_ckpt
    if not isinstance(ckpt, dict):
        ckpt = torch.load(path_or_ckpt, map_location="cpu", weights_only=True)
    cfg = config_from_official(ckpt, heads)
    cfg.vit.attn_impl = attn_impl
    model = MSN(cfg, device=device)
    sd = official_to_msn_state_dict(ckpt)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "prototypes"]
    if missing or unexpected:
        raise InteropError(f"official checkpoint does not fit: missing {missing[:6]}, unexpected {unexpected[:6]}")
    return model, cfg


def to_official_checkpoint(model: MSN, prefix: str = "module.") -> dict:
    """An `MSN` -> the official checkpoint layout (`encoder`, `target_encoder` with `module.` keys, `prototypes`),
    e.g. to run the official logistic_eval.py / linear_eval.py on msn-fast weights."""
    use_bn = model.cfg.head.use_bn
    out = {}
    for key, enc in (("encoder", model.student), ("target_encoder", model.target)):
        sd = OrderedDict((prefix + k, v) for k, v in to_timm_state_dict(enc.trunk).items())
        sd.update((prefix + k, v) for k, v in _head_to_official(enc.head.state_dict(), use_bn).items())
        out[key] = sd
    out["prototypes"] = model.prototypes.detach().clone()
    return out


# --- CLI ------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """python -m msn_fast.interop export-timm|export-official|export-hf RUN_DIR OUT: write the target encoder's
    weights (export-hf: a folder that transformers' ViTMSNModel.from_pretrained loads)."""
    from .checkpoint import CheckpointError, load_model

    p = argparse.ArgumentParser(prog="python -m msn_fast.interop", description=main.__doc__)
    p.add_argument("command", choices=["export-timm", "export-official", "export-hf"])
    p.add_argument("checkpoint", help="msn-fast run directory or checkpoint step directory")
    p.add_argument("out", help="output .pth file (export-hf: output directory)")
    args = p.parse_args(argv)
    try:
        if args.command == "export-hf":
            _transformers()  # before the checkpoint is read
        model, _ = load_model(args.checkpoint)
    except (CheckpointError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if args.command == "export-hf":
            to_hf(model).save_pretrained(args.out)  # config.json + model.safetensors
        else:
            state = (to_timm_state_dict(model.target.trunk) if args.command == "export-timm" else
                     to_official_checkpoint(model))
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, args.out)
    except InteropError as e:  # e.g. a conv stem, which none of these formats has
        print(f"error: {args.checkpoint}: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
