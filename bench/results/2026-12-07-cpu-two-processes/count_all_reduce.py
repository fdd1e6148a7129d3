"""How many all-reduces one `cpu_photos` step of batch 16 makes with 2 gloo processes, --dist.fsdp off.
Run: OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 count_all_reduce.py (printed: 26)."""
import dataclasses

import torch
import torch.distributed as dist

from msn_fast.build import build_model, build_optimizer
from msn_fast.config import DistConfig
from msn_fast.dataloading.loader import MultiViewBatch
from msn_fast.distributed import init_distributed
from msn_fast.recipes import RECIPES
from msn_fast.schedules import Schedules
from msn_fast.step import train_step

info = init_distributed("cpu")
cfg = RECIPES["cpu_photos"]()
cfg = dataclasses.replace(cfg, dist=DistConfig(fsdp="off"))
torch.manual_seed(0)
model = build_model(cfg, torch.device("cpu"), info)
opt = build_optimizer(cfg, model, torch.device("cpu"))
b = 16
batch = MultiViewBatch(torch.randn(2, b, 3, 32, 32), torch.randn(4, b, 3, 16, 16), torch.full((b,), -1))
n = {"c": 0}
orig = dist.all_reduce
def counting(*a, **k):
    n["c"] += 1
    return orig(*a, **k)
dist.all_reduce = counting
train_step(model, batch, opt, Schedules(cfg.optim, 100, 100), 0, cfg)
if info.rank == 0:
    print("all_reduce calls in one step:", n["c"])
