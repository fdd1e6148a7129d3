import math

import pytest

from msn_fast.config import OptimConfig
from msn_fast.schedules import Schedules, lr_at, momentum_at, wd_at


def test_lr_warmup_then_cosine():
    kw = dict(warmup_steps=10, horizon=110, start_lr=2e-4, lr=1e-3, final_lr=1e-6)
    assert lr_at(0, **kw) == pytest.approx(2e-4)
    assert lr_at(5, **kw) == pytest.approx(6e-4)
    assert lr_at(10, **kw) == pytest.approx(1e-3)
    assert lr_at(60, **kw) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)
    assert lr_at(110, **kw) == pytest.approx(1e-6)
    assert lr_at(500, **kw) == pytest.approx(1e-6)


def test_wd_and_momentum_formulas():
    assert wd_at(0, horizon=100, wd=0.04, final_wd=0.4) == pytest.approx(0.04)
    assert wd_at(50, horizon=100, wd=0.04, final_wd=0.4) == pytest.approx(0.22)
    assert wd_at(100, horizon=100, wd=0.04, final_wd=0.4) == pytest.approx(0.4)
    assert momentum_at(0, horizon=100, start=0.996, end=1.0) == pytest.approx(0.996)
    assert momentum_at(25, horizon=100, start=0.996, end=1.0) == pytest.approx(0.997)


@pytest.mark.parametrize("epochs,end_lr", [(800, 9.9e-5), (200, 1.08e-4)])
def test_official_end_values_with_125_horizon(epochs, end_lr):
    """msn_spec.md: training stops at 80% of the schedules: lr ~1e-4, wd ~0.366, m ~0.9992."""
    ipe = 100
    s = Schedules(OptimConfig(epochs=epochs), total_steps=epochs * ipe, steps_per_epoch=ipe)
    end = epochs * ipe
    assert s.lr(end) == pytest.approx(end_lr, rel=0.01)
    assert s.wd(end) == pytest.approx(0.366, abs=0.001)
    assert s.momentum(end) == pytest.approx(0.9992, abs=1e-5)
    assert s.lr(15 * ipe) == pytest.approx(1e-3)


def test_horizon_one_ends_at_end_values():
    s = Schedules(OptimConfig(epochs=10, warmup_epochs=1, horizon_scale=1.0), total_steps=1000, steps_per_epoch=100)
    assert s.lr(1000) == pytest.approx(1e-6)
    assert s.wd(1000) == pytest.approx(0.4)
    assert s.momentum(1000) == pytest.approx(1.0)
    assert not math.isclose(s.lr(500), s.lr(501))


def test_a_warmup_longer_than_a_tenth_of_the_run_is_clipped():
    """The issue's CIFAR run: a 1-epoch warm-up in a 1-epoch run rose for the whole run and never decayed."""
    s = Schedules(OptimConfig(epochs=1, warmup_epochs=1, horizon_scale=1.0), total_steps=1562, steps_per_epoch=1562)
    assert s.warmup_clipped and s.warmup_asked == 1562 and s.warmup == 156
    assert s.lr(156) == pytest.approx(1e-3) and s.lr(1562) == pytest.approx(1e-6)
    kept = Schedules(OptimConfig(epochs=800), total_steps=800 * 100, steps_per_epoch=100)  # official: 15 of 800
    assert not kept.warmup_clipped and kept.warmup == 1500


def test_a_shorter_run_decays_over_its_own_steps():
    """max_steps (or a time budget) gives the schedules the steps the run takes: the cosine ends there."""
    o = OptimConfig(epochs=100, warmup_epochs=1, horizon_scale=1.0)
    cut = Schedules(o, total_steps=300, steps_per_epoch=100)
    full = Schedules(o, total_steps=10_000, steps_per_epoch=100)
    assert cut.lr(300) == pytest.approx(o.final_lr) and full.lr(300) > 0.99 * o.lr
    assert cut.wd(300) == pytest.approx(o.final_weight_decay) and cut.momentum(300) == pytest.approx(o.ema_end)


def test_cpu_photos_keeps_the_official_horizon_over_a_budgeted_hour():
    """cpu_photos takes the official 1.25x horizon (tenth sweep round): an hour's plan of 11,924 steps (the held-out
    control's) ends with lr ~1.06e-4 and EMA momentum 0.998, not 1e-6 and 1 as the demo's horizon 1.0 would."""
    from msn_fast.recipes import get_recipe

    cfg = get_recipe("cpu_photos")
    s = Schedules(cfg.optim, total_steps=11_924, steps_per_epoch=1_406)
    assert 1e-4 < s.lr(11_924) < 1.1e-4 and s.lr(3 * 11_924 // 4) > 3e-4  # the cosine stops near 80% of its span
    assert s.momentum(11_924) == pytest.approx(0.99 + 0.01 * 0.8, abs=1e-5)
    demo = Schedules(get_recipe("cpu_demo").optim, total_steps=11_924, steps_per_epoch=1_406)
    assert demo.lr(11_924) == pytest.approx(1e-6) and demo.momentum(11_924) == pytest.approx(1.0)
