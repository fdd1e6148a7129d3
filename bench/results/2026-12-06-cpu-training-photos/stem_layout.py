"""Does a channels-last conv stem speed up the `cpu_photos` training step on a CPU? (tenth session, 2026-12-07)

Run from outside the repository root, alone on the machine:
    cd /tmp && ROUNDS=8 python /work/main/bench/results/2026-12-06-cpu-training-photos/stem_layout.py  # stem_layout.log
Three models built alike (seed 0), random inputs at batch 32 (2 global views of 32 px, 4 focal views of 16 px), both
threads, the product's `train_step`: "base" as built; "cl_input" feeds the conv stem a channels-last copy of its
input; "cl_all" also stores the stem's weights channels-last. 3 warm-up steps each, then ROUNDS rounds of 10 steps,
the three arms alternating within each round; ms a step, median over the rounds.
"""

import os
import statistics
from types import SimpleNamespace

import torch
from profile_step import build as build_eager  # this folder's profile script (the script's folder is on sys.path)
from profile_step import steps

from msn_fast.vit import ConvStem


def build(layout: str):
    """profile_step's eager model, its conv stem then fed (and with "cl_all" stored) channels-last."""
    cfg, model, opt, sched = build_eager(False)
    for m in model.modules():
        if isinstance(m, ConvStem) and layout != "base":
            if layout == "cl_all":
                m.to(memory_format=torch.channels_last)  # swaps each parameter's data: the optimizer keeps them
            plain = m.forward
            m.forward = lambda x, plain=plain: plain(x.contiguous(memory_format=torch.channels_last))
    return cfg, model, opt, sched


def main() -> None:
    batch = SimpleNamespace(globals=torch.randn(2, 32, 3, 32, 32), focals=torch.randn(4, 32, 3, 16, 16))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    arms = {name: build(name) for name in ("base", "cl_input", "cl_all")}
    for arm in arms.values():
        steps(arm, batch, 3)
    res = {name: [] for name in arms}
    for _ in range(int(os.environ.get("ROUNDS", 8))):
        for name, arm in arms.items():
            res[name].append(steps(arm, batch, 10))
    base = statistics.median(res["base"])
    for name, v in res.items():
        med = statistics.median(v)
        print(f"{name:9s} rounds {' '.join(f'{x:6.1f}' for x in v)}  median {med:.1f} ms  / base {med / base:.3f}")


if __name__ == "__main__":
    main()
