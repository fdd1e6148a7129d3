"""Pre-train a ViT with Masked Siamese Networks: `python -m msn_fast.train [--model vit_tiny] [--data.path DIR]`.

With no arguments it trains the CPU demo (`vit_tiny` on the embedded digits) in a few minutes and
ends with a low-shot report. `--model NAME` picks a recipe (msn_fast/recipes.py); any config field
can be overridden (`--optim.lr 5e-4`); `--help` lists them. Under `torchrun` the encoders are
sharded with FSDP2. Reads top to bottom: config -> data -> model -> optimizer -> loop (train_step,
EMA, log, checkpoint) -> low-shot evaluation.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from msn_fast.dataloading import DataError, ViewRecipe, build_dali_loader, build_loader, dali_available

from .checkpoint import CheckpointError, find_checkpoint, load_checkpoint, save_checkpoint
from .cli import UsageError, apply_overrides, help_text
from .config import Config, to_dict, to_json
from .distributed import all_reduce_grad_mean, init_distributed
from .ema import ema_update
from .lowshot import run_lowshot
from .metrics import JsonlWriter, StepLogger, setup_logging
from .model import MSN
from .recipes import get_recipe
from .runtime import (
    build_model,
    build_optimizer,
    build_sources,
    cpu_training_threads,
    fit_batch_to_cpu_memory,
    gpu_peak_flops,
    resolve_device,
    step_flops_per_image,
)
from .schedules import Schedules
from .vit import num_params

log = logging.getLogger("msn_fast.train")


class StopRequested(BaseException):
    """SIGTERM or SIGINT arrived. A BaseException, like KeyboardInterrupt, so no `except Exception` swallows it.
    The trainer exits with 128 + the signal's number (143 for SIGTERM, 130 for SIGINT), as a shell would."""

    def __init__(self, signame: str, save: bool, signum: int = signal.SIGTERM):
        super().__init__(signame)
        self.signame, self.save, self.signum = signame, save, int(signum)


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses; the last good checkpoint is left intact."""


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


def stop_agreed(stop: list[tuple[str, int]], device: torch.device) -> bool:
    """Whether any process has been asked to stop; all processes agree, so they checkpoint at the same step."""
    flag = bool(stop)
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([float(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag = bool(t.item())
    return flag


def train_step(model: MSN, batch, optimizer, sched: Schedules, step: int, cfg: Config) -> dict | None:
    """One optimisation step; returns its metrics, or None when the loss was not finite (step skipped).

    The finiteness check is the step's one host sync; every process takes the same decision because the
    loss is computed from all-reduced terms. A skipped step changes no state: the forward's BatchNorm
    updates (running statistics of student and target heads) are undone, and nothing else has been touched
    yet (no backward, optimizer step or EMA). The RNG has advanced (the next step draws new masks).
    """
    lr, wd = sched.lr(step), sched.wd(step)
    for g in optimizer.param_groups:
        g["lr"] = lr
        if g["apply_wd"]:
            g["weight_decay"] = wd
    buffers = [b for b in model.buffers() if b.numel()]
    before = [b.clone() for b in buffers]
    loss, stats = model.loss(batch.globals, batch.focals)
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss).item():
        for b, old in zip(buffers, before):
            b.copy_(old)
        return None
    loss.backward()
    all_reduce_grad_mean(model.prototypes)
    if cfg.optim.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(list(model.student.parameters()), cfg.optim.clip_grad)
    optimizer.step()
    momentum = sched.momentum(step)
    ema_update(model.target, model.student, momentum)
    # For logging, the local terms averaged over processes: the loss of the global batch.
    logged = torch.stack([loss.detach(), stats.ce, stats.me_max, stats.max_target_prob, stats.num_targets.float()])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(logged)
        logged /= dist.get_world_size()
    loss_v, ce, me_max, max_t, n_t = logged.tolist()
    return {"loss": loss_v, "ce": ce, "me_max": me_max, "num_targets": n_t, "max_t": max_t,
            "lr": lr, "wd": wd, "momentum": momentum}


def non_finite_state(model: MSN, device: torch.device) -> list[str]:
    """Names of the parameters and buffers holding a NaN or inf (all processes agree); [] when all are finite."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    bad = [n for n, t in named if t.is_floating_point()
           and not bool(torch.isfinite(t.to_local() if hasattr(t, "to_local") else t).all())]
    if dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([float(bool(bad))], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not bad:
            bad = ["a tensor on another process"]
    return bad


def last_good(out: Path) -> str:
    """The divergence advice: names the checkpoint to go back to only when there is one."""
    try:
        found = find_checkpoint(out)
    except CheckpointError:
        found = None
    if found is None:
        return "No checkpoint was saved before it; restart, perhaps with a lower --optim.lr."
    return f"The last good checkpoint is {found} (resume with --run.resume true, perhaps with a lower --optim.lr)."


RUN_FILES = ("checkpoints", "metrics.jsonl", "train.log", "lowshot.json", "config.json", "tb")


def set_aside_previous_run(out: Path) -> Path | None:
    """A fresh run in a folder holding an earlier run's checkpoints or metrics moves that run's files to
    <out>/previous-<time>/, so nothing is overwritten or mixed in. Returns that folder, or None."""
    present = [out / name for name in RUN_FILES if (out / name).exists()]
    if not any(p.name in ("checkpoints", "metrics.jsonl") for p in present):
        return None
    dest = out / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while dest.exists():
        n += 1
        dest = out / f"previous-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
    dest.mkdir()
    for p in present:
        os.rename(p, dest / p.name)
    return dest


def train(cfg: Config) -> Path:
    info = init_distributed("cuda" if cfg.run.device.startswith("cuda") or (
        cfg.run.device == "auto" and torch.cuda.is_available()) else "cpu")
    out = Path(cfg.run.out_dir)
    setup_logging(info.rank)
    found = find_checkpoint(out) if cfg.run.resume else None  # a broken `latest` is warned about here
    set_aside = None
    if info.is_main:
        if found is None:
            set_aside = set_aside_previous_run(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(to_json(cfg))
    setup_logging(info.rank, out / "train.log" if info.is_main else None)
    if set_aside is not None:
        log.warning("%s held an earlier run: its files were moved to %s (continue a run with --run.resume true)",
                    out, set_aside)
    device = resolve_device(cfg.run.device, info)
    torch.manual_seed(cfg.run.seed)

    source, eval_train, eval_test = build_sources(cfg)
    model = build_model(cfg, device, info)
    log.info("model %s: %.1fM trunk parameters (%.1fM with head), %d prototypes; %d process(es) on %s",
             cfg.model, num_params(model.student.trunk) / 1e6, num_params(model.student) / 1e6,
             cfg.head.num_prototypes, info.world, device)
    d = cfg.data
    threads_before = torch.get_num_threads()
    if device.type == "cpu":
        fit_batch_to_cpu_memory(cfg, model)
        threads = cpu_training_threads(d.num_workers)
        if threads is not None and threads != threads_before:
            log.info("%d torch thread(s) for training, leaving cores to %d loader worker(s) (OMP_NUM_THREADS "
                     "overrides)", threads, d.num_workers)
            torch.set_num_threads(threads)
    recipe = ViewRecipe(global_size=d.global_size, focal_size=d.focal_size, num_focal=d.num_focal,
                        global_scale=d.global_scale, focal_scale=d.focal_scale, color_jitter=d.color_jitter,
                        blur_prob=d.blur_prob)
    if d.backend == "dali" and not dali_available():
        raise UsageError("data.backend=dali but nvidia-dali is not installed (pip install 'msn-fast[dali]')")
    make_loader = build_dali_loader if d.backend == "dali" else build_loader
    extra = {"device_id": device.index if device.type == "cuda" else None} if d.backend == "dali" else {}
    loader = make_loader(source, recipe, d.batch_size, rank=info.rank, world=info.world, seed=cfg.run.seed,
                         num_workers=d.num_workers, pin_memory=device.type == "cuda", **extra)
    ipe = loader.batches_per_epoch
    total = cfg.optim.epochs * ipe if cfg.run.max_steps <= 0 else min(cfg.run.max_steps, cfg.optim.epochs * ipe)
    sched = Schedules(cfg.optim, cfg.optim.epochs * ipe, ipe)
    optimizer = build_optimizer(cfg, model, device)
    log.info("data: %d images, batch %d x %d process(es), %d steps/epoch, %d steps; views 2x%dpx + %dx%dpx, "
             "mask ratio %.2f", len(source), d.batch_size, info.world, ipe, total, d.global_size, d.num_focal,
             d.focal_size, cfg.mask.ratio)

    step = 0
    if found is not None:
        meta = load_checkpoint(found, model=model, optimizer=optimizer)
        step = meta["step"]
        log.info("resumed from %s at step %d", found, step)
    step0 = step

    def save() -> None:
        bad_tensors = non_finite_state(model, device)
        if bad_tensors:
            raise TrainingDiverged(f"the model state is not finite ({', '.join(bad_tensors[:3])}); not saved. "
                                   + last_good(out))
        path = save_checkpoint(out, model=model, optimizer=optimizer, step=step, epoch=step // ipe,
                               batch_in_epoch=step % ipe, config=to_dict(cfg), keep=cfg.run.keep_checkpoints)
        log.info("checkpoint %s", path)

    stop: list[tuple[str, int]] = []  # (signal name, number) of the first signal

    def on_signal(signum, frame):
        """First signal: finish the current step, save, exit. Before any step is done, or on a second signal:
        stop at once (a step interrupted half-way is not saved; the previous checkpoint stays)."""
        name = signal.Signals(signum).name
        if stop or step == step0:
            raise StopRequested(name, save=False, signum=signum)
        stop.append((name, signum))
        log.warning("%s received: finishing step %d, then saving a checkpoint (send it again to stop now)", name,
                    step + 1)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    logger = StepLogger(total, d.batch_size * info.world, step_flops_per_image(cfg), gpu_peak_flops(device),
                        device, JsonlWriter(out / "metrics.jsonl", enabled=info.is_main), cfg.run.log_every,
                        tensorboard_dir=out / "tb" if info.is_main else None)
    bad, skipped_images = 0, 0
    model.train()
    try:
        while step < total:
            epoch, start = divmod(step, ipe)
            loader.set_position(epoch, start)
            for batch in loader:
                batch = batch.to(device)
                skipped_images = len(loader.unreadable)  # distinct unreadable files met so far in this process
                m = train_step(model, batch, optimizer, sched, step, cfg)
                step += 1
                if m is None:
                    bad += 1
                    logger.skipped += 1
                    log.warning("non-finite loss at step %d: step skipped (%d in a row, %d in total)", step, bad,
                                logger.skipped)
                    if bad >= cfg.run.max_bad_steps:
                        raise TrainingDiverged(f"{bad} consecutive non-finite losses at step {step}; stopping. "
                                               + last_good(out))
                else:
                    bad = 0
                    logger.log(step, epoch, m, skipped_images, first=step == step0 + 1)
                if step % cfg.run.checkpoint_every == 0 and step < total and bad == 0:  # never mid-streak
                    save()
                if stop_agreed(stop, device):
                    name, signum = stop[0] if stop else ("a signal on another process", signal.SIGTERM)
                    raise StopRequested(name, save=True, signum=signum)
                if step >= total:
                    break
    except StopRequested as e:
        logger.close()
        if e.save:
            save()
            log.warning("stopped by %s at step %d; resume with --run.resume true", e.signame, step)
        else:
            log.warning("stopped by %s during step %d; not saved (the last checkpoint, if any, is intact)", e.signame,
                        step + 1)
        raise
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        torch.set_num_threads(threads_before)  # the loader is done: evaluation gets every core
    logger.close()
    save()
    log.info("training done: %d steps; %d unreadable image(s) skipped; %d non-finite step(s) skipped", step - step0,
             skipped_images, logger.skipped)

    if cfg.run.eval_lowshot and info.world == 1 and eval_train is not None and eval_test is not None:
        report = run_lowshot(model, cfg, eval_train, eval_test, device)
        (out / "lowshot.json").write_text(json.dumps(report, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        train(parse_config(argv))
    except (UsageError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except StopRequested as e:
        return 128 + e.signum
    except KeyboardInterrupt:
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else sys.exit(code)
