"""What `python -m msn_fast.check` runs: each kernel's inputs at a recipe's shapes, the timing loop, the step.

Kept apart from check.py (the command: sections, tables, exit status) so each reads on its own. The inputs
are those of the training step (msn_fast/model.py, msn_fast/vit.py), the step is the trainer's own
(build.build_model, build_optimizer, step.train_step) on random images.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch

from .config import Config
from .flops import step_flops_per_image
from .loss import target_probs
from .masking import num_kept

CPU_STEP_FLOPS = 20e9  # the CPU step is shrunk (depth, then image sizes) to about this many FLOPs


# ---- kernel inputs at the recipe's shapes -------------------------------------------------------------


@dataclass
class Case:
    name: str  # "attention[anchor]"
    op: str  # the public function of msn_fast.kernels
    kwargs: dict  # its keyword arguments, without backend


def tiny(cfg: Config) -> Config:
    """The recipe at tiny shapes for the interpreter: width 64, 2 heads of 32, 8 px patches, 48 px global views
    (36 patches), two 32 px focal views (17 tokens), 16 prototypes of 32; mask ratio and loss as the recipe."""
    t = copy.deepcopy(cfg)
    t.vit.dim, t.vit.heads, t.vit.patch_size, t.vit.img_size = 64, 2, 8, 48
    t.data.global_size, t.data.focal_size, t.data.num_focal = 48, 32, 2
    t.head.out_dim, t.head.num_prototypes = 32, 16
    return t


def kernel_cases(cfg: Config, batch: int, device: torch.device, dtype: torch.dtype) -> list[Case]:
    """Random inputs of each op as the training step calls it: attention over the masked anchor (1 + kept
    tokens) and over a focal view, the token gather and the kept-patch embedding of the anchor, the prototype
    cross-entropy of 1 + num_focal views against the recipe's sharpened targets (msn_fast.loss.target_probs).
    Tensors the op differentiates require grad (images and the targets do not)."""
    v, d, h, lc = cfg.vit, cfg.data, cfg.head, cfg.loss
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, grad=True, scale=1.0, dt=dtype):
        return (torch.randn(shape, generator=gen) * scale).to(device, dt).requires_grad_(grad)

    n = (d.global_size // v.patch_size) ** 2
    anchor = 1 + num_kept(n, cfg.mask.ratio)  # tokens of one masked anchor view
    focal = 1 + (d.focal_size // v.patch_size) ** 2
    hd, views, kdim = v.dim // v.heads, 1 + d.num_focal, 3 * v.patch_size**2
    keep = torch.rand(batch, n, generator=gen).argsort(dim=1)[:, : anchor - 1].to(device)  # [B, K] int64
    cases = [Case(f"attention[{which}]", "attention",
                  dict(q=rand(batch, v.heads, length, hd), k=rand(batch, v.heads, length, hd),
                       v=rand(batch, v.heads, length, hd), scale=hd**-0.5))
             for which, length in (("anchor", anchor), ("focal", focal))]
    cases.append(Case("gather_tokens", "gather_tokens",
                      dict(tokens=rand(batch, n, v.dim), keep_idx=keep, pos_embed=rand(n, v.dim))))
    cases.append(Case("embed_kept_patches", "embed_kept_patches",
                      dict(images=rand(batch, 3, d.global_size, d.global_size, grad=False),
                           weight=rand(v.dim, 3, v.patch_size, v.patch_size, scale=kdim**-0.5), bias=rand(v.dim),
                           pos_embed=rand(n, v.dim), keep_idx=keep, cls_token=rand(v.dim))))
    emb, target = rand(views * batch, h.out_dim), rand(batch, h.out_dim, grad=False)
    protos = rand(h.num_prototypes, h.out_dim, dt=torch.float32)
    targets = target_probs(target, protos, lc.tau, lc.sharpen, lc.sinkhorn_iters)  # (B, K) fp32, no grad
    cases.append(Case("prototype_cross_entropy", "prototype_cross_entropy",
                      dict(anchor=emb, prototypes=protos, targets=targets, num_views=views, tau=lc.tau)))
    return cases


# ---- timings -------------------------------------------------------------------------------------------


def median_time(fn, rounds: int, device: torch.device, warmup: int = 2) -> float:
    """Median seconds of `fn()` over `rounds` (CUDA events on a GPU, perf_counter on a CPU), after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fwd_bwd(op: str, kw: dict, backend: str):
    """A closure running `op` forward and backward (gradients of the inputs that require grad) on `backend`."""
    import msn_fast.kernels as kernels

    fn, leaves = getattr(kernels, op), [t for t in kw.values() if torch.is_tensor(t) and t.requires_grad]

    def run():
        out = fn(**kw, backend=backend)
        out = out[0] if isinstance(out, tuple) else out  # the CE of (ce, mean_probs): the same backward kernels run
        torch.autograd.grad(out, leaves, torch.ones_like(out))

    return run


# ---- the training step ---------------------------------------------------------------------------------


def cpu_step_config(cfg: Config) -> list[str]:
    """Shrink the recipe in place until a step of 2 images is about CPU_STEP_FLOPS: 2 focal views, then fewer
    blocks (down to 2), then half-size views (at least 4 patches a side). Returns what changed, as flags."""
    v, d = cfg.vit, cfg.data
    orig = {"vit.depth": v.depth, "data.global_size": d.global_size, "data.focal_size": d.focal_size,
            "data.num_focal": d.num_focal}
    d.num_focal = min(d.num_focal, 2)
    while 2 * step_flops_per_image(cfg) > CPU_STEP_FLOPS:
        if v.depth > 2:
            v.depth = max(2, v.depth // 2)
        elif d.global_size // v.patch_size >= 8:
            d.global_size = v.img_size = (d.global_size // v.patch_size // 2) * v.patch_size
            d.focal_size = max(2 * v.patch_size, (d.focal_size // v.patch_size // 2) * v.patch_size)
        else:
            break
    now = {"vit.depth": v.depth, "data.global_size": d.global_size, "data.focal_size": d.focal_size,
           "data.num_focal": d.num_focal}
    return [f"--{k}={now[k]} (recipe {orig[k]})" for k in orig if now[k] != orig[k]]


def step_section(cfg: Config, device: torch.device, batch: int, rounds: int, peak_flops: float | None) -> dict:
    """The trainer's step (build.build_model / build_optimizer, step.train_step) on random images, at the
    recipe's mask ratio and unmasked: median seconds, img/s, MFU, peak memory (allocated, CUDA only)."""
    import torch.distributed as dist

    from msn_fast.dataloading import MultiViewBatch

    from .build import build_model, build_optimizer
    from .distributed import DistInfo
    from .schedules import Schedules
    from .step import train_step

    cfg.data.batch_size, d = batch, cfg.data
    out = {"batch": batch, "rounds": rounds, "mask_ratio": cfg.mask.ratio, "ok": False, "error": None}
    had_group = dist.is_available() and dist.is_initialized()
    try:
        torch.manual_seed(0)
        model = build_model(cfg, device, DistInfo())
        optimizer = build_optimizer(cfg, model, device)
        sched = Schedules(cfg.optim, total_steps=100_000, steps_per_epoch=1000)
        views = MultiViewBatch(torch.randn(2, batch, 3, d.global_size, d.global_size, device=device),
                               torch.randn(d.num_focal, batch, 3, d.focal_size, d.focal_size, device=device),
                               torch.full((batch,), -1, dtype=torch.long, device=device))
        results = []  # StepResults, read after the timing (reading one syncs)

        def one():
            results.append(train_step(model, views, optimizer, sched, 1000 + len(results), cfg))

        for key, ratio in (("masked", out["mask_ratio"]), ("unmasked", 0.0)):
            cfg.mask.ratio = ratio  # the model reads it at every step
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            seconds = median_time(one, rounds, device, warmup=1)
            loss = float(results[-1].terms[0])
            if not all(bool(r.ok) for r in results):
                raise RuntimeError(f"{key} step: non-finite loss (last {loss})")
            flops = step_flops_per_image(cfg) * batch
            out[key] = {"mask_ratio": ratio, "median_s": seconds, "images_per_s": batch / seconds, "loss": loss,
                        "mfu": flops / seconds / peak_flops if peak_flops else None,
                        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
        out["speedup"] = out["unmasked"]["median_s"] / out["masked"]["median_s"]
        out["ok"] = True
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"[:500]
    finally:
        cfg.mask.ratio = out["mask_ratio"]
        if not had_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # build_model made a private one for FSDP
    return out
