"""Pre-train a ViT with Masked Siamese Networks: `python -m msn_fast.train [--model cpu_demo] [--data.path DIR]`.

With no arguments it trains the CPU demo (`cpu_demo` on the embedded digits) in a few minutes and
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

from msn_fast.dataloading import DataError, build_dali_loader, build_loader, dali_available, eval_transform
from msn_fast.dataloading.shards import ShardSet, build_shard_loader

from .budget import TimeBudget
from .build import build_model, build_optimizer, resolve_device
from .checkpoint import CheckpointError, find_checkpoint, load_checkpoint, load_meta, on_rank0, save_checkpoint
from .cli import UsageError, apply_overrides, help_text
from .config import Config, check_resume_shapes, config_changes, to_dict, to_json
from .cpu_resources import cpu_training_threads, fit_batch_to_cpu_memory
from .data_sources import build_sources
from .distributed import init_distributed
from .evaluation import lowshot_report
from .flops import gpu_peak_flops, step_flops_per_image
from .metrics import JsonlWriter, StepLogger, setup_logging
from .model import MSN
from .recipes import get_recipe
from .schedules import MAX_WARMUP_FRACTION, Schedules
from .step import non_finite_state, read_step, train_step
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
    name, rest, i = "cpu_demo", [], 0
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


def eval_cost_per_image(model: MSN, cfg: Config, source, device, n: int = 16) -> float:
    """Seconds per image of the end-of-run report, measured on `n` images: one decode (shared by the three
    feature sets) and two encoder forwards (trained and random-init) each."""
    tf = eval_transform(cfg.data.global_size)
    t0 = time.perf_counter()
    images = [tf(img) for img, _ in (source[i] for i in range(min(n, len(source)))) if img is not None]
    t1 = time.perf_counter()
    if not images:
        return 0.0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model.target.trunk.extract_features(torch.stack(images).to(device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    model.train(was_training)
    t2 = time.perf_counter()
    return ((t1 - t0) + 2 * (t2 - t1)) / len(images)


def fitted_schedules(cfg: Config, total: int, ipe: int, warn: bool = True) -> Schedules:
    """The schedules over the `total` steps the run will take; a warm-up clipped to fit is said (with `warn`)."""
    sched = Schedules(cfg.optim, total, ipe)
    if sched.warmup_clipped and warn:
        log.warning("optim.warmup_epochs=%g is %d steps, more than %d%% of this %d-step run: warm-up clipped to "
                    "%d steps (set --optim.warmup_epochs, or run more steps)", cfg.optim.warmup_epochs,
                    sched.warmup_asked, round(100 * MAX_WARMUP_FRACTION), total, sched.warmup)
    return sched


def refuse_other_shapes(saved: dict, cfg: Config, where) -> None:
    """check_resume_shapes as the trainer's one-line error (UsageError) on every process."""
    try:
        check_resume_shapes(saved, cfg, str(where))
    except ValueError as e:
        raise UsageError(str(e)) from None


def train(cfg: Config) -> Path:
    t_start = time.perf_counter()
    info = init_distributed("cuda" if cfg.run.device.startswith("cuda") or (
        cfg.run.device == "auto" and torch.cuda.is_available()) else "cpu")
    out = Path(cfg.run.out_dir)
    setup_logging(info.rank)
    # rank 0 decides and tells the others, so all load the same step (a broken `latest` is warned about here)
    found = on_rank0(lambda: find_checkpoint(out)) if cfg.run.resume else None
    saved_cfg = on_rank0(lambda: load_meta(found).get("config")) if found is not None else None
    if saved_cfg is not None:  # a model of other shapes is refused here, before anything is built or written
        refuse_other_shapes(saved_cfg, cfg, found)
    set_aside = None
    if info.is_main:
        if found is None:
            set_aside = set_aside_previous_run(out)
        out.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()  # the others wait until an earlier run is set aside
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
        reserved = d.num_workers if d.augment == "per_image" else 0  # batched: workers cheap, cores shared
        threads = cpu_training_threads(reserved)
        if threads is not None and threads != threads_before:
            log.info("%d torch thread(s) for training, leaving cores to %d loader worker(s) (OMP_NUM_THREADS "
                     "overrides)", threads, reserved)
            torch.set_num_threads(threads)
    changed = config_changes(saved_cfg, cfg) if saved_cfg is not None else []  # after the batch fit: it counts too
    if info.is_main:  # written after the batch is fitted, so it is the config this run uses
        (out / "config.json").write_text(to_json(cfg))
    if d.backend == "dali" and not dali_available():
        raise UsageError("data.backend=dali but nvidia-dali is not installed (pip install 'msn-fast[dali]')")
    make_loader = build_dali_loader if d.backend == "dali" else build_loader
    if isinstance(source, ShardSet):
        make_loader = build_dali_loader if d.backend == "dali" else build_shard_loader  # dali: its shard reader
    extra = {"device_id": device.index if device.type == "cuda" else None} if d.backend == "dali" else {}
    if make_loader is build_loader:
        extra["augment"], extra["cache_mb"] = d.augment, d.cache_mb
    # cfg.data is the loader's ViewRecipe: DataConfig inherits the view fields from it
    loader = make_loader(source, d, d.batch_size, rank=info.rank, world=info.world, seed=cfg.run.seed,
                         num_workers=d.num_workers, pin_memory=device.type == "cuda", **extra)
    ipe = loader.batches_per_epoch
    total = cfg.optim.epochs * ipe if cfg.run.max_steps <= 0 else min(cfg.run.max_steps, cfg.optim.epochs * ipe)
    optimizer = build_optimizer(cfg, model, device)

    step, planned, minutes_before = 0, None, 0.0
    if found is not None:
        meta = load_checkpoint(found, model=model, optimizer=optimizer)
        saved = meta.get("extra", {})
        step, planned, minutes_before = meta["step"], saved.get("planned_steps"), saved.get("train_minutes", 0.0)
        log.info("resumed from %s at step %d", found, step)
    step0 = step
    budget = None
    kept_plan = planned is not None and cfg.run.time_budget > 0
    if changed and info.is_main:
        plan_flags = ("--run.time_budget", "--run.max_steps", "--optim.epochs") if kept_plan else ()
        said = []
        for flag, old, new in changed:
            note = " (not applied: a budgeted run keeps its plan)" if flag in plan_flags else ""
            said.append(f"{flag}: {old!r} -> {new!r}{note}")
        log.warning("settings differ from the checkpoint's and apply from step %d on: %s", step, "; ".join(said))
    if kept_plan:
        total = planned  # a budgeted run keeps its plan
        log.info("time budget: continuing the plan of %d steps made when the run started", total)
    elif planned is not None and planned != total:
        log.warning("the schedules now span %d steps (the run so far planned %d): lr, wd and EMA momentum "
                    "continue from step %d on the new span", total, planned, step)
    elif cfg.run.time_budget > 0:
        n_eval = (len(eval_train) + len(eval_test)) if cfg.run.eval_lowshot and info.world == 1 and \
            eval_train is not None and eval_test is not None else 0  # fmt: skip
        budget = TimeBudget(cfg.run.time_budget - minutes_before, t_start, n_eval,  # minus what a resumed run spent
                            lambda: eval_cost_per_image(model, cfg, eval_train, device))
    sched = fitted_schedules(cfg, total, ipe)
    log.info("data: %d images, batch %d x %d process(es), %d steps/epoch, %d steps; views 2x%dpx + %dx%dpx, "
             "mask ratio %.2f", len(source), d.batch_size, info.world, ipe, total, d.global_size, d.num_focal,
             d.focal_size, cfg.mask.ratio)

    def save() -> None:
        bad_tensors = non_finite_state(model, device, optimizer)
        if bad_tensors:
            raise TrainingDiverged(f"the model state is not finite ({', '.join(bad_tensors[:3])}); not saved. "
                                   + last_good(out))
        # train_minutes: wall clock since this run (and the runs it resumes) started, for curves over time
        minutes = minutes_before + (time.perf_counter() - t_start) / 60
        run_info = {"train_minutes": minutes}
        if budget is None or budget.cap is not None:  # a budgeted run stopped before its plan: plan on resume
            run_info["planned_steps"] = total
        path = save_checkpoint(out, model=model, optimizer=optimizer, step=step, config=to_dict(cfg),
                               keep=cfg.run.keep_checkpoints, extra=run_info)
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
    skipped_images, reported_skips = 0, 0
    # [consecutive skipped steps, longest such streak since the last read, skipped in total], on the device
    streaks = torch.zeros(3, dtype=torch.int64, device=device)
    world_stop_every = cfg.run.log_every if info.world > 1 else 1  # agreeing on a stop is an all-reduce
    model.train()
    try:
        while step < total:
            epoch, start = divmod(step, ipe)
            loader.set_position(epoch, start)
            for batch in loader:
                batch = batch.to(device)
                skipped_images = len(loader.unreadable)  # distinct unreadable files met so far in this process
                r = train_step(model, batch, optimizer, sched, step, cfg)
                step += 1
                bad = (~r.ok).long()
                streaks[0] = (streaks[0] + 1) * bad
                streaks[1] = torch.maximum(streaks[1], streaks[0])
                streaks[2] += bad
                logger.tick(step)
                first = step == step0 + 1
                if budget is not None and budget.after_step(step, step0):
                    # every rank: the same plan, and the same steps at which it is made again
                    total, why, state = on_rank0(lambda: (*budget.plan(step, total), budget.state))
                    budget.adopt(state)
                    log.info("%s", why)
                    sched = fitted_schedules(cfg, total, ipe, warn=not sched.warmup_clipped)  # said once
                    logger.total = total
                ckpt_due = step % cfg.run.checkpoint_every == 0 and step < total
                log_due = logger.due(step, first)
                # Only these steps wait for the device: read_step's one sync, then on a checkpoint step save()'s
                # finiteness check of the state; with several processes, the stop vote below joins log steps.
                if log_due or ckpt_due or step >= total:
                    ok, terms, (streak, longest, skipped) = read_step(r, streaks)
                    streaks[1] = 0
                    logger.skipped = skipped
                    if skipped > reported_skips:
                        log.warning("non-finite loss: %d step(s) skipped by step %d (%d in a row now, %d in total)",
                                    skipped - reported_skips, step, streak, skipped)
                        reported_skips = skipped
                    if longest >= cfg.run.max_bad_steps:
                        raise TrainingDiverged(f"{longest} consecutive non-finite losses by step {step}; stopping. "
                                               + last_good(out))
                    if ok and log_due:
                        loss_v, ce, me_max, max_t, n_t = terms
                        logger.log(step, epoch, {"loss": loss_v, "ce": ce, "me_max": me_max, "num_targets": n_t,
                                                 "max_t": max_t, "lr": r.lr, "wd": r.wd, "momentum": r.momentum},
                                   skipped_images, first=first)
                    if ckpt_due and streak == 0:  # never mid-streak
                        save()
                if step % world_stop_every == 0 and stop_agreed(stop, device):
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

    t_trained = time.perf_counter()
    if cfg.run.eval_lowshot and info.world == 1 and eval_train is not None and eval_test is not None:
        report = lowshot_report(model, cfg, eval_train, eval_test, device)
        (out / "lowshot.json").write_text(json.dumps(report, indent=2))
    if cfg.run.time_budget > 0:
        now = time.perf_counter()
        log.info("time budget %.1f min: this process took %.1f min (%.1f to train, %.1f to evaluate)",
                 cfg.run.time_budget, (now - t_start) / 60, (t_trained - t_start) / 60, (now - t_trained) / 60)
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
