"""The in-process batched loader of `cpu_photos` (batch 32, 2 threads) over two epochs of DATASET's train split,
without (cache_mb 0) and with (1024) the decoded-image cache; ms a batch per epoch, at most LIMIT batches each.
Run: cd /tmp && python loader_cache.py /work/shared/data/caltech101 100000"""

import sys
import time

import torch

from msn_fast.dataloading.loader import build_loader
from msn_fast.dataloading.sources import find_splits
from msn_fast.recipes import RECIPES

torch.set_num_threads(2)
root, limit = sys.argv[1], int(sys.argv[2])
src = find_splits(root).train
cfg = RECIPES["cpu_photos"]().data
for cache_mb in (0, 1024):
    ld = build_loader(src, cfg, 32, num_workers=0, augment="batched", cache_mb=cache_mb)
    for epoch in range(2):
        ld.set_position(epoch)
        t0, n = time.perf_counter(), 0
        for _ in ld:
            n += 1
            if n == limit:
                break
        dt = (time.perf_counter() - t0) / n * 1e3
        c = ld.dataset.cache
        held = f" (cache {len(c.items)} images, {c.bytes / 2**20:.0f} MB)" if c else ""
        print(f"cache_mb {cache_mb} epoch {epoch}: {dt:.1f} ms a batch{held}")
