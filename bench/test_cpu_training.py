"""Benchmark: the CPU recipe's training throughput with the per-image and the batched augmentation, against a GEMM
ceiling measured in the same run.

The real trainer (`python -m msn_fast.train --model MSN_BENCH_MODEL`, default `cpu_photos`: the recipe of the
label-efficiency study, 32 px views, conv stem; `cpu_demo` for its linear patch projection) runs in a subprocess
on CIFAR-10's train split (../shared/data/cifar10; generated 32 px JPEGs when absent) for MSN_BENCH_STEPS steps
(default 60; `--run.time_budget 0`, so the steps are the run), no checkpoint, no evaluation, in three settings,
MSN_BENCH_ROUNDS rounds (default 2) interleaved (A B C, C B A, ...; each round's images/s is printed too, the VM's
speed drifts), each with the trainer's own thread choice:
- per_image: `--data.augment per_image --data.num_workers 1` (torchvision on each image in one loader worker;
  training gets 1 thread, the other core is left to the worker) - the behaviour before batched augmentation;
- batched_worker: `--data.augment batched --data.num_workers 1` (one worker decodes and makes the batch's views;
  training gets both cores, so the worker takes its cycles from the GEMM threads);
- batched: `--data.augment batched --data.num_workers 0`, the recipe's default (decoding and the batch's views in
  the training process, between steps, with both cores).
Images/s is the median of the trainer's own log lines after the first (its `img_per_s`, metrics.jsonl). GFLOP/s =
images/s x the step's FLOPs per image (msn_fast.flops.step_flops_per_image: target forward + student forward and
backward; patch embedding or conv stem, head and loss left out, so the fractions below understate the step: for
`cpu_photos` the conv stem adds about 27 MFLOP an image to the blocks' 369, 7%; torch's FlopCounterMode,
bench/results/2026-12-06-cpu-training-photos/stem_flops.py), against
the fp32 GEMM ceiling: the median GFLOP/s of a 1024 x 1024 x 1024 `torch.mm` on every core, timed between the
training rounds; and against a second ceiling at the step's own sizes: the GFLOP/s of the ViT blocks' linear-layer
GEMMs (msn_fast.flops.linear_gemms; D = 128 and 32 x 65 rows, say), each timed alone on every core and weighted by
its count in the step. The first says how much of the machine the step uses; the second how much of what GEMMs this
small can reach in this BLAS.
Run: pytest bench/test_cpu_training.py --benchmark-only -s
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
STEPS = int(os.environ.get("MSN_BENCH_STEPS", "60"))
ROUNDS = int(os.environ.get("MSN_BENCH_ROUNDS", "2"))
MODEL = os.environ.get("MSN_BENCH_MODEL", "cpu_photos")
SETTINGS = {"per_image": ("per_image", 1), "batched_worker": ("batched", 1), "batched": ("batched", 0)}


def _data(tmp_path_factory) -> tuple[Path, str]:
    if (CIFAR / "train").is_dir():
        return CIFAR / "train", "cifar10 train (50,000 JPEGs, 32 px)"
    root, rng = tmp_path_factory.mktemp("cifar_like"), np.random.default_rng(0)
    for i in range(4000):
        (root / f"c{i % 10}").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"c{i % 10}" / f"{i}.jpg")
    return root, "generated 32 px JPEGs (../shared/data/cifar10 absent)"


def _train(data: Path, out: Path, augment: str, workers: int) -> float:
    """Median images/s of the trainer's log lines after the first, for one run."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    cmd = [sys.executable, "-m", "msn_fast.train", "--model", MODEL, "--data.path", str(data), "--data.augment",
           augment, "--data.num_workers", str(workers), "--run.max_steps", str(STEPS), "--run.log_every", "10",
           "--run.checkpoint_every", "100000", "--run.eval_lowshot", "false", "--run.time_budget", "0",
           "--run.out_dir", str(out)]
    env["MSN_FAST_PROGRESS"] = "0"
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    rates = [json.loads(line)["img_per_s"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(rates[1:])


def _step_gemm_gflops(shapes: list[tuple[int, int, int]], reps: int = 5) -> float:
    """GFLOP/s of the step's own linear-layer GEMMs (msn_fast.flops.linear_gemms), each timed alone (median of
    `reps`) and weighted by how often the step runs it: the ceiling a step of these sizes meets in this BLAS."""
    flops = seconds = 0.0
    for (m, k, n), count in Counter(shapes).items():
        # x @ Wᵀ, as nn.Linear (the backward's layouts differ)
        flops += count * 2 * m * k * n
        seconds += count * _mm_seconds(torch.randn(m, k), torch.randn(n, k).t(), reps)
    return flops / seconds / 1e9


def _mm_seconds(a: torch.Tensor, b: torch.Tensor, reps: int) -> float:
    """Median seconds of torch.mm(a, b) over `reps` runs, after one warm-up."""
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _gemm_gflops(n: int = 1024, reps: int = 5) -> float:
    return 2 * n**3 / _mm_seconds(torch.randn(n, n), torch.randn(n, n), reps) / 1e9


@pytest.mark.benchmark(group="cpu-training")
def test_cpu_recipe_training_throughput(benchmark, bench_report, tmp_path, tmp_path_factory):
    from msn_fast.flops import linear_gemms, step_flops_per_image
    from msn_fast.recipes import get_recipe

    if torch.cuda.is_available():
        pytest.skip("a CPU benchmark (the recipe for a 2-core CPU)")
    data, what = _data(tmp_path_factory)
    rates: dict[str, list[float]] = {k: [] for k in SETTINGS}
    cfg = get_recipe(MODEL)
    gemm, step_gemm = [], []
    order = list(SETTINGS)
    for r in range(ROUNDS):
        for name in (order if r % 2 == 0 else order[::-1]):
            rates[name].append(_train(data, tmp_path / f"{name}_{r}", *SETTINGS[name]))
        gemm.append(_gemm_gflops())
        step_gemm.append(_step_gemm_gflops(linear_gemms(cfg, cfg.data.batch_size)))
    benchmark.pedantic(_gemm_gflops, rounds=1, warmup_rounds=0, iterations=1)
    flops = step_flops_per_image(cfg)
    ceiling, step_ceiling = statistics.median(gemm), statistics.median(step_gemm)
    base = statistics.median(rates["per_image"])
    info = {"model": MODEL, "data": what, "steps": STEPS, "threads": torch.get_num_threads(),
            "gemm_gflops": round(ceiling, 1), "step_gemm_gflops": round(step_ceiling, 1)}
    for name, rs in rates.items():
        ips = statistics.median(rs)
        info[f"{name}_img_s"] = round(ips, 1)
        info[f"{name}_rounds"] = " ".join(f"{x:.0f}" for x in rs)
        info[f"{name}_over_per_image"] = round(ips / base, 2)
        info[f"{name}_gflops_of_gemm"] = round(ips * flops / 1e9 / ceiling, 2)
        info[f"{name}_gflops_of_step_gemm"] = round(ips * flops / 1e9 / step_ceiling, 2)
    benchmark.extra_info.update(info)
    bench_report.add_row("CPU recipe training: per-image vs batched augmentation", info)
