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
