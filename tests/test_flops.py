"""The closed-form step FLOPs (msn_fast/flops.py) against torch's FlopCounterMode, and the token counts they use."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from msn_fast.build import build_model
from msn_fast.cli import apply_overrides
from msn_fast.distributed import DistInfo
from msn_fast.flops import step_flops_per_image, tokens_per_image
from msn_fast.recipes import get_recipe

TINY = ["--vit.dim", "32", "--vit.depth", "3", "--vit.heads", "2", "--head.hidden_dim", "64", "--head.out_dim",
        "32", "--head.num_prototypes", "32", "--data.global_size", "16", "--data.focal_size", "8",
        "--data.num_focal", "2", "--vit.img_size", "16", "--data.batch_size", "4"]


def test_closed_form_flops_match_flop_counter():
    cfg = apply_overrides(get_recipe("cpu_demo"), TINY + ["--mask.ratio", "0.5", "--head.hidden_dim", "8",
                                                          "--head.out_dim", "8", "--head.num_prototypes", "8"])
    model = build_model(cfg, torch.device("cpu"), DistInfo())
    g, f = torch.randn(2, 4, 3, 16, 16), torch.randn(2, 4, 3, 8, 8)
    with FlopCounterMode(display=False) as counter:
        loss, _ = model.loss(g, f)
        loss.backward()
    counted = counter.get_total_flops() / 4
    estimate = step_flops_per_image(cfg)
    assert 0.8 * counted < estimate < 1.05 * counted, (estimate, counted)  # the estimate leaves out embed + head


def test_official_l7_token_budget():
    t, a, f = tokens_per_image(get_recipe("vit_l7"))
    assert (t, a, f) == (1025, 308, 10 * 170)


def test_unmasked_anchor_has_every_token():
    """The anchor's tokens follow masking.num_kept, which keeps every patch at ratio 0."""
    cfg = apply_overrides(get_recipe("cpu_demo"), TINY + ["--mask.ratio", "0"])
    t, a, f = tokens_per_image(cfg)
    assert a == t == 1 + (16 // cfg.vit.patch_size) ** 2 and f == 2 * (1 + (8 // cfg.vit.patch_size) ** 2)
