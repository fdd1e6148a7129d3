"""Would threads speed up the batched loader in the training process? Three measurements, alone on the machine:

    cd /tmp && python /work/main/bench/results/2026-12-07-loader-threads/loader_threads.py > loader_threads.log

1. Decoding a batch's 32 images (MultiViewDataset decode-only items: decode, fit to a 64 px short side, to a tensor)
   one by one against `ThreadPoolExecutor(2).map`, Caltech-101 and CIFAR-10 train splits, 30 batches alternating
   (files read once before, so both arms read from the page cache); median of the last 26.
2. Where the batched views' time goes on Caltech-101 (`BatchedCollate` of 20 decoded batches, torch.profiler).
3. `torchvision.ops.roi_align` as `batched_views` calls it (aligned, adaptive sampling) on a synthetic batch of 32
   images 64 x 120 with 2 global (32 px, area 0.5-1) and 4 focal (16 px, area 0.25-0.6) boxes each: one call per
   view size against the boxes split in two halves on 2 threads (outputs compared for equality first).
"""

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile
from torchvision.ops import roi_align

from msn_fast.dataloading.loader import BatchedCollate, MultiViewDataset
from msn_fast.dataloading.sources import find_splits
from msn_fast.recipes import get_recipe

DATA = {"caltech101": "/work/shared/data/caltech101", "cifar10": "/work/shared/data/cifar10"}
CFG = get_recipe("cpu_photos")


def decode_threads(name: str, pool: ThreadPoolExecutor) -> None:
    src = find_splits(DATA[name], None, "auto").train
    for path, _ in src.samples:
        with open(path, "rb") as f:
            f.read()
    ds = MultiViewDataset(src, CFG.data, 0, decode_only=True)
    rng = np.random.default_rng(0)
    res = {"one by one": [], "2 threads": []}
    for r in range(30):
        idx = [int(i) for i in rng.integers(0, len(src), 32)]
        for k in (("one by one", "2 threads") if r % 2 else ("2 threads", "one by one")):
            t0 = time.perf_counter()
            _ = [ds[i] for i in idx] if k == "one by one" else list(pool.map(ds.__getitem__, idx))
            res[k].append(time.perf_counter() - t0)
    print(f"1. {name}: decoding 32 images, " + ", ".join(f"{k} {1e3 * statistics.median(v[4:]):.1f} ms"
                                                          for k, v in res.items()), flush=True)


def views_profile() -> None:
    src = find_splits(DATA["caltech101"], None, "auto").train
    ds, col = MultiViewDataset(src, CFG.data, 0, decode_only=True), BatchedCollate(CFG.data, 0)
    rng = np.random.default_rng(0)
    batches = [[ds[int(i)] for i in rng.integers(0, len(src), 32)] for _ in range(20)]
    for b in batches[:3]:
        col(b)
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for b in batches:
            col(b)
    events = p.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 20 / 1e3
    roi = sum(e.self_cpu_time_total for e in events if e.key == "torchvision::roi_align") / 20 / 1e3
    print(f"2. caltech101: batched views {total:.1f} ms a batch of self CPU time, roi_align {roi:.1f} ms", flush=True)


def boxes(k: int, lo: float, hi: float) -> torch.Tensor:
    idx = torch.arange(32).repeat(k).float()
    side = torch.empty(32 * k).uniform_(lo, hi).sqrt() * 64
    x0, y0 = torch.rand(32 * k) * (120 - side), torch.rand(32 * k) * (64 - side)
    return torch.stack([idx, x0, y0, x0 + side, y0 + side], 1)


def roi_threads(pool: ThreadPoolExecutor) -> None:
    torch.manual_seed(0)
    x, g, f = torch.rand(32, 3, 64, 120), boxes(2, 0.5, 1.0), boxes(4, 0.25, 0.6)

    def one_call():
        return roi_align(x, g, (32, 32), 1.0, -1, True), roi_align(x, f, (16, 16), 1.0, -1, True)

    def split():
        halves = ((g[:32], 32), (g[32:], 32), (f[:64], 16), (f[64:], 16))
        out = [j.result() for j in [pool.submit(roi_align, x, r, (s, s), 1.0, -1, True) for r, s in halves]]
        return torch.cat(out[:2]), torch.cat(out[2:])

    assert all(torch.equal(a, b) for a, b in zip(one_call(), split()))
    res = {"one call per size": [], "split on 2 threads": []}
    for r in range(10):
        for k, fn in ((("one call per size", one_call), ("split on 2 threads", split))[:: 1 if r % 2 else -1]):
            ts = []
            for _ in range(10):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            res[k].append(statistics.median(ts))
    print("3. roi_align (outputs equal): " + ", ".join(f"{k} {1e3 * statistics.median(v):.2f} ms"
                                                     for k, v in res.items()), flush=True)


def main() -> None:
    torch.set_num_threads(2)
    pool = ThreadPoolExecutor(2)
    decode_threads("caltech101", pool)
    decode_threads("cifar10", pool)
    views_profile()
    roi_threads(pool)


if __name__ == "__main__":
    main()
