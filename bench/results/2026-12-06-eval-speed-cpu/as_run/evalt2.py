# ruff: noqa  (kept as run on 2026-12-06, paths written in; see ../README.md)
import sys, time, logging, cProfile, pstats, shutil
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
from msn_fast.eval import build_parser, evaluate_all
cache = Path(sys.argv[1]); shutil.rmtree(cache, ignore_errors=True)
args = build_parser().parse_args(["--data", "/work/shared/data/cifar10" if Path("/work/shared/data/cifar10").exists() else "../shared/data/cifar10",
    "--cache", str(cache), "--draws", "5", "--seed", "0", "--checkpoint", "/tmp/le_d/cifar10/run",
    "--name", "MSN target encoder", "--baselines", "--shots", "1", "2", "5", "--fractions", "0.01", "--knn-k", "20", "--no-progress"])
t0 = time.perf_counter()

reps = evaluate_all(args)

print("TOTAL", time.perf_counter() - t0)
for r in reps: print(r["features"], r["seconds"])

