"""The product's `cpu_photos` training step with attention "auto" (the eager form for the anchor's 45 and the focal
views' 17 keys, SDPA for the target's 65) against "torch" (SDPA everywhere), in alternating rounds.

    cd /tmp && python /work/main/bench/results/2026-12-07-cpu-short-attention/step_ab.py 2 >> step_ab.log
    cd /tmp && python /work/main/bench/results/2026-12-07-cpu-short-attention/step_ab.py 1 >> step_ab.log

Random inputs at batch 32 (2 global views of 32 px, 4 focal views of 16 px), as profile_step.py of
../2026-12-06-cpu-training-photos/; the argument is the thread count. 16 rounds of 5 steps of each arm; the median
of the per-round ratios.
"""

import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "2026-12-06-cpu-training-photos"))
from profile_step import build as build_model_arm  # noqa: E402  (the profile's model, optimizer and schedules)
from profile_step import steps  # noqa: E402

from msn_fast.vit import Attention  # noqa: E402


def build(impl: str):
    """profile_step.build's arm (seed 0, `cpu_photos`) with attention backend `impl`."""
    cfg, model, opt, sched = build_model_arm(False)
    for m in model.modules():
        if isinstance(m, Attention):
            m.impl = impl
    return cfg, model, opt, sched


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]))
    batch = SimpleNamespace(globals=torch.randn(2, 32, 3, 32, 32), focals=torch.randn(4, 32, 3, 16, 16))
    names = ["torch", "auto"]
    arms = {k: build(k) for k in names}
    for a in arms.values():
        steps(a, batch, 3)
    res = {k: [] for k in names}
    for r in range(16):
        for k in (names if r % 2 == 0 else names[::-1]):
            res[k].append(steps(arms[k], batch, 5))
    ratio = statistics.median(b / a for a, b in zip(res["torch"], res["auto"]))
    print(f"{torch.get_num_threads()} thread(s): ms a step, median of 16 rounds: torch (SDPA) "
          f"{statistics.median(res['torch']):.1f}, auto {statistics.median(res['auto']):.1f}; "
          f"auto / torch per round, median {ratio:.3f}")


if __name__ == "__main__":
    main()
