"""Progress output (msn_fast/progress.py): a tqdm bar on a terminal, periodic log lines elsewhere, off on request."""

import logging
import sys

import numpy as np
import pytest
import torch

from msn_fast import progress
from msn_fast.progress import Progress, track

log = logging.getLogger("msn_fast.test_progress")


class Clock:
    def __init__(self, step):
        self.t, self.step = 0.0, step

    def __call__(self):
        self.t += self.step
        return self.t


@pytest.fixture(autouse=True)
def _default_progress(monkeypatch):
    monkeypatch.delenv("MSN_FAST_PROGRESS", raising=False)
    progress.set_enabled(None)
    yield
    progress.set_enabled(None)


def _tty(monkeypatch, flag: bool):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: flag)


def test_terminal_gets_a_tqdm_bar(monkeypatch, capsys, caplog):
    pytest.importorskip("tqdm")
    _tty(monkeypatch, True)
    with caplog.at_level(logging.INFO), Progress(40, "features train", log, unit="img", delay=0) as p:
        assert p.mode == "bar"
        for _ in range(40):
            p.update()
    err = capsys.readouterr().err
    assert "features train:" in err and "/40 [" in err and "img/s" in err and "\r" in err
    assert not caplog.records  # the bar, not log lines


def test_log_lines_every_tenth_off_a_terminal(monkeypatch, capsys, caplog):
    _tty(monkeypatch, False)
    with caplog.at_level(logging.INFO), Progress(100, "1-shot: labelled sets", log, unit="set", delay=0,
                                                 clock=Clock(0.1)) as p:
        assert p.mode == "lines"
        for _ in range(100):
            p.update()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("1-shot: labelled sets: 10/100 set (10%)") and "left" in lines[0]
    assert len(lines) == 10 and lines[-1].startswith("1-shot: labelled sets: 100 set done in")  # 10..90%, done
    assert all(r.name == "msn_fast.test_progress" for r in caplog.records)
    assert capsys.readouterr().err == ""


def test_slow_steps_get_a_line_every_30_s_and_short_loops_stay_silent(monkeypatch, caplog):
    _tty(monkeypatch, False)
    with caplog.at_level(logging.INFO), Progress(1000, "λ search", log, clock=Clock(10.0)) as p:
        for _ in range(7):  # 70 s, under 1% done: lines from the 30 s rule only
            p.update()
    assert [m.getMessage().split(":")[1].strip() for m in caplog.records] == ["3/1000 it (0%), 30 s, about 9970 s "
                                                                               "left", "6/1000 it (1%), 60 s, about "
                                                                               "9940 s left", "7 it done in 80 s"]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        list(track(range(50), "quick", log))  # the default 2 s delay: a quick loop prints nothing
    assert not caplog.records


@pytest.mark.parametrize("how", ["env", "flag"])
def test_off(monkeypatch, capsys, caplog, how):
    _tty(monkeypatch, True)
    if how == "env":
        monkeypatch.setenv("MSN_FAST_PROGRESS", "0")
    else:
        progress.set_enabled(False)
    with caplog.at_level(logging.INFO), Progress(10, "x", log, delay=0, clock=Clock(100.0)) as p:
        assert p.mode == "off"
        for _ in range(10):
            p.update()
    assert capsys.readouterr().err == "" and not caplog.records


def test_evaluation_reports_progress_through_its_logger(monkeypatch, caplog):
    """The draws and the λ search of lowshot_eval, and feature extraction, write lines through msn_fast.evaluation's
    logger."""
    from msn_fast import evaluation as ev
    from msn_fast.features import extract_features

    _tty(monkeypatch, False)
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 4)).astype(np.float32), np.repeat(np.arange(3), 10)
    with caplog.at_level(logging.INFO, logger="msn_fast.evaluation"):
        ev.lowshot_eval(x, y, x, y, shots=(5,), draws=2, reg="cv")
        extract_features(lambda b: b.flatten(1), [(np.zeros((2, 2, 3), np.float32), 0)] * 3, torch.from_numpy,
                         desc="train features")
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "msn_fast.evaluation")
    assert "5-shot: labelled sets: 1/2 set (50%)" in text and "5-shot: labelled sets: 2 set done" in text
    assert "λ search (15 images, 3 folds)" in text and "train features: 3 img done" in text


def test_eval_cli_no_progress(tmp_path, monkeypatch, capsys, caplog):
    from PIL import Image

    from msn_fast.eval import main

    for s in ("train", "test"):
        for c in range(2):
            for i in range(2):
                (tmp_path / s / f"c{c}").mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), (200 * c, 50, 90 + i)).save(tmp_path / s / f"c{c}" / f"{i}.png")
    _tty(monkeypatch, False)
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    args = ["--raw-pixels", "--model", "cpu_demo", "--data", str(tmp_path), "--shots", "1", "--fractions",
            "--draws", "1", "--knn-k", "0", "--no-cache"]
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    assert "train images: 4 img done" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(args + ["--no-progress"]) == 0
    assert " done in " not in caplog.text and progress.enabled()  # and it is on again afterwards
