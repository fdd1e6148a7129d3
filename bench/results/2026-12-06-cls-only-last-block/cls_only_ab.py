"""In-process A/B of the ViT's CLS-only last block (vit.Block cls_only): `trunk(x)` computing the last block's
CLS row alone (new) against the full last block, every token through its attention, MLP and the final
LayerNorm, then CLS taken (old, `forward_features(x)[:, 0]`). One cpu_demo model (the cpu_photos ViT: D 128,
depth 4, MLP ratio 2, 65 / 45 / 17 tokens in the target / masked anchor / focal views) at batch 32 on both
threads, random inputs, 8 interleaved rounds of 3 warm-up + 10 timed train_steps. Run from outside the
repository root (so that the installed msn_fast.dataloading resolves):

    cd /tmp && python /work/main/bench/results/2026-12-06-cls-only-last-block/cls_only_ab.py
"""

import statistics
import time
from types import SimpleNamespace

import torch

from msn_fast import vit
from msn_fast.build import build_model, build_optimizer
from msn_fast.distributed import DistInfo
from msn_fast.recipes import get_recipe
from msn_fast.train import fitted_schedules, train_step


def old_forward(self, x, keep_idx=None):
    return self.forward_features(x, keep_idx)[:, 0]


def main() -> None:
    new_forward = vit.VisionTransformer.forward
    torch.manual_seed(0)
    cfg, dev = get_recipe("cpu_demo"), torch.device("cpu")
    model = build_model(cfg, dev, DistInfo())
    opt = build_optimizer(cfg, model, dev)
    sched = fitted_schedules(cfg, 10000, 1000, warn=False)
    batch = SimpleNamespace(globals=torch.randn(2, 32, 3, 32, 32), focals=torch.randn(4, 32, 3, 16, 16))
    res = {"old": [], "new": []}
    order = [("old", old_forward), ("new", new_forward)]
    for r in range(8):
        for name, forward in order if r % 2 == 0 else order[::-1]:
            vit.VisionTransformer.forward = forward
            for i in range(3):
                train_step(model, batch, opt, sched, i, cfg)
            t = time.perf_counter()
            for i in range(10):
                train_step(model, batch, opt, sched, i, cfg)
            res[name].append((time.perf_counter() - t) / 10 * 1e3)
    for k, v in res.items():
        print(k, f"median {statistics.median(v):.1f} ms", [round(x) for x in v])
    print("new/old", statistics.median(res["new"]) / statistics.median(res["old"]))


if __name__ == "__main__":
    main()
