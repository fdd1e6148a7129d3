"""Plots: `msn_fast.eval --plot` (accuracy against labelled images per class) and bench/plot.py (the train-step
speed-up and memory against the mask ratio). Checks the files and the figures' series, not pixels."""

import json
import math
import sys

import numpy as np
import pytest
from PIL import Image

from bench.plot import draw_summary, plot_summary
from bench.plot import main as bench_plot_main
from msn_fast.eval import main as eval_main
from msn_fast.evaluation import plot_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _result(mean, n, draws=3):
    return {"mean": mean, "std": 0.01, "num_labelled": [n] * draws}


def _report(name, base):
    results = {"1-shot": _result(base, 100), "2-shot": _result(base + 0.05, 200), "5-shot": _result(base + 0.1, 500),
               "1% labels": _result(base + 0.12, 1281), "10% labels": _result(base + 0.2, 12811),
               "1-shot subset": _result(base, 100), "20-NN (T=0.07)": _result(0.5, 128116, 1),
               "linear (all labels)": _result(0.6, 128116, 1)}
    return {"features": name, "num_classes": 100, "chance": 0.01, "data": "fake: 128116 train images", "results":
            results}


def test_plot_results_one_series_per_feature_set_and_kind(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "report.png"
    fig = plot_results([_report("msn", 0.4), _report("random-init", 0.05), _report("raw pixels", 0.03)], png)
    assert png.read_bytes()[:8] == PNG_MAGIC
    ax = fig.axes[0]
    bars = ax.containers  # one errorbar container per series
    assert len(bars) == 6  # 3 feature sets x (random draws, subset files)
    xs = np.asarray(bars[0].lines[0].get_xdata(), dtype=float)
    np.testing.assert_allclose(xs, [1, 2, 5, 12.81, 128.11])  # labelled images per class, k-NN/linear left out
    assert ax.get_xscale() == "log" and "labelled images per class" in ax.get_xlabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()][:3] == ["chance", "msn", "msn (subset files)"]


def _dataset(root):
    for s in ("train", "val"):
        for c, colour in enumerate([(220, 30, 30), (30, 200, 40)]):
            for i in range(4):
                (root / s / f"c{c}").mkdir(parents=True, exist_ok=True)
                arr = np.clip(np.array(colour) + np.random.default_rng(i).normal(0, 30, (8, 8, 3)), 0, 255)
                Image.fromarray(arr.astype(np.uint8)).save(root / s / f"c{c}" / f"{s}{i}.png")
    return root


def test_eval_cli_plot_with_baselines(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    root = _dataset(tmp_path / "d")
    png = tmp_path / "plots" / "report.png"
    rc = eval_main(["--raw-pixels", "--baselines", "--model", "cpu_demo", "--data", str(root), "--shots", "1", "2",
                    "--fractions", "0.5", "--draws", "2", "--knn-k", "0", "--no-cache", "--no-progress",
                    "--plot", str(png), "--out", str(tmp_path / "r.json")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert png.read_bytes()[:8] == PNG_MAGIC
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["features"] == "raw pixels" and [b["features"][:11] for b in rep["baselines"]] == ["random-init"]
    assert out.count("evaluated on val") == 2  # one summary line per feature set


def test_eval_plot_without_matplotlib_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rc = eval_main(["--raw-pixels", "--data", str(tmp_path), "--plot", str(tmp_path / "p.png")])
    err = capsys.readouterr().err
    assert rc == 2 and err == 'error: --plot needs matplotlib: pip install "msn-fast[bench]"\n'


def _summary():
    rows = []
    for case, ideal in (("l7_tokens_d128", (1.0, 1.3, 1.7, 2.5)), ("l7_tokens_d256", (1.0, 1.35, 1.8, 2.7))):
        for r, x in zip((0.0, 0.3, 0.5, 0.7), ideal):
            kept = 1024 if r == 0 else math.floor(1024 * (1 - r))
            row = {"case": case, "mask_ratio": r, "images_per_s": 10 * x, "flop_ideal_speedup": x,
                   "saved_bytes_per_image": 1e8 * (1 - 0.6 * r), "num_focal": 10,
                   "tokens_per_image": {"target": 1025, "anchor": 1 + kept, "focal_view": 170}}
            if r:
                row.update(speedup_vs_unmasked=0.9 * x, speedup_vs_unmasked_pairs=0.92 * x,
                           speedup_vs_unmasked_min=0.85 * x)
            rows.append(row)
    return {"environment": {"device": "cpu", "torch": "2.x", "date": "2026-01-01"},
            "paper_table10": {"0.0": [26, 415], "0.3": [21, 480], "0.5": [18, 525], "0.7": [17, 600]},
            "train_step": rows,
            "memory_estimate_vit_l7": {"costs": {"0.0": {"saved_bytes_per_image": 3e9},
                                                 "0.7": {"saved_bytes_per_image": 1.5e9}}}}


def test_bench_plot_series(tmp_path):
    pytest.importorskip("matplotlib")
    fig = draw_summary(_summary())
    ax_t, ax_m = fig.axes
    # throughput: paper + per case (measured with error bars, FLOP-ideal)
    assert len(ax_t.containers) == 2 and len(ax_t.get_legend().get_texts()) == 1 + 2 * 2
    np.testing.assert_allclose(ax_t.lines[0].get_ydata(), [1, 480 / 415, 525 / 415, 600 / 415])
    # memory: paper + per case (measured, token-ideal) + the real L/7 estimate
    assert len(ax_m.get_legend().get_texts()) == 1 + 2 * 2 + 1
    src = tmp_path / "train_step_summary.json"
    src.write_text(json.dumps(_summary()))
    assert bench_plot_main([str(src)]) == 0
    assert (tmp_path / "train_step.png").read_bytes()[:8] == PNG_MAGIC


def test_bench_plot_errors_are_one_line(tmp_path, capsys, monkeypatch):
    assert bench_plot_main([str(tmp_path / "missing.json")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    (tmp_path / "s.json").write_text("{}")
    assert bench_plot_main([str(tmp_path / "s.json")]) == 2
    assert "missing key 'paper_table10'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot_summary(_summary(), tmp_path / "x.png") is None
    assert capsys.readouterr().err == ('bench.plot: matplotlib is not installed (pip install "msn-fast[bench]"); '
                                       "no plot written\n")
