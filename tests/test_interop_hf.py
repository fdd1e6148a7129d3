"""Hugging Face interop (issue 17): our ViT <-> transformers' ViTMSNModel, weights and outputs, and export-hf.

Everything is built locally from small random ViTMSNConfigs; the hub is never reached (HF_HUB_OFFLINE is set
before transformers is first imported). Output comparisons follow tests/conftest.py's rounding rule (2): the
two sides compute the same sums in another order, so |hf - ours| <= k·eps·sqrt(n)·max|ours| with n the
longest reduction and k = ROUNDING_K chained reductions per block times the depth.
"""

import os
import sys

import pytest
import torch
from conftest import ROUNDING_K, assert_rounding_close

from msn_fast.config import Config, HeadConfig, ViTConfig
from msn_fast.interop import InteropError, from_hf, from_hf_state_dict, main, to_hf, to_hf_state_dict
from msn_fast.model import MSN
from msn_fast.vit import VisionTransformer, ViTArch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read by huggingface_hub at import: no network in these tests

# (dim, depth, heads, patch, img, mlp_ratio): patch sizes 4..16, an MLP ratio that is not 4, an image size
# that is not a multiple of the patch (36 px / 8 -> a 4x4 grid), a 32-wide head
VARIANTS = {
    "p4": (32, 2, 2, 4, 16, 4.0),
    "p7-mlp2.5": (48, 1, 3, 7, 28, 2.5),
    "p8-img36": (64, 2, 4, 8, 36, 2.0),
    "p16-hd32": (64, 1, 2, 16, 32, 4.0),
}


def _tf():
    return pytest.importorskip("transformers", reason="the Hugging Face interop needs transformers "
                                                      '(pip install "msn-fast[hf]")')


@pytest.fixture
def tf():
    """The transformers module; the test is skipped without it."""
    return _tf()


def _perturb(module):
    """Random, non-trivial weights everywhere (both sides zero-init biases, HF also the CLS and positions)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return module.eval()


def _trunk(dim, depth, heads, patch, img, mlp_ratio):
    arch = ViTArch(dim=dim, depth=depth, heads=heads, patch_size=patch, mlp_ratio=mlp_ratio)
    return _perturb(VisionTransformer(arch, img_size=img, attn_impl="eager"))


def _hf_model(dim, depth, heads, patch, img, mlp_ratio, **kw):
    tf = _tf()
    kw.setdefault("intermediate_size", int(dim * mlp_ratio))
    cfg = tf.ViTMSNConfig(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads, patch_size=patch,
                          image_size=img, **kw)
    return _perturb(tf.ViTMSNModel(cfg))


def _check_outputs(hf, trunk, x, **kw):
    """last_hidden_state = our final-normed tokens; its CLS = trunk(x); hidden_states[-1] CLS = pre-norm CLS."""
    a = trunk.arch
    n = max(a.dim, int(a.dim * a.mlp_ratio), x.shape[-1] // a.patch_size * (x.shape[-2] // a.patch_size) + 1)
    k = ROUNDING_K * a.depth
    with torch.no_grad():
        out = hf(x, output_hidden_states=True, **kw)
        ours = trunk.forward_features(x)
        assert_rounding_close(out.last_hidden_state, ours, torch.float32, n, "last_hidden_state", k=k)
        assert_rounding_close(out.last_hidden_state[:, 0], trunk(x), torch.float32, n, "CLS", k=k)
        assert_rounding_close(out.hidden_states[-1][:, 0], trunk.extract_features(x), torch.float32, n,
                              "pre-norm CLS", k=k)


def _assert_same_weights(got: dict, ref: dict):
    assert set(got) == set(ref)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_round_trip(variant, tf):
    """HF -> ours -> HF: the same weights bit for bit, the same config, and ours computes what HF computes."""
    shape = VARIANTS[variant]
    hf = _hf_model(*shape)
    trunk = from_hf(hf, attn_impl="eager")
    assert (trunk.arch.dim, trunk.arch.depth, trunk.arch.heads, trunk.patch_size, trunk.img_size) == shape[:5]
    back = to_hf(trunk)
    _assert_same_weights(back.state_dict(), hf.state_dict())
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size",
                  "image_size", "num_channels", "layer_norm_eps", "qkv_bias", "hidden_act"):
        assert getattr(back.config, field) == getattr(hf.config, field), field
    _check_outputs(hf, trunk, torch.randn(3, 3, shape[4], shape[4]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_ours_to_hf_outputs(variant, tf):
    trunk = _trunk(*VARIANTS[variant])
    hf = to_hf(trunk)
    assert hf.config.layer_norm_eps == trunk.norm.eps == 1e-6 and hf.config.qkv_bias
    img = trunk.img_size
    _check_outputs(hf, trunk, torch.randn(3, 3, img, img))
    _assert_same_weights(from_hf_state_dict(hf.state_dict()), trunk.state_dict())


def test_to_hf_takes_the_msn_target_encoder(tf):
    cfg = Config(vit=ViTConfig(dim=32, depth=2, heads=2, patch_size=4, img_size=16),
                 head=HeadConfig(hidden_dim=48, out_dim=24, num_prototypes=10))
    model = MSN(cfg)
    _perturb(model.target)
    hf = to_hf(model)
    _assert_same_weights(from_hf_state_dict(hf.state_dict()), model.target.trunk.state_dict())
    assert not torch.equal(hf.embeddings.position_embeddings, model.student.trunk.pos_embed)
    with pytest.raises(InteropError, match="expected an msn-fast"):
        to_hf(torch.nn.Linear(2, 2))


def test_hf_interpolated_positions(tf):
    """Other image sizes (our focal views): HF's interpolate_pos_encoding resizes the grid as we do."""
    trunk = _trunk(*VARIANTS["p4"])
    hf = to_hf(trunk)
    for size in (8, 24):  # 2x2 and 6x6 grids from the 4x4 one
        _check_outputs(hf, trunk, torch.randn(2, 3, size, size), interpolate_pos_encoding=True)


def test_hf_file_names_are_the_legacy_layout(tmp_path, tf):
    """transformers writes (and the hub's facebook/vit-msn-* hold) the 4.x names: our legacy table is them."""
    from safetensors.torch import load_file

    trunk = _trunk(*VARIANTS["p4"])
    to_hf(trunk).save_pretrained(tmp_path)
    on_disk = load_file(tmp_path / "model.safetensors")
    _assert_same_weights(on_disk, to_hf_state_dict(trunk, legacy=True))
    _assert_same_weights(from_hf_state_dict(on_disk), trunk.state_dict())


def test_hf_intermediate_size_that_no_float_ratio_truncates_to(tf):
    """int(56 * (61 / 56)) == 60: from_hf picks the next float ratio so our MLP is 61 wide, and back."""
    hf = _hf_model(56, 1, 2, 4, 16, 1.0, intermediate_size=61)
    trunk = from_hf(hf, attn_impl="eager")
    assert trunk.blocks[0].mlp[0].out_features == 61
    _assert_same_weights(to_hf(trunk).state_dict(), hf.state_dict())


def test_hf_without_qkv_bias(tf):
    hf = _hf_model(*VARIANTS["p4"], qkv_bias=False)
    trunk = from_hf(hf, attn_impl="eager")
    assert not trunk.blocks[1].attn.qkv.bias.any()
    _check_outputs(hf, trunk, torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize("kw, message", [
    (dict(layer_norm_eps=1e-12), "layer_norm_eps"),
    (dict(hidden_act="gelu_new"), "exact GELU"),
    (dict(image_size=(16, 32)), "non-square"),
])
def test_hf_unsupported_variants_rejected(kw, message, tf):
    args = dict(zip(("dim", "depth", "heads", "patch", "img", "mlp_ratio"), VARIANTS["p4"]))
    args["img"] = kw.pop("image_size", args["img"])
    with pytest.raises(InteropError, match=message):
        from_hf(_hf_model(**args, **kw))
    with pytest.raises(InteropError, match="expected a transformers ViTMSNModel"):
        from_hf(torch.nn.Linear(2, 2))
    with pytest.raises(InteropError, match="no counterpart.*pooler"):
        from_hf_state_dict({"pooler.dense.weight": torch.zeros(2, 2)})


def test_export_hf_cli(tmp_path, capsys, tf):
    """A tiny training run -> export-hf -> ViTMSNModel.from_pretrained computes what the run's target encoder does."""
    from msn_fast.checkpoint import load_model
    from msn_fast.train import main as train

    run = tmp_path / "run"
    assert train(["--vit.dim", "32", "--vit.depth", "2", "--vit.heads", "2", "--vit.img_size", "16",
                  "--head.hidden_dim", "32", "--head.out_dim", "16", "--head.num_prototypes", "16",
                  "--data.batch_size", "16", "--data.num_workers", "0", "--data.global_size", "16",
                  "--data.focal_size", "8", "--data.num_focal", "1", "--optim.epochs", "1", "--run.max_steps", "2",
                  "--run.eval_lowshot", "false", "--run.out_dir", str(run)]) == 0
    assert main(["export-hf", str(run), str(tmp_path / "hf")]) == 0
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    hf = tf.ViTMSNModel.from_pretrained(tmp_path / "hf").eval()
    trunk = load_model(run)[0].target.trunk.eval()
    _assert_same_weights(from_hf_state_dict(hf.state_dict()), trunk.state_dict())
    _check_outputs(hf, trunk, torch.randn(2, 3, 16, 16))
    capsys.readouterr()
    assert main(["export-hf", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_without_transformers_one_line_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    trunk = _trunk(*VARIANTS["p4"])
    for call in (lambda: to_hf(trunk), lambda: from_hf(object())):
        with pytest.raises(ImportError, match=r'pip install "msn-fast\[hf\]"') as e:
            call()
        assert "\n" not in str(e.value)
    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: transformers is not installed") and 'pip install "msn-fast[hf]"' in err
    assert err.count("\n") == 1
