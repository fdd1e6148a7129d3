"""Shared bench fixtures: device, the timer (bench/timing.py: CUDA sync, clock, interleaved A/B ratios), and the
end-of-run summary tables.

`pytest bench/ --benchmark-only` runs every suite; add `--benchmark-json=FILE` for pytest-benchmark's JSON.
Suites add rows to `bench_report` (printed as compact tables after the run) and may register a
finaliser that writes files (JSON, plots) under the output folder: $MSN_BENCH_OUT, or a fresh temporary
folder when it is unset (so a CPU run never writes into the repository unless asked).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from bench.timing import HAS_CUDA, Timer, sync

__all__ = ["sync", "Timer"]
OUT_ENV = "MSN_BENCH_OUT"


class BenchReport:
    """Rows of compact tables printed after the run, raw records, and finalisers that write files."""

    def __init__(self) -> None:
        self.tables: dict[str, list[dict]] = {}
        self.notes: dict[str, list[str]] = {}
        self.records: dict[str, list[dict]] = {}
        self._finalisers: dict[str, Callable[[BenchReport, Path], list[Path]]] = {}

    def add_row(self, table: str, row: dict) -> None:
        self.tables.setdefault(table, []).append(row)

    def add_note(self, table: str, line: str) -> None:
        if line not in self.notes.setdefault(table, []):
            self.notes[table].append(line)

    def add_record(self, key: str, record: dict) -> None:
        self.records.setdefault(key, []).append(record)

    def on_finish(self, name: str, fn: Callable[[BenchReport, Path], list[Path]]) -> None:
        """Register fn(report, out_dir) -> written paths, run once after the run (re-registering replaces)."""
        self._finalisers[name] = fn

    def out_dir(self) -> Path:
        path = os.environ.get(OUT_ENV)
        out = Path(path) if path else Path(tempfile.mkdtemp(prefix="msn_bench_"))
        out.mkdir(parents=True, exist_ok=True)
        return out

    def finish(self) -> tuple[Path | None, list[Path]]:
        if not self._finalisers:
            return None, []
        out = self.out_dir()
        written: list[Path] = []
        for fn in self._finalisers.values():
            written += fn(self, out)
        return out, written


_REPORT = pytest.StashKey[BenchReport]()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
    return "-" if v is None else str(v)


def format_table(rows: list[dict]) -> list[str]:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return [line(cols), line(["-" * w for w in widths])] + [line(row) for row in cells]


def pytest_configure(config):
    config.stash[_REPORT] = BenchReport()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    report = config.stash.get(_REPORT, None)
    if report is None or not (report.tables or report._finalisers):
        return
    for title, rows in report.tables.items():
        terminalreporter.write_sep("=", title)
        for line in format_table(rows):
            terminalreporter.write_line(line)
        for note in report.notes.get(title, []):
            terminalreporter.write_line(note)
    out, written = report.finish()
    if out is not None:
        terminalreporter.write_sep("-", f"bench results written under {out}")
        for path in written:
            terminalreporter.write_line(f"  {path}")


@pytest.fixture(scope="session")
def bench_report(pytestconfig) -> BenchReport:
    return pytestconfig.stash[_REPORT]


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(scope="session")
def timer() -> Timer:
    """A wall-clock Timer (bench/timing.py): pedantic, pedantic_ab and paired (interleaved A/B ratios)."""
    return Timer("wall")
