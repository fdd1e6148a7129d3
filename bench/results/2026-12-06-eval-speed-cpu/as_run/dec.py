# ruff: noqa  (kept as run on 2026-12-06, paths written in; see ../README.md)
import time, torch
from msn_fast.dataloading import eval_transform
from msn_fast.dataloading.sources import find_splits
from msn_fast.features import extract_features, raw_pixels
import logging
sp = find_splits("/work/shared/data/cifar10", None, "auto")
src = sp.held_out
tf = eval_transform(32)
print(tf)
for rep in range(2):
    for w in (1, 2, 0):
        t = time.perf_counter(); extract_features(raw_pixels, src, tf, 256, num_workers=w); print(rep, w, "%.1f s" % (time.perf_counter() - t), flush=True)
t=time.perf_counter()
for i in range(2000): img, l = src[i]
t1=time.perf_counter()
for i in range(2000): tf(img)
t2=time.perf_counter(); print("read %.3f ms, tf %.3f ms" % ((t1-t)/2, (t2-t1)/2))
