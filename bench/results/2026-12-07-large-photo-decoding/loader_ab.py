"""Loader A/B: ms a batch of the `cpu_photos` batched loader (main process, 2 threads), for the arm on PYTHONPATH.

    PYTHONPATH=/tmp/wt_before python loader_ab.py 3; python loader_ab.py 3   # alternate, run from outside the repo
Prints the msn_fast it imported and, per data set, the median over N epochs of the first 15 batches' mean.
"""

import statistics
import sys
import time

import torch

import msn_fast
from msn_fast.dataloading import ImageFolder, build_loader
from msn_fast.dataloading.sources import load_splits
from msn_fast.recipes import get_recipe

torch.set_num_threads(2)
d = get_recipe("cpu_photos").data
sets = {"cifar10": load_splits("/work/shared/data/cifar10")[0],
        "caltech101": load_splits("/work/shared/data/caltech101")[0],
        "caltech_640px": ImageFolder("/tmp/big640/train")}


def ms_a_batch(src, epoch: int, batches: int = 15) -> float:
    loader = build_loader(src, d, d.batch_size, num_workers=0, augment="batched", seed=0)
    loader.set_position(epoch)
    it = iter(loader)
    next(it)  # the first batch pays for the iterator's start
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return (time.perf_counter() - t) / batches * 1e3


res = {k: [ms_a_batch(s, e) for e in range(int(sys.argv[1]))] for k, s in sets.items()}
print(msn_fast.__file__, {k: round(statistics.median(v), 1) for k, v in res.items()})
