"""Progress of the long evaluation loops (feature extraction, cache decoding, draws, the λ search).

On a terminal (`sys.stderr.isatty()`) a tqdm bar on stderr, gone when the loop ends. Elsewhere (a log file,
CI) plain INFO lines through the caller's logger: one at each 10% and at least every 30 s, from 2 s after
the start (so short loops stay silent), and a closing line. Off with MSN_FAST_PROGRESS=0 or
`set_enabled(False)` (`python -m msn_fast.eval --no-progress`). Without tqdm installed, plain lines everywhere.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

EVERY = 0.1
"""Plain mode: a line each time this fraction of the total is passed."""
INTERVAL_S = 30.0
"""Plain mode: and at least this often."""
DELAY_S = 2.0
"""Nothing is shown before a loop has run this long (bar or lines)."""

_enabled: bool | None = None


def set_enabled(flag: bool | None) -> None:
    """Turn progress on or off for this process; None goes back to MSN_FAST_PROGRESS (default on)."""
    global _enabled
    _enabled = flag


def enabled() -> bool:
    if _enabled is not None:
        return _enabled
    return os.environ.get("MSN_FAST_PROGRESS", "1").strip().lower() not in ("0", "false", "no", "off")


def _tqdm():
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


class Progress:
    """`with Progress(total, "features train", log, unit="img") as p: ... p.update(n)`.

    `mode` is "bar" (tqdm), "lines" (logging) or "off", chosen when it is made."""

    def __init__(self, total: int | None, desc: str, logger: logging.Logger, unit: str = "it",
                 delay: float | None = None, clock=time.monotonic):
        self.total, self.desc, self.log, self.unit, self.clock = total, desc, logger, unit, clock
        self.delay = DELAY_S if delay is None else delay
        self.n, self.start = 0, clock()
        self._last_line, self._last_step, self._lines = self.start, 0, 0
        tqdm = _tqdm() if enabled() and sys.stderr is not None and sys.stderr.isatty() else None
        self.mode = "off" if not enabled() else "bar" if tqdm is not None else "lines"
        self._bar = None
        if self.mode == "bar":
            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True,
                             delay=self.delay)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "lines":
            now = self.clock()
            step = int(self.n / self.total / EVERY + 1e-9) if self.total else 0
            if now - self.start >= self.delay and self.n != self.total and (
                    step > self._last_step or now - self._last_line >= INTERVAL_S):
                self._line(now)
                self._last_step = step

    def _line(self, now: float) -> None:
        elapsed = now - self.start
        if self.total:
            eta = elapsed / max(self.n, 1) * (self.total - self.n)
            self.log.info("%s: %d/%d %s (%.0f%%), %.0f s, about %.0f s left", self.desc, self.n, self.total,
                          self.unit, 100 * self.n / self.total, elapsed, eta)
        else:
            self.log.info("%s: %d %s, %.0f s", self.desc, self.n, self.unit, elapsed)
        self._last_line, self._lines = now, self._lines + 1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "lines" and (self._lines or self.clock() - self.start >= self.delay):
            self.log.info("%s: %d %s done in %.0f s", self.desc, self.n, self.unit, self.clock() - self.start)
            self.mode = "off"

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(items: Iterable[T], desc: str, logger: logging.Logger, total: int | None = None,
          unit: str = "it") -> Iterator[T]:
    """Iterate `items` with a `Progress` of one step per item (`total` defaults to len(items))."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with Progress(total, desc, logger, unit) as p:
        for x in items:
            yield x
            p.update()
