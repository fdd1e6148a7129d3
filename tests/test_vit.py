import pytest
import torch

from msn_fast.heads import ProjectionHead
from msn_fast.masking import num_kept
from msn_fast.vit import ARCHS, VisionTransformer, ViTArch, build_vit, get_arch


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_every_registered_config_on_meta_with_official_token_counts(name):
    """Full-size models built on the meta device (no memory): token counts of the MSN views."""
    arch = ARCHS[name]
    vit = build_vit(name, img_size=224, device="meta")
    n = (224 // arch.patch_size) ** 2
    assert vit.num_patches == n and vit.pos_embed.shape == (1, 1 + n, arch.dim)
    ratio = {"vit_l7": 0.7, "vit_b4": 0.7, "vit_s16": 0.15}.get(name, 0.3)
    keep = torch.arange(num_kept(n, ratio), device="meta")
    x = torch.empty(2, 3, 224, 224, device="meta")
    tokens = vit.embed(x, keep)
    assert tokens.shape == (2, 1 + num_kept(n, ratio), arch.dim)
    focal = vit.embed(torch.empty(2, 3, 96, 96, device="meta"))
    assert focal.shape == (2, 1 + (96 // arch.patch_size) ** 2, arch.dim)


def test_official_l7_numbers():
    """The token counts of MSN's ViT-L/7 views, from the model itself (meta device: shapes only)."""
    vit = build_vit("vit_l7", device="meta")
    assert vit.num_patches == 1024  # 32 x 32
    keep = torch.arange(num_kept(1024, 0.7), device="meta")
    anchor = vit.embed(torch.empty(1, 3, 224, 224, device="meta"), keep)
    assert anchor.shape == (1, 308, 1024)  # 307 kept patches + CLS
    focal = vit.embed(torch.empty(1, 3, 96, 96, device="meta"))
    assert focal.shape == (1, 170, 1024)  # 13 x 13 patches + CLS: the stride-7 conv drops 5 px
    assert vit(torch.empty(2, 3, 96, 96, device="meta")).shape == (2, 1024)


def _check_normal(t, std, name):
    """Sample mean and std of i.i.d. zero-mean draws within 6 standard errors of the distribution's."""
    x = t.detach().double().flatten()
    n = x.numel()
    assert abs(x.mean().item()) <= 6 * std / n**0.5, (name, x.mean().item())
    assert abs(x.std().item() / std - 1) <= 6 / (2 * n) ** 0.5, (name, x.std().item(), std)


def test_init_follows_the_official_recipe():
    """msn_spec.md: trunc_normal(0.02) for linears (bias 0), pos-embed and CLS; LayerNorm 1/0;
    Kaiming normal (fan-in, ReLU gain) for the patch conv; prototypes Uniform(±1/√d); head BN 1/0."""
    from msn_fast.config import Config, HeadConfig, ViTConfig
    from msn_fast.model import MSN

    cfg = Config(vit=ViTConfig(dim=192, depth=2, heads=3, patch_size=8, img_size=64),
                 head=HeadConfig(hidden_dim=256, out_dim=128, num_prototypes=512))
    model = MSN(cfg)
    vit = model.student.trunk
    fan_in = 3 * 8 * 8
    _check_normal(vit.patch_embed.weight, (2 / fan_in) ** 0.5, "patch conv")  # linear gain: sqrt(2) smaller
    assert (vit.patch_embed.bias == 0).all()
    _check_normal(vit.pos_embed, 0.02, "pos_embed")
    _check_normal(vit.cls_token, 0.02, "cls_token")
    linears = [(n, m) for n, m in model.student.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 4 + 3  # qkv, proj, fc1, fc2 per block; the head's three
    for n, m in linears:
        _check_normal(m.weight, 0.02, n)
        assert (m.bias == 0).all(), n
    norms = [m for m in model.student.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm1d))]
    assert len(norms) == 2 * 2 + 1 + 2
    for m in norms:
        assert (m.weight == 1).all() and (m.bias == 0).all()
    p, bound = model.prototypes.detach().double(), 1 / 128**0.5
    assert p.abs().max() <= bound and p.abs().max() > bound * (1 - 10 / p.numel())
    _check_normal(p, bound / 3**0.5, "prototypes")  # a uniform's std; its mean 0
    for a, b in zip(model.student.parameters(), model.target.parameters()):  # the EMA target starts equal
        assert torch.equal(a, b) and not b.requires_grad


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_every_config_runs_at_tiny_width_on_cpu(name):
    arch = get_arch(name)
    small = ViTArch(dim=16, depth=2, heads=2, patch_size=arch.patch_size)
    vit = VisionTransformer(small, img_size=2 * arch.patch_size * 2)
    s = vit.img_size
    x = torch.randn(3, 3, s, s)
    keep = torch.randperm(vit.num_patches)[: num_kept(vit.num_patches, 0.5)]
    out = vit(x, keep)
    assert out.shape == (3, 16) and torch.isfinite(out).all()
    out.sum().backward()
    assert vit.pos_embed.grad is not None


def test_aliases_and_unknown_name():
    assert get_arch("vit_small") == ARCHS["vit_s16"]
    assert get_arch("vit_huge") == ARCHS["vit_h14"]
    with pytest.raises(ValueError, match="unknown model 'vit_xl'"):
        get_arch("vit_xl")


def test_vit_tiny_recipe_is_deit_ti_and_cpu_demo_is_the_demo():
    """`--model vit_tiny` is DeiT-Ti (ARCHS' sizes, 224 px, official views); `cpu_demo` is the 32 px CPU demo."""
    from msn_fast.recipes import get_recipe

    tiny, demo = get_recipe("vit_tiny"), get_recipe("cpu_demo")
    arch = ARCHS["vit_tiny"]
    assert (arch.dim, arch.depth, arch.heads, arch.patch_size) == (192, 12, 3, 16)  # DeiT-Ti
    v = tiny.vit
    assert (tiny.model, v.dim, v.depth, v.heads, v.patch_size, v.mlp_ratio) == ("vit_tiny", *vars(arch).values())
    assert v.img_size == tiny.data.global_size == 224 and (tiny.data.focal_size, tiny.data.num_focal) == (96, 10)
    assert tiny.run.out_dir == "runs/vit_tiny"
    v = demo.vit
    assert (demo.model, v.dim, v.depth, v.heads, v.patch_size, v.mlp_ratio) == ("cpu_demo", 128, 4, 4, 4, 2.0)
    assert v.img_size == demo.data.global_size == 32 and demo.run.out_dir == "runs/cpu_demo"


@pytest.mark.parametrize("impl", ["torch", "eager"])
def test_attention_impls_agree(impl):
    torch.manual_seed(0)
    vit = VisionTransformer(ViTArch(dim=32, depth=2, heads=4, patch_size=4), img_size=20)
    x = torch.randn(2, 3, 20, 20)
    vit.set_attn_impl("eager")
    ref = vit(x)
    vit.set_attn_impl(impl)
    torch.testing.assert_close(vit(x), ref, atol=1e-5, rtol=1e-5)


def test_pos_embed_interpolation_for_focal_views():
    vit = VisionTransformer(ViTArch(dim=16, depth=1, heads=2, patch_size=4), img_size=32)
    pos = vit.patch_pos_embed(8, 8)
    torch.testing.assert_close(pos, vit.pos_embed[:, 1:])
    small = vit.patch_pos_embed(4, 4)
    assert small.shape == (1, 16, 16)
    # a focal view's forward uses 16 patches + CLS
    assert vit.forward_features(torch.randn(1, 3, 16, 16)).shape == (1, 17, 16)


def test_eval_features_are_pre_norm_cls():
    vit = VisionTransformer(ViTArch(dim=16, depth=2, heads=2, patch_size=4), img_size=16)
    x = torch.randn(2, 3, 16, 16)
    feats = vit.extract_features(x)
    t = vit.embed(x)
    for blk in vit.blocks:
        t = blk(t)
    torch.testing.assert_close(feats, t[:, 0])
    torch.testing.assert_close(vit.norm(feats), vit(x))


@pytest.mark.parametrize("impl", ["torch", "eager"])
@pytest.mark.parametrize("depth, masked", [(1, False), (3, True), (2, False)])
def test_cls_only_last_block_matches_the_full_forward(impl, depth, masked):
    """trunk(x) computes the last block's CLS row alone; it must equal the full forward's CLS, and give every
    parameter the same gradient (fp64, fresh weights, odd sizes: 3 heads of 7, 5 x 5 patches, MLP ratio 1.5)."""
    torch.manual_seed(depth)
    vit = VisionTransformer(ViTArch(dim=21, depth=depth, heads=3, patch_size=3, mlp_ratio=1.5), img_size=15,
                            attn_impl=impl).double()
    with torch.no_grad():
        for p in vit.parameters():  # init leaves biases and LayerNorm at 0 / 1: randomise, so each one counts
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(3, 3, 15, 15, dtype=torch.float64)
    keep = torch.stack([torch.randperm(25)[:11] for _ in range(3)]) if masked else None
    w = torch.randn(3, 21, dtype=torch.float64)
    grads = []
    for out in (lambda: vit(x, keep), lambda: vit.forward_features(x, keep)[:, 0]):
        vit.zero_grad(set_to_none=True)
        y = out()
        (y * w).sum().backward()
        grads.append((y.detach(), {n: p.grad.clone() for n, p in vit.named_parameters()}))
    (y_fast, g_fast), (y_full, g_full) = grads
    assert y_fast.shape == (3, 21)
    torch.testing.assert_close(y_fast, y_full, rtol=1e-10, atol=1e-10)
    assert g_fast.keys() == g_full.keys()
    for name in g_full:
        assert g_full[name].abs().sum() > 0, name
        torch.testing.assert_close(g_fast[name], g_full[name], rtol=1e-9, atol=1e-10, msg=name)
    pre = vit.embed(x, keep)
    for blk in vit.blocks:
        pre = blk(pre)
    torch.testing.assert_close(vit.cls_features(x, keep), pre[:, 0], rtol=1e-10, atol=1e-10)


def test_official_init_statistics():
    vit = build_vit("vit_s16")
    assert abs(vit.pos_embed.std().item() - 0.02) < 0.003
    w = vit.blocks[0].attn.qkv.weight
    assert abs(w.std().item() - 0.02) < 0.002 and vit.blocks[0].attn.qkv.bias.abs().max() == 0
    assert vit.blocks[0].norm1.weight.eq(1).all()


def test_projection_head_shape():
    head = ProjectionHead(384)
    assert head(torch.randn(4, 384)).shape == (4, 256)
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in head.modules()) == 2


@pytest.mark.parametrize("mode", ["shared", "per_sample"])
def test_fused_embed_of_masked_view_matches_torch_path(mode):
    """The ViT's masked view through the Triton kernel (interpreter on CPU) equals the conv+pos+gather path."""
    from msn_fast.masking import sample_keep_indices

    vit = VisionTransformer(ViTArch(dim=16, depth=1, heads=2, patch_size=4), img_size=16, embed_impl="torch")
    x = torch.randn(2, 3, 16, 16)
    keep = sample_keep_indices(2, 16, 0.7, mode)
    ref = vit.embed(x, keep)
    ref_grads = torch.autograd.grad(ref.square().sum(), [vit.patch_embed.weight, vit.pos_embed, vit.cls_token])
    vit.set_embed_impl("triton")
    out = vit.embed(x, keep)
    grads = torch.autograd.grad(out.square().sum(), [vit.patch_embed.weight, vit.pos_embed, vit.cls_token])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


def test_triton_attention_in_the_vit_matches_sdpa_training_steps():
    """Two MSN training steps with the Triton attention kernel (interpreter on CPU) track the SDPA model."""
    from msn_fast.cli import apply_overrides
    from msn_fast.model import MSN, param_groups
    from msn_fast.recipes import get_recipe

    args = ["--vit.dim", "64", "--vit.depth", "1", "--vit.heads", "2", "--vit.img_size", "16", "--head.hidden_dim",
            "32", "--head.out_dim", "16", "--head.num_prototypes", "16", "--data.global_size", "16",
            "--data.focal_size", "8", "--data.num_focal", "1"]
    losses = {}
    g, f = torch.randn(2, 3, 3, 16, 16), torch.randn(1, 3, 3, 8, 8)
    for impl in ("torch", "triton"):
        cfg = apply_overrides(get_recipe("cpu_demo"), args + ["--vit.attn_impl", impl])
        torch.manual_seed(0)
        model = MSN(cfg)
        opt = torch.optim.AdamW(param_groups(model), lr=1e-3)
        losses[impl] = []
        for _ in range(2):
            torch.manual_seed(1)
            loss, _ = model.loss(g, f)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[impl].append(loss.item())
    assert losses["triton"] == pytest.approx(losses["torch"], rel=1e-4)
