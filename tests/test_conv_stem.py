"""`vit.stem conv`: the ViT's early-convolution stem (vit.ConvStem), its masked views, config checks, interop and
evaluation-cache handling of its BatchNorm buffers."""

import copy

import pytest
import torch
import torch.nn as nn

from msn_fast.config import ViTConfig
from msn_fast.distributed import SyncBatchNorm2d, convert_sync_batchnorm
from msn_fast.features import _digest_tensors
from msn_fast.interop import InteropError, to_hf_state_dict, to_timm_state_dict
from msn_fast.recipes import get_recipe
from msn_fast.vit import ConvStem, VisionTransformer, ViTArch, kept_pixel_mask


def _vit(patch=4, img=16, dim=24, depth=2, dtype=torch.float64, **kw):
    torch.manual_seed(patch + img)
    return VisionTransformer(ViTArch(dim=dim, depth=depth, heads=3, patch_size=patch, mlp_ratio=1.5), img_size=img,
                             stem="conv", embed_impl="torch", **kw).to(dtype)


@pytest.mark.parametrize("patch, widths", [(2, [8]), (4, [8, 16]), (8, [8, 16, 24])])
def test_stem_layers_follow_the_patch_size(patch, widths):
    """log2(P) 3x3 stride-2 convs (widths D/4 but at least 8, then doubling up to D), each with BatchNorm and
    ReLU, then 1x1 to D."""
    stem = ConvStem(3, 24, patch)
    convs = [m for m in stem.layers if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs[:-1]] == widths and convs[-1].out_channels == 24
    assert all(c.kernel_size == (3, 3) and c.stride == (2, 2) for c in convs[:-1])
    assert convs[-1].kernel_size == (1, 1)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in stem.layers) == len(widths)
    x = torch.randn(2, 3, 8 * patch, 4 * patch)
    assert stem(x).shape == (2, 24, 8, 4)


@pytest.mark.parametrize("patch", [1, 3, 6])
def test_stem_needs_a_power_of_two_patch(patch):
    with pytest.raises(ValueError, match="power of two"):
        ConvStem(3, 24, patch)
    with pytest.raises(ValueError, match="--vit.patch_size must be a power of two"):
        ViTConfig(patch_size=patch, img_size=32, stem="conv")
    with pytest.raises(ValueError, match="--vit.stem must be linear or conv; got 'hmlp'"):
        ViTConfig(stem="hmlp")
    ViTConfig(patch_size=patch, img_size=32)  # any patch with the linear projection


@pytest.mark.parametrize("mode", ["shared", "per_sample"])
def test_masked_view_keeps_the_stems_tokens(mode):
    """A masked view is the full view's tokens (stem + position embedding) at the kept positions, CLS first;
    values and every parameter's gradient match plain indexing (fp64, 5 x 3 patches, fresh random weights)."""
    vit = _vit(patch=4, img=20)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(3, 3, 20, 12, dtype=torch.float64)  # a non-square view: 5 x 3 patches, interpolated positions
    n = 15
    keep = torch.randperm(n)[:7] if mode == "shared" else torch.stack([torch.randperm(n)[:7] for _ in range(3)])
    vit.eval()  # BatchNorm's running statistics: both paths see the same normalisation
    out = vit.embed(x, keep)
    full = vit.embed(x)
    idx = keep.expand(3, -1) if keep.dim() == 1 else keep
    ref = torch.cat([full[:, :1], torch.gather(full[:, 1:], 1, idx[..., None].expand(-1, -1, full.shape[-1]))], 1)
    assert out.shape == (3, 8, 24)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(out)
    params = [p for p in vit.parameters() if p.requires_grad]
    g_out = torch.autograd.grad((out * w).sum(), params, allow_unused=True)
    g_ref = torch.autograd.grad((ref * w).sum(), params, allow_unused=True)
    names = [n for n, p in vit.named_parameters() if p.requires_grad]
    stem_grads = 0
    for name, a, b in zip(names, g_out, g_ref):
        if a is None or b is None:
            assert a is None and b is None, name  # the blocks: embed does not reach them
            continue
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
        stem_grads += name.startswith("patch_embed.") and bool(a.abs().sum() > 0)
    assert stem_grads == 8  # both 3x3 convs, both BatchNorms (weight, bias), the 1x1 conv (weight, bias)


def test_conv_stem_trunk_trains_and_its_cls_only_forward_matches():
    """In train mode (BatchNorm on batch statistics) the CLS-only forward still equals the full forward's CLS,
    values and gradients of every parameter (fp64), so the stem composes with the rest of the ViT."""
    vit = _vit(patch=4, img=16, depth=2)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    keep = torch.stack([torch.randperm(16)[:9] for _ in range(4)])
    res = []
    for fn in (lambda: vit(x, keep), lambda: vit.forward_features(x, keep)[:, 0]):
        vit.zero_grad(set_to_none=True)
        y = fn()
        y.square().sum().backward()
        res.append((y.detach(), {n: p.grad.clone() for n, p in vit.named_parameters() if p.grad is not None}))
    (y1, g1), (y2, g2) = res
    torch.testing.assert_close(y1, y2, rtol=1e-10, atol=1e-10)
    assert g1.keys() == g2.keys() and any(k.startswith("patch_embed.layers.0") for k in g1)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-9, atol=1e-10, msg=k)


def test_interop_refuses_a_conv_stem(tmp_path, capsys):
    """No export format has a conv stem: the functions raise InteropError naming it, the CLI says so in one
    `error:` line and exits 2."""
    from msn_fast.checkpoint import save_checkpoint
    from msn_fast.config import Config, HeadConfig, to_dict
    from msn_fast.interop import arch_from_state_dict, main
    from msn_fast.model import MSN, param_groups

    vit = _vit(dtype=torch.float32)
    for export in (to_timm_state_dict, to_hf_state_dict, arch_from_state_dict):
        with pytest.raises(InteropError, match="conv stem"):
            export(vit.state_dict())
    for export in (to_timm_state_dict, to_hf_state_dict):
        with pytest.raises(InteropError, match="conv stem"):
            export(vit)
    cfg = Config(vit=ViTConfig(dim=16, depth=1, heads=2, patch_size=4, img_size=16, stem="conv"),
                 head=HeadConfig(hidden_dim=32, out_dim=16, num_prototypes=8))
    model = MSN(cfg)
    save_checkpoint(tmp_path / "run", model=model, optimizer=torch.optim.AdamW(param_groups(model)), step=1,
                    config=to_dict(cfg))
    for command in ("export-timm", "export-official"):
        assert main([command, str(tmp_path / "run"), str(tmp_path / "x.pth")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "conv stem" in err and "Traceback" not in err
    assert not (tmp_path / "x.pth").exists()


def test_eval_cache_digest_of_a_trunk_with_batchnorm_buffers():
    """The evaluation cache's key hashes the trunk's state dict, 0-dim BatchNorm counters included, and changes
    when the running statistics do (they are what eval mode normalises with)."""
    vit = _vit(dtype=torch.float32)
    assert any(t.dim() == 0 for t in vit.state_dict().values())  # num_batches_tracked
    before = _digest_tensors(vit.state_dict())
    assert before == _digest_tensors(vit.state_dict())
    vit.train()
    vit.embed(torch.randn(2, 3, 16, 16))  # a train-mode forward updates the running statistics
    assert _digest_tensors(vit.state_dict()) != before


def test_cpu_photos_uses_the_conv_stem_and_the_demo_does_not():
    assert get_recipe("cpu_photos").vit.stem == "conv"
    assert get_recipe("cpu_demo").vit.stem == "linear"
    assert get_recipe("vit_s16").vit.stem == "linear"


def test_a_view_that_is_not_whole_patches_is_cropped_as_the_projection_crops_it():
    """A 14 px view at patch 4 gives 3 x 3 tokens with either stem (the strided projection drops the last
    2 pixels; the stem is given the same 12 x 12 pixels)."""
    vit = _vit(patch=4, img=16, dtype=torch.float32).eval()
    x = torch.randn(2, 3, 14, 14)
    out = vit.embed(x)
    assert out.shape == (2, 1 + 9, 24)
    torch.testing.assert_close(out, vit.embed(x[..., :12, :12].contiguous()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sync_batchnorm2d_in_one_process_is_batchnorm2d_with_fp32_statistics(dtype):
    """What FSDP's bf16 policy hands the stem: bf16 weights and inputs, fp32 running statistics. The converted
    BatchNorm2d computes in fp32 and matches nn.BatchNorm2d (values and running statistics) on the fp32 input."""
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(5)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    bn = convert_sync_batchnorm(nn.Sequential(copy.deepcopy(ref)))[0]
    assert type(bn) is SyncBatchNorm2d
    bn.weight.data, bn.bias.data = bn.weight.data.to(dtype), bn.bias.data.to(dtype)
    x = 2 + 3 * torch.randn(6, 5, 7, 3)
    y = bn(x.to(dtype))
    assert y.dtype == dtype and bn.running_mean.dtype == torch.float32
    expected = ref(x)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.float(), expected, **tol)
    torch.testing.assert_close(bn.running_mean, ref.running_mean, **tol)
    torch.testing.assert_close(bn.running_var, ref.running_var, **tol)
    assert int(bn.num_batches_tracked) == 1


def test_a_bf16_fsdp_run_with_the_conv_stem_trains(tmp_path):
    """`--dist.param_dtype bf16` (FSDP2 in one process, gloo, as on a GPU): the stem's BatchNorm takes bf16
    weights and inputs with fp32 statistics; two steps run and log finite losses."""
    from test_distributed import TINY, _losses, _run

    out = tmp_path / "run"
    r = _run(TINY + ["--vit.stem", "conv", "--dist.param_dtype", "bf16", "--data.batch_size", "8", "--optim.epochs",
                     "1", "--run.max_steps", "2", "--run.out_dir", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    losses = _losses(out)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("mode", ["shared", "per_sample"])
def test_hide_dropped_zeroes_the_dropped_patches_before_the_stem(mode):
    """`vit.stem_hides_dropped`: a masked view is the stem of the image with the dropped patches' pixels zeroed
    (values against a mask built pixel by pixel, fp64, train mode); no gradient reaches a dropped pixel in train or
    eval mode, every kept patch's pixels get one. Without it the overlapping windows leak: in eval mode (no batch
    statistics mixing every pixel in) dropped pixels get gradients."""
    x = torch.randn(3, 3, 20, 12, dtype=torch.float64)  # 5 x 3 patches of 4 px
    n = 15
    keep = torch.randperm(n)[:6] if mode == "shared" else torch.stack([torch.randperm(n)[:6] for _ in range(3)])
    rows = keep.expand(3, -1) if keep.dim() == 1 else keep
    ref_mask = torch.zeros(3, 1, 20, 12, dtype=torch.float64)
    for b in range(3):
        for i in rows[b].tolist():
            r, c = divmod(i, 3)
            ref_mask[b, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = 1
    hide, leak = _vit(img=20, hide_dropped=True), _vit(img=20)
    out = hide.embed(x, keep)
    full = leak.embed(x * ref_mask)  # same weights (same seed): the full view of the zeroed image
    ref = torch.cat([full[:, :1], torch.gather(full[:, 1:], 1, rows[..., None].expand(-1, -1, 24))], 1)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for vit, hidden in ((hide, True), (leak, False)):
        for train in (True, False):
            vit.train(train)
            xg = x.clone().requires_grad_(True)
            (vit.cls_features(xg, keep) * torch.randn(3, 24, dtype=torch.float64)).sum().backward()
            g = xg.grad.abs().sum(1, keepdim=True)
            dropped = g[~ref_mask.bool()]
            if train:  # batch statistics: every pixel of the batch reaches every output, unless it was zeroed
                assert bool((g[ref_mask.bool()] > 0).all())
            if hidden:
                assert bool((dropped == 0).all())
            elif not train:  # running statistics: what reaches a kept token is its overlapping 3x3 windows alone
                assert bool((dropped > 0).any())
        vit.train()
    torch.testing.assert_close(hide.embed(x), leak.embed(x), rtol=0, atol=0)  # unmasked views: unchanged


def test_kept_pixel_mask_takes_shared_or_per_sample_indices_of_any_integer_type():
    """[K] -> one mask for the batch, [B, K] -> one per sample; int32 indices as int64; 1 exactly on the kept
    patches (patch i at row i // gw, column i % gw)."""
    shared = kept_pixel_mask(torch.tensor([4, 0], dtype=torch.int32), 2, 3, 2, torch.bfloat16, "cpu")
    assert shared.shape == (1, 1, 4, 6) and shared.dtype == torch.bfloat16
    want = torch.zeros(4, 6)
    want[0:2, 0:2] = want[2:4, 2:4] = 1
    assert torch.equal(shared[0, 0].float(), want)
    per_sample = kept_pixel_mask(torch.tensor([[4, 0], [5, 1]]), 2, 3, 2, torch.float32, "cpu")
    assert per_sample.shape == (2, 1, 4, 6) and torch.equal(per_sample[0, 0], want)
    second = per_sample[1, 0]  # patches 5 (row 1, column 2) and 1 (row 0, column 1)
    assert second.sum() == 8 and second[2:4, 4:6].sum() == 4 and second[0:2, 2:4].sum() == 4


def test_hide_dropped_needs_the_conv_stem():
    with pytest.raises(ValueError, match="--vit.stem_hides_dropped must be false with --vit.stem linear"):
        ViTConfig(stem_hides_dropped=True)
    ViTConfig(stem="conv", patch_size=4, img_size=32, stem_hides_dropped=True)
    with pytest.raises(ValueError, match="hide_dropped needs the conv stem"):
        VisionTransformer(ViTArch(dim=24, depth=1, heads=3, patch_size=4), img_size=16, hide_dropped=True)
