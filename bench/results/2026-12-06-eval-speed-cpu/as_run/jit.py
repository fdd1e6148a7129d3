# ruff: noqa  (kept as run on 2026-12-06, paths written in; see ../README.md)
import time, torch, statistics as st, warnings
warnings.simplefilter("ignore")
from msn_fast.recipes import get_recipe
from msn_fast.model import MSN
torch.manual_seed(0)
cfg = get_recipe("cpu_photos")
trunk = MSN(cfg).target.trunk.eval()
trunk.set_attn_impl("torch")
X = torch.randn(256, 3, 32, 32)
class W(torch.nn.Module):
    def __init__(s, t): super().__init__(); s.t = t
    def forward(s, x): return s.t.extract_features(x)
with torch.no_grad():
    t0=time.perf_counter()
    tr = torch.jit.trace(W(trunk).eval(), X)
    fr = torch.jit.optimize_for_inference(torch.jit.freeze(tr))
    fr(X); fr(X)
    print("jit prep %.1f s" % (time.perf_counter()-t0))
    print("maxdiff", (fr(X) - trunk.extract_features(X)).abs().max().item())
    res={}
    for r in range(10):
        for n,f in (("eager", lambda: trunk.extract_features(X)), ("jit", lambda: fr(X))):
            t=time.perf_counter(); f(); res.setdefault(n,[]).append(1000*(time.perf_counter()-t)/256)
for n,v in res.items(): print(n, "median %.3f ms/img min %.3f" % (st.median(v), min(v)))
