"""Schedules as pure functions of the step, so resuming only means restoring the step.

Official (msn_spec.md §5): lr warms up linearly from start_lr to lr, then follows a cosine to
final_lr; weight decay follows a cosine from wd to final_wd; EMA momentum rises linearly from
m0 to m1. All three run over horizon = horizon_scale × total_steps (official 1.25, so training
stops at 80% of the schedules: lr ≈ 1e-4, wd ≈ 0.366, m ≈ 0.9992 at the end).
"""

from __future__ import annotations

import math


def lr_at(step: int, *, warmup_steps: int, horizon: int, start_lr: float, lr: float, final_lr: float) -> float:
    if step < warmup_steps:
        return start_lr + (lr - start_lr) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, horizon - warmup_steps))
    return final_lr + (lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def wd_at(step: int, *, horizon: int, wd: float, final_wd: float) -> float:
    progress = min(1.0, step / max(1, horizon))
    return final_wd + (wd - final_wd) * 0.5 * (1.0 + math.cos(math.pi * progress))


def momentum_at(step: int, *, horizon: int, start: float, end: float) -> float:
    return start + (end - start) * min(1.0, step / max(1, horizon))


MAX_WARMUP_FRACTION = 0.1  # of the steps a run will take: the official recipes warm up for 2-8% of theirs


class Schedules:
    """The three schedules of one run, given its optimisation config and the steps it will actually run
    (`--run.max_steps` or a time budget shorten them: the cosines then decay over the shorter run).

    A warm-up longer than MAX_WARMUP_FRACTION of the run is clipped to it (`warmup_asked` keeps what the
    config asked for, so the trainer can say so): a 1-epoch warm-up in a 1-epoch run would never decay.
    """

    def __init__(self, optim, total_steps: int, steps_per_epoch: int):
        self.o = optim
        self.total = total_steps
        self.horizon = max(1, int(round(optim.horizon_scale * total_steps)))
        self.warmup_asked = int(round(optim.warmup_epochs * steps_per_epoch))
        self.warmup = min(self.warmup_asked, int(MAX_WARMUP_FRACTION * total_steps))

    @property
    def warmup_clipped(self) -> bool:
        return self.warmup < self.warmup_asked

    def lr(self, step: int) -> float:
        o = self.o
        return lr_at(step, warmup_steps=self.warmup, horizon=self.horizon, start_lr=o.start_lr, lr=o.lr,
                     final_lr=o.final_lr)

    def wd(self, step: int) -> float:
        return wd_at(step, horizon=self.horizon, wd=self.o.weight_decay, final_wd=self.o.final_weight_decay)

    def momentum(self, step: int) -> float:
        return momentum_at(step, horizon=self.horizon, start=self.o.ema_start, end=self.o.ema_end)
