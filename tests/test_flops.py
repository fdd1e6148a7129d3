"""The closed-form step FLOPs (msn_fast/flops.py) against torch's FlopCounterMode, and the token counts they use."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from msn_fast.build import build_model
from msn_fast.cli import apply_overrides
from msn_fast.distributed import DistInfo
from msn_fast.flops import linear_gemms, step_flops_per_image, tokens_per_image, views_per_image
from msn_fast.recipes import get_recipe

TINY = ["--vit.dim", "32", "--vit.depth", "3", "--vit.heads", "2", "--head.hidden_dim", "64", "--head.out_dim",
        "32", "--head.num_prototypes", "32", "--data.global_size", "16", "--data.focal_size", "8",
        "--data.num_focal", "2", "--vit.img_size", "16", "--data.batch_size", "4"]


SYMMETRIC = pytest.mark.parametrize("flags", [[], ["--loss.symmetric", "true"]], ids=["official", "symmetric"])


def _counted_step(flags=()):
    """(config, FlopCounterMode) of one forward + backward of a tiny cpu_demo model on a batch of 4 images."""
    cfg = apply_overrides(get_recipe("cpu_demo"), TINY + ["--mask.ratio", "0.5", "--head.hidden_dim", "8",
                                                          "--head.out_dim", "8", "--head.num_prototypes", "8",
                                                          *flags])
    model = build_model(cfg, torch.device("cpu"), DistInfo())
    g, f = torch.randn(2, 4, 3, 16, 16), torch.randn(2, 4, 3, 8, 8)
    with FlopCounterMode(display=False) as counter:
        loss, _ = model.loss(g, f)
        loss.backward()
    return cfg, counter


@SYMMETRIC
def test_closed_form_flops_match_flop_counter(flags):
    cfg, counter = _counted_step(flags)
    counted = counter.get_total_flops() / 4
    estimate = step_flops_per_image(cfg)
    assert 0.8 * counted < estimate < 1.05 * counted, (estimate, counted)  # the estimate leaves out embed + head


@SYMMETRIC
def test_linear_gemm_shapes_match_the_steps_matmuls(flags):
    """The step's linear-layer GEMMs (linear_gemms) against the mm/addmm FLOPs torch counts in a real step: the
    counted ones also hold the head and the prototypes, 0.3% here (a missing first-block grad-input is 9%).
    With loss.symmetric the target and anchor GEMMs have twice the rows, not more GEMMs."""
    cfg, counter = _counted_step(flags)
    ops = counter.get_flop_counts()["Global"]
    counted = sum(n for op, n in ops.items() if op in (torch.ops.aten.mm, torch.ops.aten.addmm))
    shapes = linear_gemms(cfg, batch=4)
    total = sum(2 * m * k * n for m, k, n in shapes)
    assert 0.98 * counted < total <= counted, (total, counted)
    d, depth = cfg.vit.dim, cfg.vit.depth
    # target forward; anchor and focal forward + 2 backward; the CLS-only last block has 5 linears (q split off)
    assert len(shapes) == (4 * (depth - 1) + 5) * (1 + 3 + 3)
    assert (4 * tokens_per_image(cfg)[0], d, 3 * d) in shapes


@pytest.mark.parametrize("model, flags", [("cpu_demo", []), ("cpu_demo", ["--data.num_focal", "0"]),
                                          ("vit_l7", []), ("vit_s16", ["--vit.mlp_ratio", "2.5"]),
                                          ("cpu_photos", ["--loss.symmetric", "true"])])
def test_step_flops_are_the_linear_gemms_plus_attention(model, flags):
    """step_flops_per_image = the linear GEMMs of linear_gemms per image + attention (4·n·D a query row over n
    keys, every row of the first depth - 1 blocks, the CLS row of the last; 3x for the student's views)."""
    cfg = apply_overrides(get_recipe(model), flags)
    v, batch = cfg.vit, 4
    linear = sum(2 * m * k * n for m, k, n in linear_gemms(cfg, batch)) / batch
    attention = 0.0
    for tokens, views, passes in zip(tokens_per_image(cfg), views_per_image(cfg), (1, 3, 3)):
        if tokens:
            n = tokens // views
            attention += passes * (4 * n * v.dim) * ((v.depth - 1) * tokens + views)
    assert step_flops_per_image(cfg) == pytest.approx(linear + attention, rel=1e-12)


def test_symmetric_doubles_the_global_views():
    cfg = get_recipe("cpu_photos")
    sym = apply_overrides(get_recipe("cpu_photos"), ["--loss.symmetric", "true"])  # in place: a fresh recipe
    (t, a, f), (ts, as_, fs) = tokens_per_image(cfg), tokens_per_image(sym)
    assert views_per_image(cfg) == (1, 1, 4) and views_per_image(sym) == (2, 2, 4)
    assert (ts, as_, fs) == (2 * t, 2 * a, f) == (2 * 65, 2 * 45, 4 * 17)  # 44 of 64 patches kept at mask ratio 0.3


def test_official_l7_token_budget():
    t, a, f = tokens_per_image(get_recipe("vit_l7"))
    assert (t, a, f) == (1025, 308, 10 * 170)


def test_unmasked_anchor_has_every_token():
    """The anchor's tokens follow masking.num_kept, which keeps every patch at ratio 0."""
    cfg = apply_overrides(get_recipe("cpu_demo"), TINY + ["--mask.ratio", "0"])
    t, a, f = tokens_per_image(cfg)
    assert a == t == 1 + (16 // cfg.vit.patch_size) ** 2 and f == 2 * (1 + (8 // cfg.vit.patch_size) ** 2)
