import sys, time, torch
from msn_fast.dataloading.loader import build_loader
from msn_fast.dataloading.sources import find_splits
from msn_fast.recipes import RECIPES
torch.set_num_threads(2)
root = sys.argv[1]; LIMIT = int(sys.argv[2])
src = find_splits(root).train
cfg = RECIPES["cpu_photos"]().data
for cache_mb in (0, 1024):
    ld = build_loader(src, cfg, 32, num_workers=0, augment="batched", cache_mb=cache_mb)
    for epoch in range(2):
        ld.set_position(epoch)
        t0 = time.perf_counter(); n = 0
        for b in ld:
            n += 1
            if n == LIMIT: break
        dt = (time.perf_counter() - t0) / n * 1e3
        c = ld.dataset.cache
        print(f"cache_mb {cache_mb} epoch {epoch}: {dt:.1f} ms a batch" + (f" (cache {len(c.items)} images, {c.bytes/2**20:.0f} MB)" if c else ""))
