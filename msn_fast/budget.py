"""`--run.time_budget MINUTES`: fit a run, its end-of-run evaluation included, into a wall-clock budget.

The trainer times PROBE_STEPS steps after the first one of the process (the first pays for start-up:
compilation, the first batch, allocator growth) and the evaluation's cost per image on a few images
(decode, resize, two encoder forwards), then plans the steps that fit: what is left of the budget, less the
evaluation's estimate, divided by the measured time per step. The schedules are rebuilt over
that many steps, so the learning rate decays over the run that will happen (the warm-up is linear in the
step, so the re-plan moves it only by what the shorter warm-up changes). The plan is made again when
REPLAN_AT fractions of it are done, from the time per step since the previous plan: the first steps can be
faster or slower than the rest (caches, another job on the cores starting or ending, a shared machine's
speed drifting), and the run must still end inside the budget. The plan is saved in every checkpoint, and a
resumed run keeps it rather than planning again.
"""

from __future__ import annotations

import time
from typing import Callable

PROBE_STEPS = 5
REPLAN_AT = (0.25, 0.5, 0.75, 0.9, 0.95, 0.98)
"""Fractions of the planned steps at which the plan is made again. All come after the longest warm-up a fitted
schedule keeps (10% of the run), so a re-plan moves the cosine, not the warm-up (unless the speed more than
doubles). A re-plan takes the slower of the speed since the previous plan and the mean speed since the first
plan: a slowdown shortens the run at once, and a short fast spell lengthens it only a little. The schedules
are rebuilt over the new length, so a run shortened late still decays to its final learning rate (its cosine
steps ahead), and one lengthened late climbs back a little (ignoring the warm-up, with horizon_scale 1: at 90%
of the cosine, 5% more steps lift the learning rate from 2.4% to 5.0% of the way from its final value to its
peak). The late ones (0.75 to 0.98) keep the end inside the budget when the machine slows down in the second half
early enough for one of them to see it: with re-plans at 0.25 and 0.5 alone, a 15-minute run on a shared 2-core
machine that slowed down after its midpoint trained for 16.7 minutes (2026-12-06, bench/results/
2026-12-06-recipe-sweep-cpu/logs/V_ctl.log); with 0.9 the last, a 60-minute run that slowed from 0.16 to about
0.175 s a step after it trained for 60.6 (2026-12-07, bench/results/2026-12-07-label-efficiency-cpu-h/
cifar10_train.log), hence 0.95 and 0.98. A slowdown after the last re-plan still overruns, by at most the last
2% of the run's steps times the slowdown."""
EVAL_MARGIN = 1.5  # the logistic-regression fits and feature copies, on top of decoding and forwards
EVAL_FIXED_S = 5.0  # start-up of the report: random-init model, first batches


def eval_seconds(n_images: int, per_image_s: float) -> float:
    """Estimate of the end-of-run report over `n_images`, from its measured cost per image (decode and
    resize for three feature sets, two encoder forwards: `TimeBudget.measure_eval`)."""
    return 0.0 if n_images <= 0 else EVAL_MARGIN * n_images * per_image_s + EVAL_FIXED_S


def steps_that_fit(budget_s: float, elapsed_s: float, step: int, step_s: float, reserve_s: float,
                   total: int) -> int:
    """The run's new length in steps: `step` done, `elapsed_s` spent, `step_s` per further step, `reserve_s`
    kept for what follows training. Never more than `total`, never fewer than the steps already done."""
    left = budget_s - elapsed_s - reserve_s
    return max(step, min(total, step + int(max(0.0, left) // max(step_s, 1e-9))))


class TimeBudget:
    """Wall clock of one process's run, from `start` (the trainer's first line) on."""

    def __init__(self, minutes: float, start: float, eval_images: int, eval_cost: Callable[[], float] | None = None,
                 clock=time.perf_counter):
        """`eval_cost()`: seconds per image of the evaluation, measured on a few images when the plan is made."""
        self.budget_s, self.start, self.clock = 60.0 * minutes, start, clock
        self.eval_images, self.eval_cost = eval_images, eval_cost
        self.t_plan: float | None = None  # start of the speed measurement: the first step, then the previous plan
        self.step_plan = 0
        self.t_first, self.step_first = 0.0, 0  # the first plan's time and step
        self.cap: int | None = None  # the most steps the run asked for (the first plan's total)
        self.fit = 0  # the current plan's steps
        self.left = list(REPLAN_AT)  # the fractions of the plan at which it is still to be made again
        self.reserve = 0.0  # seconds kept for the evaluation

    def after_step(self, step: int, step0: int) -> bool:
        """Call after each step; True at the steps where the plan is due (the first, then the re-plans)."""
        if step == step0 + 1:
            self.t_plan, self.step_plan = self.clock(), step
        if self.t_plan is None:
            return False
        if self.cap is None:
            return step == self.step_plan + PROBE_STEPS
        return bool(self.replans and step >= self.replans[0])

    @property
    def replans(self) -> list[int]:
        """The steps at which the plan is still to be made again."""
        return [round(f * self.fit) for f in self.left]

    def plan(self, step: int, total: int) -> tuple[int, str]:
        """(steps the run will take, a log line saying why)."""
        now = self.clock()
        first = self.cap is None
        if first:
            self.cap = total
        since = self.step_plan + 1
        step_s = (now - self.t_plan) / max(1, step - self.step_plan)  # the speed since the previous plan
        overall = ""
        if not first:  # the slower of that and of every step since the first plan: a short fast spell
            mean_s = (now - self.t_first) / max(1, step - self.step_first)  # does not lengthen the run much
            overall = f"{mean_s:.2f} over steps {self.step_first + 1}-{step} (the slower counts), "
            step_s = max(step_s, mean_s)
        if first:  # the evaluation's cost is measured once
            per_image = self.eval_cost() if self.eval_images and self.eval_cost is not None else 0.0
            self.reserve = eval_seconds(self.eval_images, per_image)
        elapsed = self.clock() - self.start  # the measurement of the evaluation counts too
        fit = self.fit = steps_that_fit(self.budget_s, elapsed, step, step_s, self.reserve, self.cap)
        self.t_plan, self.step_plan = self.clock(), step
        if first:
            self.t_first, self.step_first = self.t_plan, step
        else:
            self.left = self.left[1:]  # this re-plan's fraction is done
        self.left = [f for f in self.left if step + PROBE_STEPS < round(f * fit) < fit]
        why = (f"time budget {self.budget_s / 60:.1f} min: {step_s:.2f} s/step measured over steps "
               f"{since}-{step}, {overall}{elapsed:.0f} s spent, "
               f"{self.reserve:.0f} s kept for the evaluation ({self.eval_images} images): {fit} steps"
               f"{' (all of them)' if fit >= self.cap else f' of {self.cap}'}")
        return fit, why

    @property
    def state(self) -> tuple:
        """What a plan decides besides its length, for the other processes (`adopt`): rank 0 plans alone."""
        return self.cap, self.fit, list(self.left), self.reserve

    def adopt(self, state: tuple) -> None:
        self.cap, self.fit, self.left, self.reserve = state[0], state[1], list(state[2]), state[3]
