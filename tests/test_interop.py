"""Weights in and out (official MSN layout, timm layout) and our kernels patched into a timm ViT."""

import os

import pytest
import torch

from msn_fast.config import Config, HeadConfig, ViTConfig
from msn_fast.interop import (
    InteropError,
    config_from_official,
    from_timm_state_dict,
    load_official,
    official_to_msn_state_dict,
    to_official_checkpoint,
    to_timm_state_dict,
    trunk_from_state_dict,
)
from msn_fast.model import MSN


def _tiny_cfg(use_bn=True):
    return Config(vit=ViTConfig(dim=32, depth=2, heads=2, patch_size=4, img_size=16),
                  head=HeadConfig(hidden_dim=48, out_dim=24, num_prototypes=10, use_bn=use_bn))


def _trained_like(model):
    """Move every tensor (incl. BN running stats) off its init so a lost or swapped key shows."""
    with torch.no_grad():
        for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            t.add_(torch.randn_like(t) * 0.05)
        model.student.trunk.pos_embed.add_(1.0)  # student != target
    return model


@pytest.mark.parametrize("use_bn", [True, False])
def test_official_checkpoint_round_trip(use_bn, tmp_path):
    model = _trained_like(MSN(_tiny_cfg(use_bn)))
    ckpt = to_official_checkpoint(model)
    # the official key names, with DDP's prefix
    keys = set(ckpt["target_encoder"])
    assert {"module.patch_embed.proj.weight", "module.cls_token", "module.pos_embed", "module.blocks.1.mlp.fc2.bias",
            "module.blocks.0.attn.qkv.weight", "module.norm.weight", "module.fc.fc1.weight",
            "module.fc.fc3.bias"} <= keys
    assert ("module.fc.bn2.running_var" in keys) == use_bn
    assert not any(".mlp.0." in k or k.startswith("module.head") for k in keys)
    # the official head module (msn_train.init_model) loads our exported fc.* and computes the same thing
    from collections import OrderedDict

    layers = [("fc1", torch.nn.Linear(32, 48))] + ([("bn1", torch.nn.BatchNorm1d(48))] if use_bn else []) + [
        ("gelu1", torch.nn.GELU()), ("fc2", torch.nn.Linear(48, 48))] + (
        [("bn2", torch.nn.BatchNorm1d(48))] if use_bn else []) + [("gelu2", torch.nn.GELU()),
                                                                  ("fc3", torch.nn.Linear(48, 24))]
    official_fc = torch.nn.Sequential(OrderedDict(layers)).eval()
    official_fc.load_state_dict({k[len("module.fc."):]: v for k, v in ckpt["target_encoder"].items()
                                 if k.startswith("module.fc.")})
    h = torch.randn(4, 32)
    torch.testing.assert_close(official_fc(h), model.target.head.eval()(h))
    torch.save(ckpt, tmp_path / "msn.pth.tar")

    loaded, cfg = load_official(tmp_path / "msn.pth.tar", heads=2)
    assert (cfg.vit.dim, cfg.vit.depth, cfg.vit.patch_size, cfg.vit.img_size) == (32, 2, 4, 16)
    assert (cfg.head.hidden_dim, cfg.head.out_dim, cfg.head.use_bn, cfg.head.num_prototypes) == (48, 24, use_bn, 10)
    ref = model.state_dict()
    got = loaded.state_dict()
    assert set(ref) == set(got)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)
    model.eval()
    loaded.eval()
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(loaded.target.trunk.extract_features(x), model.target.trunk.extract_features(x))
    torch.testing.assert_close(loaded.target(x), model.target(x))


def test_released_checkpoint_target_only():
    """Released checkpoints hold only target_encoder + prototypes: the student becomes a copy of the target."""
    model = _trained_like(MSN(_tiny_cfg()))
    ckpt = to_official_checkpoint(model)
    del ckpt["encoder"]
    sd = official_to_msn_state_dict(ckpt)
    for k, v in sd.items():
        if k.startswith("student."):
            torch.testing.assert_close(v, sd["target." + k[len("student."):]])
    with pytest.raises(InteropError, match="target_encoder"):
        official_to_msn_state_dict({"encoder": ckpt["target_encoder"]})


def test_official_heads_inferred_from_width():
    cfg = Config(vit=ViTConfig(dim=192, depth=1, heads=3, patch_size=16, img_size=32),
                 head=HeadConfig(hidden_dim=16, out_dim=8, num_prototypes=4))
    ckpt = to_official_checkpoint(MSN(cfg))
    assert config_from_official(ckpt).vit.heads == 3
    ckpt32 = to_official_checkpoint(MSN(_tiny_cfg()))
    with pytest.raises(InteropError, match="heads"):
        config_from_official(ckpt32)


def test_timm_state_dict_names_round_trip():
    trunk = _trained_like(MSN(_tiny_cfg())).target.trunk
    sd = to_timm_state_dict(trunk)
    assert "patch_embed.proj.weight" in sd and "blocks.1.mlp.fc1.weight" in sd and "patch_embed.weight" not in sd
    back = trunk_from_state_dict(from_timm_state_dict(sd), heads=2)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(back.extract_features(x), trunk.extract_features(x), rtol=0, atol=0)
    with pytest.raises(InteropError, match="reg_token"):
        from_timm_state_dict({**sd, "reg_token": torch.zeros(1, 4, 32)})


# --- with timm (optional dependency) ------------------------------------------------------------

def _timm_vit(**kw):
    tvit = pytest.importorskip("timm.models.vision_transformer")
    torch.manual_seed(1)
    args = dict(img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=0)
    args.update(kw)
    vit = tvit.VisionTransformer(**args)
    with torch.no_grad():  # random, non-trivial weights everywhere (timm zero-inits some biases and the cls token)
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vit.eval()


def _timm_prenorm_cls(vit, x):
    t = vit._pos_embed(vit.patch_embed(x))
    for blk in vit.blocks:
        t = blk(t)
    return t[:, 0]


def test_timm_import_export_matches_outputs():
    from msn_fast.interop import from_timm, to_timm

    vit = _timm_vit()
    x = torch.randn(3, 3, 16, 16)
    trunk = from_timm(vit, attn_impl="eager")
    with torch.no_grad():
        torch.testing.assert_close(trunk(x), vit.forward_features(x)[:, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(trunk.extract_features(x), _timm_prenorm_cls(vit, x), rtol=1e-5, atol=1e-5)
    back = to_timm(trunk).eval()
    ref, got = vit.state_dict(), back.state_dict()
    assert set(ref) == set(got)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)
    with torch.no_grad():
        torch.testing.assert_close(back.forward_features(x), vit.forward_features(x), rtol=1e-6, atol=1e-6)


def test_timm_export_from_msn_model():
    from msn_fast.interop import to_timm

    trunk = _trained_like(MSN(_tiny_cfg())).target.trunk
    vit = to_timm(trunk, num_classes=5).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(x)[:, 0], trunk(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_timm_prenorm_cls(vit, x), trunk.extract_features(x), rtol=1e-5, atol=1e-5)
    assert vit.head.out_features == 5


def test_timm_unsupported_variants_rejected():
    from msn_fast.interop import from_timm

    with pytest.raises(InteropError, match="layer scale"):
        from_timm(_timm_vit(init_values=1e-5))
    with pytest.raises(InteropError, match="register"):
        from_timm(_timm_vit(reg_tokens=2))


# --- kernels patched into timm ------------------------------------------------------------------

def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(model, x):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model.forward_features(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()  # a non-uniform upstream gradient
    return out.detach(), _grads(model), x.grad


@pytest.mark.parametrize("backend", ["torch", "eager"])
def test_patched_timm_matches_unpatched(backend):
    import copy

    from msn_fast.patching import MSNAttention, restore_attention, use_msn_attention

    vit = _timm_vit()
    ref_out, ref_g, ref_dx = _run(vit, torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    patched = copy.deepcopy(vit)
    names = use_msn_attention(patched, backend=backend)
    assert names == ["blocks.0.attn", "blocks.1.attn"]
    assert all(isinstance(b.attn, MSNAttention) for b in patched.blocks)
    assert list(patched.state_dict()) == list(vit.state_dict())  # same keys, same order
    out, g, dx = _run(patched, torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(dx, ref_dx, **tol)
    assert set(g) == set(ref_g)
    for k in g:
        torch.testing.assert_close(g[k], ref_g[k], **tol, msg=k)
    assert restore_attention(patched) == names
    assert type(patched.blocks[0].attn).__name__ == "Attention"
    assert patched.blocks[0].attn.qkv is patched.blocks[0].attn.qkv  # weights were shared, never copied


def test_patched_timm_triton_attention_interpreter():
    """The Triton attention kernel inside a timm ViT (interpreter on a CPU; tiny shape, head dim 32)."""
    import copy

    from msn_fast.patching import use_msn_attention

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("needs CUDA or the Triton interpreter")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    vit = _timm_vit(depth=1).to(dev)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)).to(dev)
    ref_out, ref_g, ref_dx = _run(vit, x)
    patched = copy.deepcopy(vit)
    use_msn_attention(patched, backend="triton")
    out, g, dx = _run(patched, x)
    tol = dict(rtol=2e-4, atol=2e-4)  # TF32-free fp32 kernel: only summation order differs
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(dx, ref_dx, **tol)
    for k in ref_g:
        torch.testing.assert_close(g[k], ref_g[k], **tol, msg=k)


def test_patched_attention_falls_back_for_masks_and_dropout():
    from msn_fast.patching import use_msn_attention

    vit = _timm_vit(depth=1)
    attn = vit.blocks[0].attn
    x = torch.randn(2, 5, 64)
    mask = torch.rand(5, 5) > 0.3
    mask.fill_diagonal_(True)
    ref = attn(x, attn_mask=mask)
    use_msn_attention(vit, backend="eager")
    torch.testing.assert_close(vit.blocks[0].attn(x, attn_mask=mask), ref)
    with pytest.raises(ValueError, match="no attention module"):
        use_msn_attention(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("mode", ["shared", "per_sample"])
def test_token_drop_in_timm(mode):
    """timm's PatchDropout replaced by the gather kernel: training output and gradients match a plain
    gather with the same kept indices, for the torch and (interpreter) Triton backends alike."""
    import copy

    from msn_fast.patching import MSNTokenDrop, use_msn_token_drop

    base = _timm_vit(patch_drop_rate=0.5, depth=1)
    base.train()
    results = {}
    backends = ["torch"] + (["triton"] if torch.cuda.is_available()
                            or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else [])
    for backend in backends:
        vit = copy.deepcopy(base)
        assert use_msn_token_drop(vit, backend=backend, mode=mode,
                                  generator=torch.Generator().manual_seed(3)) == ["patch_drop"]
        assert isinstance(vit.patch_drop, MSNTokenDrop)
        x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        out, g, dx = _run(vit, x)
        results[backend] = (out, g, dx, vit.patch_drop.last_keep_idx)
    out, g, dx, idx = results["torch"]
    assert out.shape == (2, 1 + 8, 64)  # 16 patches, keep floor(16 * 0.5) = 8, plus CLS
    assert idx.shape == ((8,) if mode == "shared" else (2, 8))
    # reference: the unpatched timm model with its PatchDropout replaced by the same explicit gather
    ref_vit = copy.deepcopy(base)

    class Fixed(torch.nn.Module):
        def forward(self, t):
            pt = t[:, 1:]
            kept = pt[:, idx] if idx.dim() == 1 else torch.gather(pt, 1, idx[..., None].expand(-1, -1, pt.shape[-1]))
            return torch.cat([t[:, :1], kept], 1)

    ref_vit.patch_drop = Fixed()
    ref_out, ref_g, ref_dx = _run(ref_vit, torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    for b, (o, gg, d, i) in results.items():
        torch.testing.assert_close(i, idx)
        torch.testing.assert_close(o, ref_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(d, ref_dx, rtol=1e-5, atol=1e-5)
        for k in ref_g:
            torch.testing.assert_close(gg[k], ref_g[k], rtol=1e-5, atol=1e-5, msg=f"{b}: {k}")
    vit.eval()
    assert vit.forward_features(torch.randn(1, 3, 16, 16)).shape == (1, 17, 64)  # identity in eval


def test_interop_cli_exports(tmp_path, capsys):
    from msn_fast.checkpoint import save_checkpoint
    from msn_fast.config import to_dict
    from msn_fast.interop import main
    from msn_fast.model import param_groups

    cfg = _tiny_cfg()
    model = _trained_like(MSN(cfg))
    save_checkpoint(tmp_path / "run", model=model, optimizer=torch.optim.AdamW(param_groups(model)), step=1,
                    config=to_dict(cfg))
    assert main(["export-timm", str(tmp_path / "run"), str(tmp_path / "t.pth")]) == 0
    sd = torch.load(tmp_path / "t.pth", weights_only=True)
    assert set(sd) == set(to_timm_state_dict(model.target.trunk))
    torch.testing.assert_close(sd["blocks.1.mlp.fc1.weight"], model.target.trunk.blocks[1].mlp[0].weight)
    assert main(["export-official", str(tmp_path / "run"), str(tmp_path / "o.pth.tar")]) == 0
    loaded, _ = load_official(tmp_path / "o.pth.tar", heads=2)
    torch.testing.assert_close(loaded.prototypes, model.prototypes)
    assert main(["export-timm", str(tmp_path / "missing"), str(tmp_path / "x.pth")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
