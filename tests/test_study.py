"""`python -m msn_fast.study`: pre-train, evaluate against the baselines, the curve over minutes, the report."""

import json
from pathlib import Path

import pytest
from test_eval_cli import _folder_dataset

from msn_fast import study, study_report
from msn_fast.checkpoint import list_checkpoints, load_meta

TINY = ["--model", "cpu_demo", "--", "--run.max_steps", "6", "--data.batch_size", "6", "--data.num_workers", "0",
        "--vit.dim", "32", "--vit.depth", "1", "--vit.heads", "2", "--head.hidden_dim", "32", "--head.out_dim", "16",
        "--data.num_focal", "1", "--run.log_every", "1"]


def _report(rows: dict[str, tuple[float, float]], name: str) -> dict:
    return {"features": name, "results": {k: {"mean": m, "class_mean": c, "std": 0.0} for k, (m, c) in rows.items()}}


def test_margins_take_the_best_baseline_and_the_bar_needs_every_shot_and_both_means():
    msn = _report({"1-shot": (0.30, 0.30), "2-shot": (0.33, 0.31), "5-shot": (0.40, 0.36)}, "msn")
    rand = _report({"1-shot": (0.15, 0.15), "2-shot": (0.18, 0.18), "5-shot": (0.20, 0.20)}, "random")
    pix = _report({"1-shot": (0.19, 0.19), "2-shot": (0.21, 0.22), "5-shot": (0.30, 0.25)}, "pixels")
    gaps = study_report.margins([msn, rand, pix])
    assert gaps["1-shot"] == {"mean": 11.0, "class_mean": 11.0}
    assert gaps["2-shot"] == {"mean": 12.0, "class_mean": 9.0}  # the best baseline per mean: pixels' 0.22
    assert gaps["5-shot"] == {"mean": 10.0, "class_mean": 11.0}
    assert study_report.bar_verdict("cifar10", gaps)["met"] is False  # 2-shot per-class margin 9 < 10
    assert study_report.bar_verdict("caltech101", gaps)["met"] is True  # 5-shot only, 5 points
    assert study_report.bar_verdict("photos", gaps) is None  # no bar for a set the issue does not name
    gaps["2-shot"]["class_mean"] = 10.0
    assert study_report.bar_verdict("cifar10", gaps)["met"] is True


def test_progress_relay_repeats_a_line_only_when_it_changes_or_after_a_quiet_spell():
    relay = study.ProgressRelay(quiet=30.0)
    assert relay.due("a", "starting", 0.0)
    assert not relay.due("a", "starting", 1.0)  # polled every second: not printed again
    assert relay.due("b", "starting", 1.0)  # each run has its own last line
    assert relay.due("a", "step 50/100", 2.0) and not relay.due("a", "step 50/100", 31.9)
    assert relay.due("a", "step 50/100", 32.0)  # alive but silent for 30 s: said again
    assert not relay.due("a", "step 50/100", 33.0) and relay.due("a", "step 100/100", 33.0)


def test_by_default_each_pretraining_gets_every_core_one_after_the_other():
    assert study.build_parser().parse_args([]).jobs == 1
    assert study.concurrency(2, 1, 2) == (1, 2)  # the default: each dataset has both cores for its hour
    assert study.concurrency(2, 0, 2) == (2, 1)  # --jobs 0: both at once, a core each
    assert study.concurrency(3, 0, 2) == (3, 1)  # never fewer than one thread
    assert study.concurrency(1, 0, 2) == (1, 2) and study.concurrency(1, 4, 2) == (1, 2)
    assert study.concurrency(0, 1, 2) == (1, 2)  # nothing left to train (all finished)


def test_curve_points_take_the_last_checkpoint_before_each_mark(monkeypatch):
    minutes = {f"s{i}": m for i, m in enumerate([1.0, 2.5, 4.9, 5.2, 9.0, 10.5, 12.0])}
    monkeypatch.setattr(study, "list_checkpoints", lambda run: [Path(k) for k in minutes])
    monkeypatch.setattr(study, "load_meta", lambda p: {"extra": {"train_minutes": minutes[str(p)]}})
    got = [(m, str(p)) for m, p in study.curve_points(Path("run"), 5.0)]
    assert got == [(4.9, "s2"), (9.0, "s4"), (12.0, "s6")]  # marks 5 and 10, then the final checkpoint


def test_dataset_flags_are_checked(tmp_path):
    with pytest.raises(SystemExit, match="NAME=DIR"):
        study.datasets(study.build_parser().parse_args(["--dataset", "nodir"]))
    with pytest.raises(SystemExit, match="no cifar10 or caltech101 folder"):
        study.datasets(study.build_parser().parse_args(["--data-root", str(tmp_path)]))
    (tmp_path / "flat" / "cats").mkdir(parents=True)  # no train/ + test/ (or lists): refused before pre-training
    with pytest.raises(SystemExit, match=r"error: --dataset flat=.*flat"):
        study.datasets(study.build_parser().parse_args(["--dataset", f"flat={tmp_path / 'flat'}"]))


def test_an_evaluation_error_is_one_line_naming_the_dataset(tmp_path, monkeypatch):
    from msn_fast.dataloading import DataError

    root = _folder_dataset(tmp_path / "toy")
    monkeypatch.setattr(study, "pretrain", lambda *a: None)

    def broken(*a):
        raise DataError("all 12 train images of toy are unreadable")

    monkeypatch.setattr(study, "evaluate", broken)
    with pytest.raises(SystemExit, match="error: evaluating toy: all 12 train images"):
        study.main(["--dataset", f"toy={root}", "--out", str(tmp_path / "out")])
    monkeypatch.setattr(study, "evaluate", lambda *a: 1 / 0)  # a bug is not turned into a one-line error
    with pytest.raises(ZeroDivisionError):
        study.main(["--dataset", f"toy={root}", "--out", str(tmp_path / "out")])


def test_study_end_to_end_on_a_tiny_folder(tmp_path):
    root = _folder_dataset(tmp_path / "toy", n_train=8, n_test=4)
    out = tmp_path / "study"
    argv = ["--dataset", f"toy={root}", "--out", str(out), "--minutes", "5", "--checkpoint-every", "2",
            "--curve-every", "1e-9", "--draws", "2", "--knn-k", "3", *TINY]
    assert study.main(argv) == 0
    run = out / "toy" / "run"
    steps = list_checkpoints(run)
    assert [load_meta(p)["step"] for p in steps] == [2, 4, 6]  # every checkpoint kept for the curve
    minutes = [load_meta(p)["extra"]["train_minutes"] for p in steps]
    assert 0 < minutes[0] < minutes[1] < minutes[2] < 5

    rep = json.loads((out / "report.json").read_text())
    ds = rep["datasets"]["toy"]
    assert [r["features"] for r in ds["reports"]][0] == "MSN target encoder" and len(ds["reports"]) == 3
    assert {"1-shot", "2-shot", "5-shot", "10% labels", "3-NN (T=0.07)"} <= set(ds["reports"][0]["results"])
    assert ds["pretrain"]["steps"] == 6 and ds["pretrain"]["train_images"] == 24 and ds["bar"] is None
    assert [p["step"] for p in ds["curve"]] == [0, 2, 4, 6]  # minute 0 is the random-init encoder
    assert ds["curve"][0]["mean"] == ds["reports"][1]["results"]["5-shot"]["mean"]
    assert set(ds["margins"]) >= {"1-shot", "5-shot"}
    md = (out / "report.md").read_text()
    assert "| toy | MSN target encoder |" in md and "| toy | raw pixels |" in md and "MSN − best baseline" in md
    assert (out / "curve.png").stat().st_size > 0 and (out / "toy_accuracy.png").stat().st_size > 0

    # a second study over the same folder trains nothing again
    log_before, out_before = (run / "train.log").read_text(), (out / "toy" / "train.out").read_text()
    assert study.main(argv) == 0
    assert (run / "train.log").read_text() == log_before  # no trainer started: train.out gets every start's output
    assert (out / "toy" / "train.out").read_text() == out_before


def test_a_stopped_study_stops_its_trainers_with_a_checkpoint_and_continues(tmp_path):
    """SIGTERM to the study: each trainer gets SIGINT, saves and stops; the same command then resumes the run
    (not from step 0) and finishes the report."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = _folder_dataset(tmp_path / "toy", n_train=8, n_test=4)
    out = tmp_path / "study"
    argv = ["--dataset", f"toy={root}", "--out", str(out), "--minutes", "5", "--checkpoint-every", "2",
            "--draws", "2", "--knn-k", "3", *TINY]
    argv[argv.index("6")] = "400"  # --run.max_steps: the recipe's epochs cap the run at 32 steps
    argv += ["--optim.epochs", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "msn_fast.study", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    run = out / "toy" / "run"
    deadline = time.monotonic() + 120
    while not list_checkpoints(run) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list_checkpoints(run), proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, log
    assert "stopped by SIGINT" in (run / "train.log").read_text()
    stopped_at = load_meta(list_checkpoints(run)[-1])["step"]
    assert 2 <= stopped_at < 32 and not (out / "report.json").exists()
    assert study.main(argv) == 0
    assert f"at step {stopped_at}" in (run / "train.log").read_text()  # "resumed from ... at step N"
    assert load_meta(list_checkpoints(run)[-1])["step"] == 32
    assert (out / "report.json").is_file()
