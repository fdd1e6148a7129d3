import json

import pytest

from msn_fast.config import Config, from_dict, to_dict, to_json
from msn_fast.recipes import RECIPES, get_recipe
from msn_fast.train import UsageError, parse_config
from msn_fast.vit import ARCHS


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_build_and_roundtrip_json(name):
    cfg = get_recipe(name)
    assert isinstance(cfg, Config)
    assert from_dict(json.loads(to_json(cfg))) == cfg


def test_official_recipe_values():
    s16 = get_recipe("vit_s16")
    assert (s16.mask.ratio, s16.optim.epochs, s16.loss.sinkhorn_iters, s16.loss.me_max_weight) == (0.15, 800, 3, 1.0)
    assert (s16.loss.tau, s16.loss.sharpen, s16.optim.lr, s16.optim.clip_grad) == (0.1, 0.25, 1e-3, 3.0)
    assert (s16.data.num_focal, s16.data.focal_size, s16.data.global_size) == (10, 96, 224)
    assert (s16.head.hidden_dim, s16.head.out_dim, s16.head.num_prototypes) == (2048, 256, 1024)
    paper = get_recipe("vit_s16_paper")
    assert (paper.loss.sinkhorn_iters, paper.loss.me_max_weight) == (0, 5.0)
    l7 = get_recipe("vit_l7")
    assert (l7.mask.ratio, l7.optim.epochs, l7.vit.patch_size, l7.vit.dim, l7.vit.depth) == (0.7, 200, 7, 1024, 24)
    assert set(ARCHS) <= set(RECIPES)


def test_cli_overrides_are_typed():
    cfg = parse_config(["--model", "vit_s16", "--optim.lr", "5e-4", "--mask.mode", "per_sample",
                        "--data.global_scale", "0.2", "0.9", "--run.eval_lowshot", "False"])
    assert cfg.model == "vit_s16" and cfg.vit.dim == 384
    assert cfg.optim.lr == 5e-4 and cfg.mask.mode == "per_sample"
    assert cfg.data.global_scale == (0.2, 0.9) and cfg.run.eval_lowshot is False
    assert to_dict(cfg)["optim"]["lr"] == 5e-4


def test_invalid_values_are_usage_errors():
    with pytest.raises(UsageError, match="mask.ratio"):
        parse_config(["--mask.ratio", "1.5"])
    with pytest.raises(UsageError, match="unknown model"):
        parse_config(["--model", "vit_xxl"])
    with pytest.raises(UsageError, match="divisible"):
        parse_config(["--vit.heads", "5"])
    with pytest.raises(UsageError, match="num_focal must be even, got 3"):
        parse_config(["--model", "cpu_photos", "--loss.symmetric", "true", "--data.num_focal", "3"])
    assert parse_config(["--model", "cpu_photos", "--loss.symmetric", "true"]).loss.symmetric


# Every numeric field with an invalid range, and a value outside it: (flag, value(s), what the error says it got).
OUT_OF_RANGE = [
    ("vit.dim", ["0"], "0"), ("vit.depth", ["0"], "0"), ("vit.heads", ["0"], "0"), ("vit.patch_size", ["0"], "0"),
    ("vit.img_size", ["2"], "2"), ("vit.mlp_ratio", ["0"], "0.0"),
    ("head.hidden_dim", ["0"], "0"), ("head.out_dim", ["0"], "0"), ("head.num_prototypes", ["0"], "0"),
    ("mask.ratio", ["1"], "1.0"), ("mask.ratio", ["-0.1"], "-0.1"),
    ("data.batch_size", ["0"], "0"), ("data.batch_size", ["1"], "1"), ("data.num_workers", ["-1"], "-1"),
    ("data.global_size", ["0"], "0"), ("data.focal_size", ["0"], "0"), ("data.num_focal", ["-1"], "-1"),
    ("data.global_scale", ["0", "1"], "0.0 1.0"), ("data.focal_scale", ["0.5", "0.2"], "0.5 0.2"),
    ("data.focal_scale", ["0.1", "1.5"], "0.1 1.5"), ("data.color_jitter", ["-1"], "-1.0"),
    ("data.blur_prob", ["1.5"], "1.5"),
    ("loss.tau", ["0"], "0.0"), ("loss.sharpen", ["-1"], "-1.0"), ("loss.me_max_weight", ["-1"], "-1.0"),
    ("loss.sinkhorn_iters", ["-1"], "-1"),
    ("optim.epochs", ["0"], "0"), ("optim.warmup_epochs", ["-1"], "-1.0"), ("optim.start_lr", ["-1"], "-1.0"),
    ("optim.lr", ["inf"], "inf"), ("optim.final_lr", ["-1"], "-1.0"), ("optim.weight_decay", ["-1"], "-1.0"),
    ("optim.final_weight_decay", ["-1"], "-1.0"), ("optim.clip_grad", ["-1"], "-1.0"),
    ("optim.horizon_scale", ["0.5"], "0.5"), ("optim.ema_start", ["1.5"], "1.5"), ("optim.ema_end", ["-0.1"], "-0.1"),
    ("optim.betas", ["0.9", "1"], "0.9 1.0"),
    ("run.max_steps", ["-1"], "-1"), ("run.time_budget", ["-1"], "-1.0"), ("run.log_every", ["0"], "0"),
    ("run.checkpoint_every", ["0"], "0"), ("run.eval_draws", ["0"], "0"), ("run.max_bad_steps", ["0"], "0"),
    ("run.keep_checkpoints", ["0"], "0"),
]


@pytest.mark.parametrize("flag,values,got", OUT_OF_RANGE, ids=[f"{f}={' '.join(v)}" for f, v, _ in OUT_OF_RANGE])
def test_out_of_range_value_is_one_error_line_naming_the_flag(flag, values, got, capsys):
    """Through the trainer's command line: exit 2 and one `error: --flag must be ...; got value` line."""
    from msn_fast.train import main

    assert main([f"--{flag}", *values]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --{flag} must be ") and err[0].endswith(f"; got {got}"), err


def test_data_config_is_the_loaders_view_recipe():
    """The view parameters are defined once (dataloading's ViewRecipe) and DataConfig inherits them, docstrings
    (--help) included; num_global is fixed at MSN's two global views, not a flag."""
    import dataclasses

    from msn_fast.cli import _field_doc
    from msn_fast.config import DataConfig
    from msn_fast.dataloading import ViewRecipe

    data = get_recipe("cpu_demo").data
    assert isinstance(data, ViewRecipe) and data.num_global == 2
    view_fields = [f.name for f in dataclasses.fields(ViewRecipe)]
    assert view_fields == ["global_size", "focal_size", "num_focal", "global_scale", "focal_scale", "color_jitter",
                           "blur_prob"]
    assert set(view_fields) < {f.name for f in dataclasses.fields(DataConfig)}
    assert all(_field_doc(DataConfig, name) for name in view_fields)
    assert "num_global" not in {f.name for f in dataclasses.fields(DataConfig)}
