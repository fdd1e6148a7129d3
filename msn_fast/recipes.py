"""Named recipes: functions returning a full Config with the official hyperparameters.

Official settings (msn_spec.md): AdamW, lr 2e-4 -> 1e-3 over 15 warm-up epochs then cosine to 1e-6,
wd 0.04 -> 0.4, EMA 0.996 -> 1.0, all over 1.25× the run; clip 3.0; tau 0.1, T 0.25, Sinkhorn on,
ME-MAX λ 1; 1 masked 224 px anchor + 10 unmasked 96 px focal views; batch 1024 in total.
Mask ratios (paper App. A.1): S/16 0.15, B/16 and B/8 0.3, B/4 and L/7 0.7, L/16 0.5 (Table 8).
Epochs: S/16 800, B/16 B/8 L/16 600, B/4 300, L/7 200. H/14 and Ti/16 (`vit_tiny`, DeiT-Ti) are not in
the paper: our choice. `cpu_demo` (the trainer's default) is the CPU demo: the embedded digits at 32 px,
a 128-wide ViT sized to train in minutes.
"""

from __future__ import annotations

from collections.abc import Callable

from .config import Config, DataConfig, HeadConfig, LossConfig, MaskConfig, OptimConfig, RunConfig, ViTConfig
from .vit import ALIASES, get_arch


def _official(name: str, mask_ratio: float, epochs: int, batch_size: int = 64, arch: str | None = None) -> Config:
    a = get_arch(arch or name)
    return Config(
        model=name,
        vit=ViTConfig(dim=a.dim, depth=a.depth, heads=a.heads, patch_size=a.patch_size, img_size=224),
        mask=MaskConfig(ratio=mask_ratio),
        data=DataConfig(batch_size=batch_size),
        optim=OptimConfig(epochs=epochs),
        run=RunConfig(out_dir=f"runs/{name}"),
    )


def cpu_demo() -> Config:
    """CPU demo on the embedded digits (8x8 scans upsampled to 32 px): 480 steps of a 0.5M-parameter ViT.

    Milder crops than the official ones (a 16 px focal crop of 5% of a digit shows nothing), no blur
    (the digits are already blurry), MLP ratio 2 (30% fewer FLOPs, accuracy within 1 point), the released
    config's loss (Sinkhorn on, ME-MAX λ 1) over 16 prototypes, and a short-run EMA (0.9 -> 1) and lr
    (2e-3). Measured on 2 CPU cores (README, "Measured"): with EMA 0.99 -> 1 the target lags a run
    this short, and with Sinkhorn off the targets collapse onto 1-4 prototypes; lr 3e-3 or no colour
    jitter leave the encoder level with random weights. The batched augmentation runs in the training process
    (`num_workers` 0): with every core training, a loader worker only takes cycles from the GEMM threads
    (README, "Batched augmentation": as fast or faster in every pair measured at commit 9d30344 but one; after
    the CLS-only last block, which placement was faster changed from run to run).
    """
    return Config(
        model="cpu_demo",
        vit=ViTConfig(dim=128, depth=4, heads=4, patch_size=4, img_size=32, mlp_ratio=2.0),
        head=HeadConfig(hidden_dim=512, out_dim=128, num_prototypes=16),
        mask=MaskConfig(ratio=0.3),
        data=DataConfig(batch_size=32, num_workers=0, global_size=32, focal_size=16, num_focal=4,
                        global_scale=(0.5, 1.0), focal_scale=(0.25, 0.6), blur_prob=0.0, augment="batched"),
        loss=LossConfig(sinkhorn_iters=3, me_max_weight=1.0),
        optim=OptimConfig(epochs=12, warmup_epochs=1, start_lr=2e-4, lr=2e-3, horizon_scale=1.0, ema_start=0.9),
        run=RunConfig(out_dir="runs/cpu_demo", log_every=10, checkpoint_every=200, eval_draws=5),
    )


def cpu_photos() -> Config:
    """Small photographs (32 px, e.g. CIFAR-10) on a 2-core CPU within a wall-clock hour (`run.time_budget` 60).

    The CPU demo's ViT, views (global crop scale (0.5, 1), no blur) and loss, with the official peak lr 1e-3 (from
    1e-4; the official start is 2e-4) and an EMA from 0.99 to 1 (the official start is 0.996): on a held-out part
    of CIFAR-10's train split they gave 25.0% 5-shot against 23.4%
    for the demo's 2e-3 / 0.9 after 15 minutes (17 for the 25.0 run), and 25.1% against 23.3% for the official
    global crop scale (0.3, 1) in a paired run (README, "Label efficiency on real data", with the other settings
    tried). The schedule spans what the budget fits, so the warm-up is half an epoch; 1000 epochs is only a cap. It
    was 100, which a small set reaches early: on 600 held-out CIFAR-10 train images with a 15-minute budget, the
    100-epoch run stopped after 4.9 minutes at 19.4 / 22.0 / 25.2% (1 / 2 / 5 shots), the 1000-epoch cap trained
    all 15 (300 epochs) to 21.1 / 23.0 / 28.3 (same draws; README, "What limits it").
    A conv stem (`vit.stem conv`: two 3x3 stride-2 convolutions, then 1x1) in place of the linear patch projection:
    in two paired 15-minute runs (seeds 0 and 1) it scored +1.3 / +0.3 / +1.1 and +0.6 / +1.0 / +0.6 points at
    1 / 2 / 5 shots, though its steps cost 7% more. Its overlapping windows let the masked anchor see most of the
    dropped patches' pixels (vit.ConvStem); hiding them (`vit.stem_hides_dropped`) moved one paired run by -0.8 / -0.2
    / +0.3 points (± 0.3-0.4): at 1 shot hiding cost about what the stem gained there, so part of that gain may be
    the weaker mask's; not settled. 64 prototypes in place of 16 moved nothing (-0.5 / +0.7 / +0.3, paired draws).
    Half or twice the lr, mask ratio 0.15 or 0.5, EMA start 0.996, no focal views or 8 of them, focal scale (0.05, 0.3),
    sharpening 0.5 and tau 0.05 gained at most 0.2 points at any shot count, and most lost 0.5-1.8 at 5 shots
    (the sweep's eighth round). Run for the full 60 minutes (ninth round), D 192 / depth 6, EMA start 0.996 and
    mask ratio 0.5 each scored below it (D 192 by 2.5 / 1.8 / 4.6 points). The official 1.25x schedule horizon
    (`optim.horizon_scale`; the demo's 1.0 ends lr at 1e-6 and the EMA at 1): in a 60-minute run on the held-out
    split (tenth round) it scored +0.5 / +0.5 / +1.5 points (± 0.3 / 0.3 / 0.2, paired draws, against a control
    run three hours before), so `cpu_photos` takes it: the last quarter of the hour keeps an lr of 1e-4 or more
    and an EMA momentum of at most 0.998. EMA start 0.98 was level with 0.99, colour jitter 0.25 lost 1.2 / 0.6
    / 1.7 points, and 1.0 moved +1.3 / -0.1 / +1.2 (± 0.6-0.8) beside the horizon-1.0 control, then +1.6 / -1.1 /
    -0.3 (± 0.6-0.7) beside a control with the new horizon (eleventh round): the two agree only at 1 shot, so the
    official 0.5 stays.
    """
    cfg = cpu_demo()
    cfg.model = "cpu_photos"
    cfg.vit.stem = "conv"
    cfg.optim.epochs, cfg.optim.warmup_epochs = 1000, 0.5  # a cap: the time budget plans the steps
    cfg.optim.start_lr, cfg.optim.lr, cfg.optim.ema_start = 1e-4, 1e-3, 0.99
    cfg.optim.horizon_scale = 1.25  # the official horizon (the demo's is 1.0)
    cfg.run = RunConfig(out_dir="runs/cpu_photos", log_every=50, checkpoint_every=500, eval_draws=5, time_budget=60.0)
    return cfg


def _with_loss(cfg: Config, sinkhorn: int, lam: float) -> Config:
    cfg.loss.sinkhorn_iters, cfg.loss.me_max_weight = sinkhorn, lam
    return cfg


RECIPES: dict[str, Callable[[], Config]] = {
    "cpu_demo": cpu_demo,
    "cpu_photos": cpu_photos,
    # DeiT-Ti is not in the paper: set as ViT-S/16, its smallest model (the paper's mask ratios grow with size).
    "vit_tiny": lambda: _official("vit_tiny", 0.15, 800),
    "vit_s16": lambda: _official("vit_s16", 0.15, 800),
    # The paper's best ViT-S/16 setting (Table 11, footnote 1): no Sinkhorn, ME-MAX λ = 5.
    "vit_s16_paper": lambda: _with_loss(_official("vit_s16_paper", 0.15, 800, arch="vit_s16"), sinkhorn=0, lam=5.0),
    "vit_b16": lambda: _official("vit_b16", 0.3, 600),
    "vit_b8": lambda: _official("vit_b8", 0.3, 600),
    "vit_b4": lambda: _official("vit_b4", 0.7, 300, batch_size=8),
    "vit_l16": lambda: _official("vit_l16", 0.5, 600, batch_size=32),
    "vit_l7": lambda: _official("vit_l7", 0.7, 200, batch_size=16),
    "vit_h14": lambda: _official("vit_h14", 0.7, 300, batch_size=16),
}


def get_recipe(name: str) -> Config:
    name = ALIASES.get(name, name)
    if name not in RECIPES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list(RECIPES) + list(ALIASES))}")
    return RECIPES[name]()
