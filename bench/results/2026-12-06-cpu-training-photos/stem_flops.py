"""FLOPs of `cpu_photos`' conv stem against the ViT blocks' closed-form count, per image of a training step.

    cd /tmp && python /work/main/bench/results/2026-12-06-cpu-training-photos/stem_flops.py   # stem_flops.log
The stem's forward is counted by torch's FlopCounterMode on one 32 px (global) and one 16 px (focal) view. A step
runs it forward on the target's view and forward and backward (3x, as msn_fast.flops counts the blocks) on the
masked anchor's view and the 4 focal views.
"""

import torch
from torch.utils.flop_counter import FlopCounterMode

from msn_fast.flops import step_flops_per_image
from msn_fast.recipes import get_recipe
from msn_fast.vit import ConvStem

cfg = get_recipe("cpu_photos")
stem = ConvStem(3, cfg.vit.dim, cfg.vit.patch_size)
fwd = {}
for size in (cfg.data.global_size, cfg.data.focal_size):
    with FlopCounterMode(display=False) as fc:
        stem(torch.randn(1, 3, size, size))
    fwd[size] = fc.get_total_flops()
per_image = fwd[cfg.data.global_size] * (1 + 3) + 3 * cfg.data.num_focal * fwd[cfg.data.focal_size]
blocks = step_flops_per_image(cfg)
print(f"stem forward: {fwd} FLOPs by view size")
print(f"stem per image of a step: {per_image / 1e6:.1f} MFLOP; blocks: {blocks / 1e6:.1f} MFLOP; "
      f"stem / blocks {per_image / blocks:.3f}")
