"""Results of the train-step bench: a summary JSON and a plot of images/s and memory against the mask ratio.

Both are relative to the unmasked step of the same run, beside the FLOP-ideal speed-up (counted FLOPs), the
token-ideal memory (student tokens kept) and the paper's Table 10 ratios (ViT-L/7 on 8 A100); error bars span the
speed-up's estimates (median times, median pair ratio, fastest times). matplotlib is optional (the `bench` extra:
pip install "msn-fast[bench]"): without it only the JSON is written.

    python -m bench.plot bench/results/<date>/train_step_summary.json    # redraw train_step.png beside it
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import sys
from pathlib import Path

import torch

SUMMARY = "train_step_summary.json"
PLOT = "train_step.png"


def environment() -> dict:
    """Date, device, versions and the exact command, for every result file."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda if cuda else None,
        "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
        "command": " ".join([Path(sys.executable).name, "-m", "pytest", *sys.argv[1:]]),
    }  # fmt: skip


def write_train_step_results(records: dict, out: Path, paper: dict) -> list[Path]:
    """Write <out>/train_step_summary.json and, when matplotlib is installed, <out>/train_step.png."""
    out = Path(out)
    summary = {
        "environment": environment(),
        "paper_table10": {str(k): v for k, v in paper.items()},
        "train_step": records.get("train_step", []),
        "memory_estimate_vit_l7": (records.get("memory_estimate_vit_l7") or [None])[-1],
    }
    path = out / SUMMARY
    path.write_text(json.dumps(summary, indent=2, default=str))
    written = [path]
    png = plot_summary(summary, out / PLOT)
    if png is not None:
        written.append(png)
    return written


def _series(rows: list[dict]) -> dict[str, list[dict]]:
    by_case: dict[str, list[dict]] = {}
    for r in rows:
        by_case.setdefault(r["case"], []).append(r)
    return {k: sorted(v, key=lambda r: r["mask_ratio"]) for k, v in by_case.items()}


def _spread(row: dict) -> tuple[float, float]:
    """(below, above) the median-time speed-up: the range of its three estimates (median pair ratio, fastest)."""
    mid = row.get("speedup_vs_unmasked", 1.0)
    est = [row.get(k, mid) for k in ("speedup_vs_unmasked", "speedup_vs_unmasked_pairs", "speedup_vs_unmasked_min")]
    return mid - min(est), max(est) - mid


def _token_ideal(rows: list[dict]) -> list[float] | None:
    """Activation memory if it scaled with the student's tokens (anchor + focal views; the target has no grad)."""
    if "tokens_per_image" not in rows[0] or rows[0]["mask_ratio"] != 0.0:
        return None

    def student(r):
        t = r["tokens_per_image"]
        return t["anchor"] + r.get("num_focal", 0) * t["focal_view"]

    return [student(r) / student(rows[0]) for r in rows]


def draw_summary(summary: dict):
    """The figure: speed-up over the unmasked step (measured with its spread, FLOP-ideal, paper) and memory
    relative to it (measured, token-ideal, paper, the real L/7 estimate), against the mask ratio."""
    from matplotlib.figure import Figure

    paper = {float(k): v for k, v in summary["paper_table10"].items()}
    pr = sorted(paper)
    fig = Figure(figsize=(12, 4.8))
    ax_t, ax_m = fig.subplots(1, 2)
    ax_t.plot(pr, [paper[r][1] / paper[0.0][1] for r in pr], "ks-", label="paper Table 10 (L/7, 8xA100)")
    ax_m.plot(pr, [paper[r][0] / paper[0.0][0] for r in pr], "ks-", label="paper Table 10 (L/7, 8xA100)")
    for i, (case, rows) in enumerate(_series(summary["train_step"]).items()):
        color = f"C{i}"
        xs = [r["mask_ratio"] for r in rows]
        speed = [r.get("speedup_vs_unmasked", 1.0) for r in rows]
        last = rows[-1]
        ax_t.errorbar(xs, speed, yerr=list(zip(*map(_spread, rows))), fmt="o-", color=color, capsize=3,
                      label=f"{case} measured ({last['images_per_s']:.1f} img/s at r={last['mask_ratio']})")
        ax_t.plot(xs, [r["flop_ideal_speedup"] for r in rows], "--", color=color, alpha=0.7,
                  label=f"{case} FLOP-ideal")
        key = "peak_allocated_bytes" if "peak_allocated_bytes" in rows[0] else "saved_bytes_per_image"
        base = rows[0][key] if rows[0]["mask_ratio"] == 0.0 else None
        if base:
            what = "peak allocated" if key == "peak_allocated_bytes" else "saved for backward"
            ax_m.plot(xs, [r[key] / base for r in rows], "o-", color=color,
                      label=f"{case} {what} ({base / 2**30:.2f} GiB unmasked)")
        ideal = _token_ideal(rows)
        if ideal:
            ax_m.plot(xs, ideal, "--", color=color, alpha=0.7, label=f"{case} token-ideal (student tokens)")
    mem = summary.get("memory_estimate_vit_l7")
    if mem:
        c0, c7 = mem["costs"]["0.0"], mem["costs"]["0.7"]
        ax_m.plot([0.0, 0.7], [1.0, c7["saved_bytes_per_image"] / c0["saved_bytes_per_image"]], "^:", color="gray",
                  label=f"real L/7 saved/img, fake tensors ({c0['saved_bytes_per_image'] / 2**30:.2f} GiB unmasked)")
    env = summary["environment"]
    ax_t.set(xlabel="mask ratio (anchor view)", ylabel="images/s relative to mask 0",
             title="throughput (bars: spread of the timed estimates)")
    ax_m.set(xlabel="mask ratio (anchor view)", ylabel="memory relative to mask 0", title="memory")
    for ax in (ax_t, ax_m):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"MSN training step, masked vs unmasked: {env['device']}, torch {env['torch']}, {env['date']}",
                 fontsize=9)
    fig.tight_layout()
    return fig


def plot_summary(summary: dict, png: Path) -> Path | None:
    """Write `draw_summary`'s figure to `png`; None (and one line on stderr) without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print('bench.plot: matplotlib is not installed (pip install "msn-fast[bench]"); no plot written',
              file=sys.stderr)
        return None
    draw_summary(summary).savefig(png, dpi=120)
    return Path(png)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or len(argv) > 2:
        print("usage: " + __doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    src = Path(argv[0])
    png = Path(argv[1]) if len(argv) > 1 else src.with_name(PLOT)
    try:
        summary = json.loads(src.read_text())
        written = plot_summary(summary, png)
    except (OSError, ValueError, KeyError, TypeError) as e:
        what = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        print(f"error: {src} is not a readable {SUMMARY}: {what}", file=sys.stderr)
        return 2
    if written:
        print(f"wrote {written}")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
