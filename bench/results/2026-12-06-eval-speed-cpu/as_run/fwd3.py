# ruff: noqa  (kept as run on 2026-12-06, paths written in; see ../README.md)
import time, torch, statistics as st
from msn_fast.recipes import get_recipe
from msn_fast.model import MSN
torch.manual_seed(0)
cfg = get_recipe("cpu_photos")
trunk = MSN(cfg).target.trunk.eval()
X = torch.randn(512, 3, 32, 32)
def run(bs):
    for s in range(0, len(X), bs): trunk.extract_features(X[s:s+bs])
res = {}
with torch.inference_mode():
    for rep in range(12):
        for bs in (32, 64, 128, 256, 512):
            t=time.perf_counter(); run(bs); res.setdefault(bs, []).append(1000*(time.perf_counter()-t)/len(X))
for bs, v in res.items(): print(bs, "median %.3f min %.3f" % (st.median(v), min(v)))
