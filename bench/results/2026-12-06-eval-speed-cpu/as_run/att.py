# ruff: noqa  (kept as run on 2026-12-06, paths written in; see ../README.md)
import time, torch, statistics as st
import torch.nn.functional as F
B,H,N,D=256,4,65,32
q,k,v=(torch.randn(B,H,N,D) for _ in range(3))
def sdpa(): return F.scaled_dot_product_attention(q,k,v)
def eager():
    a=(q*D**-0.5)@k.transpose(-1,-2); a=a.softmax(-1); return a@v
def eager2():
    qq=q.reshape(B*H,N,D); kk=k.reshape(B*H,N,D); vv=v.reshape(B*H,N,D)
    a=torch.bmm(qq*D**-0.5, kk.transpose(1,2))
    torch.softmax(a,-1,out=a) if False else None
    a=a.softmax(-1)
    return torch.bmm(a,vv).view(B,H,N,D)
def math():
    return torch.ops.aten._scaled_dot_product_attention_math(q,k,v)[0]
fs=dict(sdpa=sdpa,eager=eager,eager2=eager2,math=math)
for n,f in fs.items(): print(n, (f()-sdpa()).abs().max().item())
res={}
with torch.inference_mode():
    for r in range(15):
        for n,f in fs.items():
            t=time.perf_counter(); f(); res.setdefault(n,[]).append(1000*(time.perf_counter()-t))
for n,v_ in res.items(): print(n,"median %.1f ms min %.1f"%(st.median(v_),min(v_)))
