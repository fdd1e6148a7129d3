"""One optimisation step of MSN and what the loop reads of it: `train_step` never waits for the device (a
non-finite loss skips the update on the device, changing no state); `read_step` reads a step's metrics in one host
sync at log and checkpoint steps; `non_finite_state` names the tensors holding a NaN or inf. msn_fast.train's loop
calls them; the benchmarks and msn_fast.workloads time `train_step` alone.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from .config import Config
from .distributed import average_replicated_grads
from .ema import ema_update
from .model import MSN
from .schedules import Schedules


class StepResult(NamedTuple):
    """What one step leaves for the loop, on the device: read (one sync) only at log and checkpoint steps."""

    ok: torch.Tensor  # 0-dim bool: the loss was finite and the update applied
    terms: torch.Tensor  # [5]: loss, ce, me_max, max_t, num_targets of this process
    lr: float
    wd: float
    momentum: float


def skip_or_step(optimizer, ok: torch.Tensor) -> None:
    """optimizer.step(), skipped on the device when `ok` is False (state, step counts and weights unchanged),
    as GradScaler does for optimizers that take `found_inf` (torch's fused AdamW). Any other (apex) syncs once."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.grad_scale, optimizer.found_inf = None, (~ok).to(torch.float32)  # 0-dim, as the step counts
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif ok.item():
        optimizer.step()


def train_step(model: MSN, batch, optimizer, sched: Schedules, step: int, cfg: Config) -> StepResult:
    """One optimisation step that never waits for the device (no .item(), no host sync).

    A non-finite loss (every process agrees: the loss comes from all-reduced terms) skips the step on the
    device and changes no state: the forward's BatchNorm updates (running statistics of the student's and
    target's heads, and of a conv stem) are undone with torch.where, the optimizer skips its update (found_inf),
    the EMA weight is 0. The backward still runs (its gradients are discarded). The RNG has advanced: the next
    step draws new masks, as it would have.
    """
    lr, wd = sched.lr(step), sched.wd(step)
    for g in optimizer.param_groups:
        g["lr"] = lr
        if g["apply_wd"]:
            g["weight_decay"] = wd
    buffers = [b for b in model.buffers() if b.numel()]
    before = [b.clone() for b in buffers]
    loss, stats = model.loss(batch.globals, batch.focals)
    ok = torch.isfinite(loss.detach())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for b, old in zip(buffers, before):  # after the backward, which saved the buffers' versions
        b.copy_(torch.where(ok, b, old))
    average_replicated_grads([*model.student.parameters(), model.prototypes])
    if cfg.optim.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(list(model.student.parameters()), cfg.optim.clip_grad)
    skip_or_step(optimizer, ok)
    momentum = sched.momentum(step)
    ema_update(model.target, model.student, momentum, skip=~ok)
    terms = torch.stack([loss.detach(), stats.ce, stats.me_max, stats.max_target_prob, stats.num_targets.float()])
    return StepResult(ok, terms, lr, wd, momentum)


def read_step(r: StepResult, streaks: torch.Tensor) -> tuple[bool, list[float], list[int]]:
    """A log or checkpoint step's read of the device, in one host sync: (ok, metrics of the global batch, [streak,
    longest streak since the last read, skipped in total]). The terms are averaged over processes here, not per
    step."""
    terms = r.terms
    if dist.is_initialized() and dist.get_world_size() > 1:
        terms = terms.clone()
        dist.all_reduce(terms)
        terms /= dist.get_world_size()
    values = torch.cat([r.ok.to(terms.dtype).reshape(1), terms, streaks.to(terms.dtype)]).tolist()
    return bool(values[0]), values[1:6], [int(v) for v in values[6:]]


def non_finite_state(model: MSN, device: torch.device, optimizer=None) -> list[str]:
    """Names of the parameters, buffers and optimizer state tensors holding a NaN or inf (all processes agree);
    [] when all are finite."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    if optimizer is not None:
        named += [(f"optimizer state {k}", v) for st in optimizer.state.values() for k, v in st.items()
                  if torch.is_tensor(v)]
    bad = [n for n, t in named if t.is_floating_point()
           and not bool(torch.isfinite(t.to_local() if hasattr(t, "to_local") else t).all())]
    if dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([float(bool(bad))], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not bad:
            bad = ["a tensor on another process"]
    return bad
