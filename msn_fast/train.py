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
from pathlib import Path

import torch
import torch.distributed as dist

from msn_fast.dataloading import DataError, ViewRecipe, build_dali_loader, build_loader, dali_available

from .checkpoint import CheckpointError, load_checkpoint, resolve, save_checkpoint
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
    """SIGTERM or SIGINT arrived. A BaseException, like KeyboardInterrupt, so no `except Exception` swallows it."""

    def __init__(self, signame: str, save: bool):
        super().__init__(signame)
        self.signame, self.save = signame, save


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


def stop_agreed(stop: list[str], device: torch.device) -> bool:
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
    loss is computed from all-reduced terms.
    """
    lr, wd = sched.lr(step), sched.wd(step)
    for g in optimizer.param_groups:
        g["lr"] = lr
        if g["apply_wd"]:
            g["weight_decay"] = wd
    loss, stats = model.loss(batch.globals, batch.focals)
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss).item():
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


def train(cfg: Config) -> Path:
    info = init_distributed("cuda" if cfg.run.device.startswith("cuda") or (
        cfg.run.device == "auto" and torch.cuda.is_available()) else "cpu")
    out = Path(cfg.run.out_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(to_json(cfg))
    setup_logging(info.rank, out / "train.log" if info.is_main else None)
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
    if cfg.run.resume and (out / "checkpoints" / "latest").is_file():
        meta = load_checkpoint(out, model=model, optimizer=optimizer)
        step = meta["step"]
        log.info("resumed from %s at step %d", resolve(out), step)
    step0 = step

    def save() -> None:
        path = save_checkpoint(out, model=model, optimizer=optimizer, step=step, epoch=step // ipe,
                               batch_in_epoch=step % ipe, config=to_dict(cfg))
        log.info("checkpoint %s", path)

    stop: list[str] = []

    def on_signal(signum, frame):
        """First signal: finish the current step, save, exit. Before any step is done, or on a second signal:
        stop at once (a step interrupted half-way is not saved; the previous checkpoint stays)."""
        name = signal.Signals(signum).name
        if stop or step == step0:
            raise StopRequested(name, save=False)
        stop.append(name)
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
                skipped_images += batch.skipped
                m = train_step(model, batch, optimizer, sched, step, cfg)
                step += 1
                if m is None:
                    bad += 1
                    logger.skipped += 1
                    log.warning("non-finite loss at step %d: step skipped (%d in a row, %d in total)", step, bad,
                                logger.skipped)
                    if bad >= cfg.run.max_bad_steps:
                        raise TrainingDiverged(f"{bad} consecutive non-finite losses at step {step}; stopping. The "
                                           f"last good checkpoint is {out / 'checkpoints'} (resume with "
                                           "--run.resume true, perhaps with a lower --optim.lr)")
                else:
                    bad = 0
                    logger.log(step, epoch, m, skipped_images, first=step == step0 + 1)
                if step % cfg.run.checkpoint_every == 0 and step < total and bad == 0:  # never mid-streak
                    save()
                if stop_agreed(stop, device):
                    raise StopRequested(stop[0] if stop else "a signal on another process", save=True)
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
        raise KeyboardInterrupt from None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        torch.set_num_threads(threads_before)  # the loader is done: evaluation gets every core
    logger.close()
    save()
    log.info("training done: %d steps; %d unreadable images skipped; %d non-finite steps skipped", step - step0,
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
