"""Where a `cpu_photos` training step spends its time on a CPU, and what compiling the ViT blocks buys.

Run from outside the repository root, alone on the machine:
    cd /tmp && python /work/main/bench/results/2026-12-06-cpu-training-photos/profile_step.py   # profile_step.log
Random inputs at batch 32 (2 global views of 32 px, 4 focal views of 16 px), both threads, the product's
`train_step`. It does three things:
1. Times 3 warm-up steps, then 4 rounds of 10 steps, eager.
2. Profiles 10 eager steps with torch.profiler, then groups the self CPU time into matmuls, attention, the
   stem's convolutions, batch norm and the rest.
3. Builds the same model with `--dist.compile true`, which runs torch.compile on each block. It reports the time
   of the first 3 steps, which includes the compile, and then 4 rounds of 10 steps, alternating with eager.
"""

import statistics
import time
from types import SimpleNamespace

import torch
from torch.profiler import ProfilerActivity, profile

from msn_fast.build import build_model, build_optimizer
from msn_fast.distributed import DistInfo
from msn_fast.recipes import get_recipe
from msn_fast.step import train_step
from msn_fast.train import fitted_schedules

GROUPS = {
    "matmuls (mm, addmm)": ("aten::mm", "aten::addmm"),
    "attention (SDPA forward and backward)": ("aten::_scaled_dot_product",),
    "the stem's convolutions (forward and backward)": ("aten::mkldnn_convolution", "aten::convolution_backward"),
    "batch norm (the stem's and the head's, forward and backward)": ("aten::native_batch_norm",),
}


def build(compiled: bool):
    torch.manual_seed(0)
    cfg = get_recipe("cpu_photos")
    cfg.dist.compile = compiled
    model = build_model(cfg, torch.device("cpu"), DistInfo())
    return cfg, model, build_optimizer(cfg, model, torch.device("cpu")), fitted_schedules(cfg, 10000, 1000, False)


def steps(arm, batch, n: int) -> float:
    cfg, model, opt, sched = arm
    t = time.perf_counter()
    for i in range(n):
        train_step(model, batch, opt, sched, i, cfg)
    return (time.perf_counter() - t) / n * 1e3


def main() -> None:
    batch = SimpleNamespace(globals=torch.randn(2, 32, 3, 32, 32), focals=torch.randn(4, 32, 3, 16, 16))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    eager = build(False)
    print(f"eager: first 3 steps {steps(eager, batch, 3):.1f} ms a step")
    print("eager rounds (ms a step):", " ".join(f"{steps(eager, batch, 10):.1f}" for _ in range(4)))

    with profile(activities=[ProfilerActivity.CPU]) as p:
        steps(eager, batch, 10)
    events = p.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    shares = {g: sum(e.self_cpu_time_total for e in events if e.key.startswith(prefixes)) / total
              for g, prefixes in GROUPS.items()}
    shares["everything else"] = 1 - sum(shares.values())
    print(f"profile of 10 eager steps: {total / 1e3 / 10:.1f} ms a step of self CPU time")
    for g, s in shares.items():
        print(f"  {g}: {100 * s:.1f}%")
    print(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=45))

    compiled = build(True)
    t = time.perf_counter()
    steps(compiled, batch, 3)
    print(f"compiled: first 3 steps (compile included) {time.perf_counter() - t:.1f} s")
    res = {"eager": [], "compiled": []}
    for _ in range(4):
        res["eager"].append(steps(eager, batch, 10))
        res["compiled"].append(steps(compiled, batch, 10))
    for k, v in res.items():
        print(f"{k}: rounds {' '.join(f'{x:.1f}' for x in v)} ms, median {statistics.median(v):.1f} ms a step")
    print(f"compiled / eager: {statistics.median(res['compiled']) / statistics.median(res['eager']):.3f}")


if __name__ == "__main__":
    main()
