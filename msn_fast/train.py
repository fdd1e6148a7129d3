"""Pre-train a ViT with Masked Siamese Networks: `python -m msn_fast.train [--model vit_tiny] [--data.path DIR]`.

With no arguments it trains the CPU demo (`vit_tiny` on the embedded digits) in a few minutes and
ends with a low-shot report. `--model NAME` picks a recipe (msn_fast/recipes.py); any config field
can be overridden (`--optim.lr 5e-4`); `--help` lists them. Reads top to bottom: config -> data ->
model -> optimizer -> loop (train_step, ema, log, checkpoint) -> low-shot evaluation.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch

from msn_fast.dataloading import DataError, Digits, ImageFolder, ViewRecipe, build_loader

from .checkpoint import LATEST, CheckpointError, load_checkpoint, restore, save_checkpoint
from .cli import UsageError, apply_overrides, help_text
from .config import Config, to_dict, to_json
from .ema import ema_update
from .lowshot import run_lowshot
from .metrics import JsonlWriter, format_duration, setup_logging
from .model import MSN, param_groups
from .recipes import get_recipe
from .schedules import Schedules
from .vit import num_params

log = logging.getLogger("msn_fast.train")


def parse_config(argv: list[str]) -> Config:
    """`--model NAME` chooses the recipe; every other flag overrides a field of it. `--help` prints them."""
    name, rest, i = "vit_tiny", [], 0
    while i < len(argv):
        if argv[i] == "--model":
            if i + 1 >= len(argv):
                raise UsageError("--model needs a value")
            name, i = argv[i + 1], i + 2
            continue
        if argv[i].startswith("--model="):
            name = argv[i].split("=", 1)[1]
        else:
            rest.append(argv[i])
        i += 1
    try:
        cfg = get_recipe(name)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if "-h" in rest or "--help" in rest:
        print(help_text(cfg, "python -m msn_fast.train", __doc__.strip()))
        raise SystemExit(0)
    return apply_overrides(cfg, rest)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"run.device={name} but no CUDA device is available")
    return dev


def build_sources(cfg: Config):
    """(pre-training source, low-shot train source or None, low-shot test source or None)."""
    if cfg.data.path is None:
        return Digits("train", cfg.data.global_size), Digits("train", cfg.data.global_size), Digits(
            "test", cfg.data.global_size)
    root = Path(cfg.data.path)
    if (root / "train").is_dir() and (root / "test").is_dir():
        train, test = ImageFolder(root / "train"), ImageFolder(root / "test")
        return train, (train if train.labelled else None), (test if test.labelled else None)
    src = ImageFolder(root)
    return src, None, None


def fit_batch_to_cpu_memory(cfg: Config, model: MSN) -> None:
    """On a CPU, lower the batch if a rough estimate of the step's memory exceeds 70% of the RAM."""
    v, d = cfg.vit, cfg.data
    n_global = (d.global_size // v.patch_size) ** 2
    tokens = 1 + math.floor(n_global * (1 - cfg.mask.ratio)) + d.num_focal * (1 + (d.focal_size // v.patch_size) ** 2)
    per_image = tokens * v.depth * 16 * v.dim * 4  # ~16 saved fp32 activations of width D per token and block
    fixed = num_params(model) * 4 * 4  # student, target, two AdamW moments
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    fits = int((0.7 * ram - fixed) // per_image)
    if fits < d.batch_size:
        new = max(2, fits)
        log.warning("batch %d needs ~%.1f GiB on this CPU (RAM %.1f GiB): using batch %d instead "
                    "(set --data.batch_size to choose)", d.batch_size,
                    (fixed + per_image * d.batch_size) / 2**30, ram / 2**30, new)
        d.batch_size = new


def train_step(model: MSN, batch, optimizer, sched: Schedules, step: int, cfg: Config) -> dict | None:
    """One optimisation step; returns its metrics, or None when the loss was not finite (step skipped)."""
    lr, wd = sched.lr(step), sched.wd(step)
    for g in optimizer.param_groups:
        g["lr"] = lr
        if g["apply_wd"]:
            g["weight_decay"] = wd
    loss, stats = model.loss(batch.globals, batch.focals)
    if not torch.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.optim.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(model.student.parameters(), cfg.optim.clip_grad)
    optimizer.step()
    momentum = sched.momentum(step)
    ema_update(model.target, model.student, momentum)
    return {"loss": loss.item(), "ce": stats.ce.item(), "me_max": stats.me_max.item(),
            "num_targets": int(stats.num_targets.item()), "max_t": stats.max_target_prob.item(),
            "lr": lr, "wd": wd, "momentum": momentum}


def save(path: Path, model, optimizer, step: int, epoch: int, batch_in_epoch: int, cfg: Config, **extra) -> None:
    save_checkpoint(path, model=model, optimizer=optimizer, step=step, epoch=epoch, batch_in_epoch=batch_in_epoch,
                    config=to_dict(cfg), extra=extra)


def train(cfg: Config) -> Path:
    out = Path(cfg.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(0, out / "train.log")
    (out / "config.json").write_text(to_json(cfg))
    torch.manual_seed(cfg.run.seed)
    device = resolve_device(cfg.run.device)

    source, eval_train, eval_test = build_sources(cfg)
    model = MSN(cfg).to(device)
    n_params = num_params(model.student.trunk)
    log.info("model %s: %.1fM trunk parameters (%.1fM with head), %d prototypes; device %s", cfg.model,
             n_params / 1e6, num_params(model.student) / 1e6, cfg.head.num_prototypes, device)
    if device.type == "cpu":
        fit_batch_to_cpu_memory(cfg, model)
    d = cfg.data
    recipe = ViewRecipe(global_size=d.global_size, focal_size=d.focal_size, num_focal=d.num_focal,
                        global_scale=d.global_scale, focal_scale=d.focal_scale, color_jitter=d.color_jitter,
                        blur_prob=d.blur_prob)
    loader = build_loader(source, recipe, d.batch_size, seed=cfg.run.seed, num_workers=d.num_workers,
                          pin_memory=device.type == "cuda")
    ipe = loader.batches_per_epoch
    total = cfg.optim.epochs * ipe if cfg.run.max_steps <= 0 else min(cfg.run.max_steps, cfg.optim.epochs * ipe)
    sched = Schedules(cfg.optim, cfg.optim.epochs * ipe, ipe)
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(param_groups(model), lr=cfg.optim.start_lr, betas=cfg.optim.betas,
                                  weight_decay=cfg.optim.weight_decay, fused=fused)
    log.info("data: %d images, batch %d, %d steps/epoch, %d steps; views 2x%dpx + %dx%dpx, mask ratio %.2f",
             len(source), d.batch_size, ipe, total, d.global_size, d.num_focal, d.focal_size, cfg.mask.ratio)

    step, ckpt = 0, out / LATEST
    if cfg.run.resume and ckpt.exists():
        state = load_checkpoint(ckpt, map_location=device)
        restore(state, model=model, optimizer=optimizer)
        step = state["step"]
        log.info("resumed from %s at step %d", ckpt, step)
    metrics = JsonlWriter(out / "metrics.jsonl")
    bad, skipped_images, t_log, steps_since = 0, 0, time.perf_counter(), 0
    t_start, step0 = t_log, step
    model.train()
    try:
        while step < total:
            epoch, start = divmod(step, ipe)
            loader.set_position(epoch, start)
            for batch in loader:
                batch = batch.to(device)
                skipped_images += batch.skipped
                m = train_step(model, batch, optimizer, sched, step, cfg)
                if m is None:
                    bad += 1
                    log.warning("non-finite loss at step %d: step skipped (%d in a row)", step, bad)
                    if bad >= cfg.run.max_bad_steps:
                        raise RuntimeError(f"{bad} consecutive non-finite losses at step {step}; stopping. "
                                           f"The last good checkpoint is {ckpt}")
                    step += 1
                    continue
                bad = 0
                step += 1
                steps_since += 1
                if step % cfg.run.log_every == 0 or step in (step0 + 1, total):
                    now = time.perf_counter()
                    ips = steps_since * d.batch_size / (now - t_log)
                    eta = (total - step) * (now - t_start) / (step - step0)
                    log.info("step %d/%d epoch %d loss %.4f ce %.4f me_max %.4f np %d max_t %.3f lr %.2e wd %.3f "
                             "m %.4f | %.1f img/s, %.2f s/step, ETA %s", step, total, epoch, m["loss"], m["ce"],
                             m["me_max"], m["num_targets"], m["max_t"], m["lr"], m["wd"], m["momentum"], ips,
                             (now - t_log) / steps_since, format_duration(eta))
                    metrics.write({"step": step, "epoch": epoch, "img_per_s": ips, "skipped_images": skipped_images,
                                   **m})
                    t_log, steps_since = now, 0
                if step % cfg.run.checkpoint_every == 0:
                    save(ckpt, model, optimizer, step, *divmod(step, ipe), cfg)
                if step >= total:
                    break
    except KeyboardInterrupt:
        save(ckpt, model, optimizer, step, *divmod(step, ipe), cfg)
        log.warning("interrupted at step %d: checkpoint saved to %s (continue with --run.resume)", step, ckpt)
        raise
    save(ckpt, model, optimizer, step, *divmod(step, ipe), cfg)
    log.info("training done: %d steps in %s; %d unreadable images skipped; checkpoint %s", step - step0,
             format_duration(time.perf_counter() - t_start), skipped_images, ckpt)

    if cfg.run.eval_lowshot and eval_train is not None and eval_test is not None:
        report = run_lowshot(model, cfg, eval_train, eval_test, device)
        (out / "lowshot.json").write_text(json.dumps(report, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_config(argv)
        train(cfg)
    except (UsageError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
