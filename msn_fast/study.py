"""The label-efficiency study in one command: pre-train on each dataset within a wall-clock budget, score the
target encoder against raw pixels and the same ViT with random weights, and write the report.

    python -m msn_fast.study --data-root ../shared/data --minutes 60          # CIFAR-10 and Caltech-101
    python -m msn_fast.study --dataset photos=/data/photos --minutes 60       # any other labelled set, untuned

Per dataset (DIR as `python -m msn_fast.eval --data` takes it; pre-training reads its train split only):
1. `python -m msn_fast.train --model RECIPE --data.path DIR --run.time_budget MINUTES` in a subprocess, with
   `--run.resume true` (a killed study continues where it stopped; a finished run is not trained again) and a
   checkpoint every `--checkpoint-every` steps, all kept. `--jobs` runs go at once, each with its share of the
   cores. The default, 1, gives each dataset every core for MINUTES, one after the other (the bar's budget: an
   hour of a 2-core CPU per dataset); `--jobs 0` runs them all at once, one share each, in MINUTES in all.
2. `msn_fast.eval` with `--baselines`: 1/2/5 shots, a label fraction (1% when the train split has 10,000
   images or more, else 10%), 20-NN, over `--draws` draws, each image decoded once for the three feature sets.
3. A curve: 5-shot accuracy of the checkpoints nearest each `--curve-every` minutes of pre-training.

Writes OUT/report.md, OUT/report.json, OUT/<dataset>_accuracy.png (accuracy against labelled images per
class) and OUT/curve.png (5-shot accuracy against pre-training minutes). Trainer flags after `--` go to every
pre-training run (e.g. `-- --optim.lr 1e-3`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from msn_fast.dataloading import DataError

from .checkpoint import CheckpointError, find_checkpoint, list_checkpoints, load_meta
from .cli import UsageError
from .cpu_resources import usable_cores
from .study_report import bar_verdict, margins, markdown, plot_curve

log = logging.getLogger("msn_fast.study")

KNOWN = {"cifar10": "CIFAR-10", "caltech101": "Caltech-101"}
"""Datasets looked for under --data-root (folder name: label)."""


@dataclass(frozen=True)
class Dataset:
    name: str
    path: Path
    train_images: int = 0
    """size of its train split (read once, when the datasets are checked)"""

    @property
    def label(self) -> str:
        return KNOWN.get(self.name, self.name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m msn_fast.study", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-root", default="../shared/data", help="folder holding cifar10/ and caltech101/")
    p.add_argument("--dataset", action="append", default=[], metavar="NAME=DIR",
                   help="a dataset to study (repeatable); replaces the ones found under --data-root")
    p.add_argument("--out", default="runs/label_efficiency", help="study folder (runs, caches, report)")
    p.add_argument("--model", default="cpu_photos", help="pre-training recipe (python -m msn_fast.train --model)")
    p.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget of each pre-training run")
    p.add_argument("--jobs", type=int, default=1,
                   help="pre-training runs at once, the cores shared among them (0: all datasets at once)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between kept checkpoints")
    p.add_argument("--curve-every", type=float, default=10.0, help="minutes between the curve's points")
    p.add_argument("--draws", type=int, default=5, help="labelled draws per setting")
    p.add_argument("--knn-k", type=int, default=20, help="k of the k-NN classifier (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pre-training runs and of the draws")
    return p


def datasets(args) -> list[Dataset]:
    out = []
    if args.dataset:
        for spec in args.dataset:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise SystemExit(f"error: --dataset must be NAME=DIR; got {spec!r}")
            out.append(Dataset(name, Path(path)))
    else:
        out = [Dataset(n, Path(args.data_root) / n) for n in KNOWN if (Path(args.data_root) / n).is_dir()]
        if not out:
            raise SystemExit(f"error: no {' or '.join(KNOWN)} folder in --data-root {args.data_root}; "
                             "name datasets with --dataset NAME=DIR")
    from msn_fast.dataloading.sources import find_splits

    checked = []
    for ds in out:  # before an hour of pre-training: a train split and a held-out one, or a one-line error
        try:
            checked.append(Dataset(ds.name, ds.path, len(find_splits(ds.path).train)))
        except (DataError, OSError, ValueError) as e:
            raise SystemExit(f"error: --dataset {ds.name}={ds.path}: {e}") from None
    return checked


# --- pre-training ----------------------------------------------------------------------------------------


def finished(run: Path) -> bool:
    """Whether `run` holds a checkpoint at the end of its planned steps."""
    try:
        latest = find_checkpoint(run)
        meta = load_meta(latest) if latest is not None else None
    except CheckpointError:
        return False
    planned = (meta or {}).get("extra", {}).get("planned_steps")
    return meta is not None and planned is not None and meta["step"] >= planned


def train_command(args, ds: Dataset, run: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "msn_fast.train", "--model", args.model, "--data.path", str(ds.path),
            "--run.out_dir", str(run), "--run.time_budget", f"{args.minutes:g}", "--run.eval_lowshot", "false",
            "--run.checkpoint_every", str(args.checkpoint_every), "--run.keep_checkpoints", "100000",
            "--run.resume", "true", "--run.seed", str(args.seed), *extra]


def concurrency(runs: int, jobs: int, cores: int) -> tuple[int, int]:
    """(runs at once, torch threads of each) for `runs` pre-trainings with `--jobs` `jobs` (0: all at once) on
    `cores` cores: the cores are shared evenly, at least one thread each."""
    at_once = max(1, min(runs, jobs or runs))
    return at_once, max(1, cores // at_once)


def pretrain(args, sets: list[Dataset], out: Path, extra: list[str]) -> None:
    """Run the pre-trainings, `--jobs` at a time, each with its share of the cores; progress every 30 s at most."""
    todo = [ds for ds in sets if not finished(out / ds.name / "run")]
    for ds in sets:
        if ds not in todo:
            log.info("%s: pre-training already finished in %s; not run again", ds.name, out / ds.name / "run")
    jobs, threads = concurrency(len(todo), args.jobs, usable_cores())
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    running: dict[str, tuple[subprocess.Popen, Path]] = {}
    relay = ProgressRelay()
    failed = []
    try:
        while todo or running:
            while todo and len(running) < jobs:
                ds = todo.pop(0)
                run = out / ds.name / "run"
                run.mkdir(parents=True, exist_ok=True)
                cmd = train_command(args, ds, run, extra)
                log.info("%s: pre-training for %g min, %d thread(s): %s", ds.name, args.minutes, threads,
                         " ".join(cmd))
                with open(out / ds.name / "train.out", "a") as f:
                    # its own session: a Ctrl-C in the terminal reaches the study alone, which forwards one SIGINT
                    # (a second one would stop a trainer without saving)
                    running[ds.name] = (subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                                         start_new_session=True), run)
            time.sleep(min(30.0, max(1.0, args.minutes * 60 / 100)))
            for name, (proc, run) in list(running.items()):
                line = last_step_line(run / "train.log")
                if proc.poll() is None:
                    line = line or "starting"
                    if relay.due(name, line, time.monotonic()):
                        log.info("%s: %s", name, line)
                    continue
                del running[name]
                if proc.returncode != 0:
                    failed.append(name)
                    log.error("%s: the trainer exited with %d; see %s", name, proc.returncode,
                              out / name / "train.out")
                else:
                    log.info("%s: pre-training done (%s)", name, line)
    except BaseException:  # Ctrl-C, SIGTERM as an exception, a bug: the trainers save a checkpoint and stop
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)  # a second signal must not leave them running unwatched
        for proc, _ in running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc, _ in running.values():
            try:
                proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.warning("stopped; the same command continues the pre-training from its last checkpoint")
        raise
    if failed:
        raise SystemExit(f"error: pre-training failed for {', '.join(failed)}")


class ProgressRelay:
    """Which trainer progress lines to repeat: a new one, or the same one again after `quiet` seconds (the
    trainer is alive but has logged no step since). Short runs are polled every second; unchanged lines are
    not printed again each time."""

    def __init__(self, quiet: float = 30.0):
        self.quiet, self.shown = quiet, {}

    def due(self, name: str, line: str, now: float) -> bool:
        prev = self.shown.get(name)
        if prev is not None and prev[0] == line and now - prev[1] < self.quiet:
            return False
        self.shown[name] = (line, now)
        return True


def last_step_line(logfile: Path) -> str:
    try:
        lines = [ln for ln in logfile.read_text().splitlines() if " step " in ln]
    except OSError:
        return ""
    return lines[-1].split(" INFO ", 1)[-1] if lines else ""


# --- evaluation --------------------------------------------------------------------------------------------


def eval_args(ds: Dataset, out: Path, args, extra: list[str]):
    from .eval import build_parser as eval_parser

    return eval_parser().parse_args(["--data", str(ds.path), "--cache", str(out / "feature_cache"),
                                     "--draws", str(args.draws), "--seed", str(args.seed), *extra])


def evaluate(args, ds: Dataset, out: Path) -> list[dict]:
    """The trained target encoder's report, then random-init weights' and raw pixels' (msn_fast.eval --baselines)."""
    from .eval import evaluate_all

    run = out / ds.name / "run"
    t0 = time.perf_counter()
    reports = evaluate_all(eval_args(ds, out, args, [
        "--checkpoint", str(run), "--name", "MSN target encoder", "--baselines", "--shots", "1", "2", "5",
        "--fractions", "0.01" if ds.train_images >= 10_000 else "0.1", "--knn-k", str(args.knn_k)]))
    log.info("%s: evaluation of 3 feature sets took %.0f s", ds.name, time.perf_counter() - t0)
    for r in reports:
        r.pop("_results", None)
    return reports


def curve_points(run: Path, every: float) -> list[tuple[float | None, Path]]:
    """(minutes, step dir): the last checkpoint before each multiple of `every` minutes, and the final one (its
    minutes None when no checkpoint recorded them)."""
    checkpoints, steps = list_checkpoints(run), []
    for p in checkpoints:
        minutes = load_meta(p).get("extra", {}).get("train_minutes")
        if minutes is not None:
            steps.append((float(minutes), p))
    steps.sort()
    last_in_bucket: dict[int, tuple[float, Path]] = {}  # bucket k holds the minutes in [k·every, (k+1)·every)
    for m, p in steps:
        last_in_bucket[int(m // every)] = (m, p)
    chosen = [last_in_bucket[k] for k in sorted(last_in_bucket)]
    if checkpoints and (not chosen or chosen[-1][1] != checkpoints[-1]):  # the final one, minutes known or not
        chosen.append((steps[-1][0] if steps else None, checkpoints[-1]))
    return chosen


def curve(args, ds: Dataset, out: Path, random_init: dict) -> list[dict]:
    """5-shot accuracy against pre-training minutes; minute 0 is the random-init encoder."""
    from .eval import evaluate

    r0 = random_init["results"]["5-shot"]
    pts = [{"minutes": 0.0, "step": 0, "mean": r0["mean"], "std": r0["std"], "class_mean": r0["class_mean"]}]
    for minutes, step_dir in curve_points(out / ds.name / "run", args.curve_every):
        rep = evaluate(eval_args(ds, out, args, ["--checkpoint", str(step_dir), "--shots", "5", "--fractions",
                                                 "--knn-k", "0"]))
        r = rep["results"]["5-shot"]
        pts.append({"minutes": None if minutes is None else round(minutes, 2),
                    "step": load_meta(step_dir)["step"], "mean": r["mean"],
                    "std": r["std"], "class_mean": r["class_mean"]})
        log.info("%s: curve %s min (step %d): 5-shot %.1f%%", ds.name, pts[-1]["minutes"], pts[-1]["step"],
                 100 * r["mean"])
    return pts


# --- the report (markdown, margins, bar, curve plot: msn_fast.study_report) ----------------------------------


def pretrain_summary(run: Path, train_images: int) -> dict:
    meta = load_meta(find_checkpoint(run))
    batch, n = json.loads((run / "config.json").read_text())["data"]["batch_size"], train_images
    return {"steps": meta["step"], "batch_size": batch, "train_images": n, "epochs": meta["step"] * batch / n,
            "train_minutes": meta.get("extra", {}).get("train_minutes")}  # None: written before it was saved


def machine() -> str:
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = build_parser().parse_args(own)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.minutes <= 0 or args.checkpoint_every < 1 or args.curve_every <= 0 or args.draws < 1 or args.jobs < 0:
        raise SystemExit("error: --minutes, --checkpoint-every, --curve-every and --draws must be > 0, --jobs >= 0")
    sets = datasets(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, _interrupt)  # the trainers get a SIGINT and save (see pretrain)
    try:
        pretrain(args, sets, out, extra)
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    jobs = concurrency(len(sets), args.jobs, usable_cores())[0]
    report = {"date": datetime.date.today().isoformat(), "machine": machine(), "cores": usable_cores(),
              "command": "python -m msn_fast.study " + " ".join(argv), "model": args.model,
              "minutes": args.minutes, "jobs": jobs, "draws": args.draws, "datasets": {}}
    for ds in sets:
        t = time.perf_counter()
        try:
            reports = evaluate(args, ds, out)
        except (CheckpointError, DataError, UsageError) as e:  # the eval CLI's one-line errors (bad data, checkpoint)
            raise SystemExit(f"error: evaluating {ds.name}: {e}") from None
        eval_s = time.perf_counter() - t
        gaps = margins(reports)
        report["datasets"][ds.name] = {
            "label": ds.label, "path": str(ds.path),
            "pretrain": pretrain_summary(out / ds.name / "run", ds.train_images),
            "reports": reports, "eval_seconds": round(eval_s, 1), "margins": gaps,
            "bar": bar_verdict(ds.name, gaps), "curve": curve(args, ds, out, reports[1])}
        try:
            from .evaluation import plot_results

            plot_results(reports, out / f"{ds.name}_accuracy.png")
        except ImportError:
            log.warning("matplotlib is not installed: no plots (pip install -e '.[dev]')")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    try:
        plot_curve(report, out / "curve.png")
    except ImportError:
        pass
    print(markdown(report))
    log.info("study done in %.1f min: %s", (time.perf_counter() - t0) / 60, out / "report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
