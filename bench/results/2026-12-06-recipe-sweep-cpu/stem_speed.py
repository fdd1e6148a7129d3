"""In-process step time of cpu_photos with the linear patch projection and with the conv stem (vit.stem conv): one
model each, random inputs at batch 32, both threads, 3 warm-up steps, then 4 rounds of 10 timed train_steps.
Run from outside the repository root: `cd /tmp && python /work/main/bench/results/2026-12-06-recipe-sweep-cpu/
stem_speed.py`. Printed on 2026-12-06 (AMD EPYC, AVX2, 2 cores; the first line of each pair is the step's loss
terms): linear median 134.2 ms, conv median 143.6 ms. With cpu_photos taking the conv stem since commit f0209be,
both arms still run as named (the script sets cfg.vit.stem).
"""

import statistics
import time
from types import SimpleNamespace

import torch

from msn_fast.build import build_model, build_optimizer
from msn_fast.distributed import DistInfo
from msn_fast.recipes import get_recipe
from msn_fast.train import fitted_schedules, train_step


def main() -> None:
    batch = SimpleNamespace(globals=torch.randn(2, 32, 3, 32, 32), focals=torch.randn(4, 32, 3, 16, 16))
    cpu, runs = torch.device("cpu"), {}
    for stem in ["linear", "conv"]:
        torch.manual_seed(0)
        cfg = get_recipe("cpu_photos")
        cfg.vit.stem = stem
        model = build_model(cfg, cpu, DistInfo())
        opt = build_optimizer(cfg, model, cpu)
        sched = fitted_schedules(cfg, 10000, 1000, warn=False)
        for i in range(3):
            r = train_step(model, batch, opt, sched, i, cfg)
        print(stem, r.terms, sum(p.numel() for p in model.student.parameters()))
        runs[stem] = (cfg, model, opt, sched)
    res = {k: [] for k in runs}
    for _ in range(4):
        for name, (cfg, model, opt, sched) in runs.items():
            t = time.perf_counter()
            for i in range(10):
                train_step(model, batch, opt, sched, i, cfg)
            res[name].append((time.perf_counter() - t) / 10 * 1e3)
    for k, v in res.items():
        print(k, f"median {statistics.median(v):.1f} ms")


if __name__ == "__main__":
    main()
