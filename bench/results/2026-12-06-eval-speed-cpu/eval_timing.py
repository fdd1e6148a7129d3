"""Time the study's CIFAR-10 evaluation (msn_fast.eval --baselines, as msn_fast.study runs it) from an empty cache.

python eval_timing.py CHECKPOINT DATA CACHE_DIR   (CACHE_DIR is deleted first; prints TOTAL seconds)
"""
import logging
import shutil
import sys
import time
from pathlib import Path

from msn_fast.eval import build_parser, evaluate_all

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
checkpoint, data, cache = sys.argv[1], sys.argv[2], Path(sys.argv[3])
shutil.rmtree(cache, ignore_errors=True)
args = build_parser().parse_args(["--data", data, "--cache", str(cache), "--draws", "5", "--seed", "0",
                                  "--checkpoint", checkpoint, "--name", "MSN target encoder", "--baselines",
                                  "--shots", "1", "2", "5", "--fractions", "0.01", "--knn-k", "20", "--no-progress"])
t0 = time.perf_counter()
reports = evaluate_all(args)
print("TOTAL", time.perf_counter() - t0)
for r in reports:
    print(r["features"], r["seconds"])
