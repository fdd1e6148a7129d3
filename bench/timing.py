"""Timing helpers for the bench suites: CUDA sync, clocks, interleaved A/B ratios (fixtures in conftest.py).

`Timer("wall")` (the `timer` fixture) suits anything, worker processes and GPUs included. The train step uses
CLOCK: on a machine without CUDA the process's CPU time (time.process_time), which on a shared CPU counts only
the time this process ran, so other jobs inflate it far less than wall-clock time; the timed code then runs on
one thread (torch.set_num_threads(1)), so CPU time is not inflated by threads waiting on each other either.
With CUDA, CLOCK is wall time and every timed function ends with a sync. MSN_BENCH_CLOCK=wall|cpu overrides it.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch

HAS_CUDA = torch.cuda.is_available()
CLOCK_NAME = os.environ.get("MSN_BENCH_CLOCK", "wall" if HAS_CUDA else "cpu")
if CLOCK_NAME not in ("wall", "cpu"):
    raise ValueError(f"MSN_BENCH_CLOCK={CLOCK_NAME!r}: choose wall or cpu")
CLOCK: Callable[[], float] = time.perf_counter if CLOCK_NAME == "wall" else time.process_time


def sync() -> None:
    """Wait for queued CUDA work (no-op on a CPU); every timed function ends with it."""
    if HAS_CUDA:
        torch.cuda.synchronize()


class Timer:
    """Times functions (followed by `sync()`) on one clock, reported as medians and ratios.

    clock: "wall" (perf_counter; the conftest fixture's default: right for anything with worker processes
    or a GPU) or "cpu" (this process's CPU time; for single-threaded CPU compute on a shared machine).
    """

    def __init__(self, clock: str = "wall"):
        if clock not in ("wall", "cpu"):
            raise ValueError(f"Timer: clock {clock!r}: choose wall or cpu")
        self.clock_name = clock
        self.clock: Callable[[], float] = time.perf_counter if clock == "wall" else time.process_time

    def once(self, fn: Callable[[], object]) -> tuple[float, float]:
        """(clock seconds, wall seconds) of one call."""
        t0, w0 = self.clock(), time.perf_counter()
        fn()
        sync()
        return self.clock() - t0, time.perf_counter() - w0

    def pedantic(self, benchmark, fn: Callable[[], object], rounds: int, warmup: int = 0) -> float:
        """Time `fn` with pytest-benchmark (one call per round); the median in seconds.

        pytest-benchmark uses its own timer: for a "cpu" Timer mark the test `@pytest.mark.benchmark(timer=CLOCK)`
        with MSN_BENCH_CLOCK=cpu (the default without CUDA), or pass `timer=time.process_time`."""
        benchmark.pedantic(lambda: (fn(), sync()), rounds=rounds, warmup_rounds=warmup, iterations=1)
        return benchmark.stats.stats.median

    def pedantic_ab(self, benchmark, fn_a: Callable[[], object], fn_b: Callable[[], object], rounds: int) -> dict:
        """pytest-benchmark times B; A runs (and is timed here) just before each round, so A and B alternate
        and see the same machine load. ratio = median(A) / median(B); ratio_pairs = the median of the
        per-round ratios of neighbouring runs (robust to slow drifts in load); ratio_min = min(A) / min(B)
        (on a shared machine noise only adds time, so the fastest runs are the least disturbed)."""
        if getattr(benchmark, "_timer", self.clock) is not self.clock:
            raise ValueError(f"pedantic_ab: pytest-benchmark's timer is not this Timer's {self.clock_name} clock")
        a: list[tuple[float, float]] = []
        benchmark.pedantic(
            lambda: (fn_b(), sync()),
            setup=lambda: a.append(self.once(fn_a)),
            rounds=rounds,
            warmup_rounds=0,
            iterations=1,
        )
        b = list(benchmark.stats.stats.data)
        ta = [t for t, _ in a]
        return {**self._ab(ta, b, rounds), "ratio_min": min(ta) / min(b),
                "a_wall_median_s": statistics.median(w for _, w in a)}

    def paired(self, fn_a: Callable[[], object], fn_b: Callable[[], object], rounds: int, warmup: int = 1) -> dict:
        """Interleaved A/B timing without pytest-benchmark, in ABBA order: ratio = median(A) / median(B), and
        ratio_pairs = the median of the per-round ratios of neighbouring runs."""
        for _ in range(warmup):
            fn_a(), fn_b()
            sync()
        ta, tb = [], []
        for i in range(rounds):
            first, second = ((fn_a, ta), (fn_b, tb)) if i % 2 == 0 else ((fn_b, tb), (fn_a, ta))
            for fn, acc in (first, second):
                acc.append(self.once(fn)[0])
        return self._ab(ta, tb, rounds)

    def _ab(self, ta: list[float], tb: list[float], rounds: int) -> dict:
        """The common A/B record of per-round times: medians, ratio of medians, median of per-round ratios."""
        ma, mb = statistics.median(ta), statistics.median(tb)
        return {"a_median_s": ma, "b_median_s": mb, "ratio": ma / mb, "rounds": rounds,
                "ratio_pairs": statistics.median(a / b for a, b in zip(ta, tb)), "clock": self.clock_name}
