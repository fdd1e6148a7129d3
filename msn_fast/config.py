"""Run configuration: nested dataclasses, one per concern, every field overridable from the CLI.

`python -m msn_fast.train --model vit_l7 --optim.lr 5e-4 --data.path DIR` starts from the named
recipe (msn_fast/recipes.py) and overrides fields with typed, dotted flags (parsed by msn_fast/cli.py,
which reads the attribute docstrings below for `--help`). The resolved config is written to
`<run.out_dir>/config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field


@dataclass(kw_only=True, slots=True)
class ViTConfig:
    dim: int = 192
    """embedding width D"""
    depth: int = 12
    """number of transformer blocks"""
    heads: int = 3
    """attention heads"""
    patch_size: int = 16
    """patch side in pixels"""
    img_size: int = 224
    """image side the position embedding is learned at (the global views' size)"""
    mlp_ratio: float = 4.0
    """MLP hidden width / D"""
    attn_impl: str = "auto"
    """attention backend: auto | triton | torch (SDPA) | eager | xformers"""
    embed_impl: str = "auto"
    """kept-patch embedding backend of the masked view: auto | triton | torch"""

    def __post_init__(self):
        if self.dim % self.heads:
            raise ValueError(f"vit.dim={self.dim} must be divisible by vit.heads={self.heads}")
        if self.img_size < self.patch_size:
            raise ValueError(f"vit.img_size={self.img_size} is smaller than vit.patch_size={self.patch_size}")
        if self.attn_impl not in ("auto", "triton", "torch", "eager", "xformers"):
            raise ValueError(f"vit.attn_impl={self.attn_impl!r}: choose auto, triton, torch, eager or xformers")
        if self.embed_impl not in ("auto", "triton", "torch"):
            raise ValueError(f"vit.embed_impl={self.embed_impl!r}: choose auto, triton or torch")


@dataclass(kw_only=True, slots=True)
class HeadConfig:
    hidden_dim: int = 2048
    """projection head hidden width"""
    out_dim: int = 256
    """projection head output (prototype) dimension"""
    use_bn: bool = True
    """BatchNorm in the projection head"""
    num_prototypes: int = 1024
    """number of learned prototypes K"""


@dataclass(kw_only=True, slots=True)
class MaskConfig:
    ratio: float = 0.15
    """fraction of the anchor view's patches dropped (keep = floor(N·(1−ratio)))"""
    mode: str = "shared"
    """shared (official: one permutation per batch) | per_sample"""

    def __post_init__(self):
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"mask.ratio={self.ratio} must be in [0, 1)")
        if self.mode not in ("shared", "per_sample"):
            raise ValueError(f"mask.mode={self.mode!r}: choose shared or per_sample")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    path: str | None = None
    """image folder (DIR/<class>/*.jpg or DIR/*.jpg; train/ + val/ or test/ splits), WebDataset shards
    ('shards/train-{000000..000127}.tar'), or None for the embedded digits dataset"""
    eval_split: str = "auto"
    """held-out split scored by the end-of-run low-shot evaluation: auto (val, else test) | val | test"""
    backend: str = "torch"
    """data loader: torch (fallback, everywhere) | dali"""
    augment: str = "per_image"
    """torch loader's augmentation: per_image (torchvision on each image) | batched (one tensor pass per batch)"""
    batch_size: int = 64
    """images per step (per process)"""
    num_workers: int = 2
    """loader worker processes"""
    global_size: int = 224
    """side of the target and anchor views"""
    focal_size: int = 96
    """side of the focal views"""
    num_focal: int = 10
    """focal views per image (official: 10)"""
    global_scale: tuple[float, float] = (0.3, 1.0)
    """random-resized-crop area range of the global views"""
    focal_scale: tuple[float, float] = (0.05, 0.3)
    """random-resized-crop area range of the focal views"""
    color_jitter: float = 0.5
    """colour-jitter strength s (brightness/contrast/saturation 0.8s, hue 0.2s), applied with p=0.8"""
    blur_prob: float = 0.5
    """probability of Gaussian blur"""

    def __post_init__(self):
        if self.backend not in ("torch", "dali"):
            raise ValueError(f"data.backend={self.backend!r}: choose torch or dali")
        if self.augment not in ("per_image", "batched"):
            raise ValueError(f"data.augment={self.augment!r}: choose per_image or batched")
        if self.eval_split not in ("auto", "val", "test"):
            raise ValueError(f"data.eval_split={self.eval_split!r}: choose auto, val or test")
        if self.batch_size < 2:
            raise ValueError(f"data.batch_size={self.batch_size} must be at least 2 (BatchNorm in the head)")
        if self.num_focal < 0:
            raise ValueError(f"data.num_focal={self.num_focal} must be >= 0")


@dataclass(kw_only=True, slots=True)
class LossConfig:
    """The MSN objective. No label smoothing of the one-hot prototype labels: the official default
    is 0 and only 0 is implemented (README, "Deliberate differences from the official code")."""

    tau: float = 0.1
    """anchor softmax temperature"""
    sharpen: float = 0.25
    """target sharpening T (target temperature tau·T)"""
    me_max_weight: float = 1.0
    """lambda of the ME-MAX regulariser"""
    sinkhorn_iters: int = 3
    """Sinkhorn iterations on the targets (0 = off)"""
    backend: str = "auto"
    """loss backend: auto | triton | torch"""

    def __post_init__(self):
        for name in ("tau", "sharpen"):
            v = getattr(self, name)
            if not math.isfinite(v) or v <= 0:
                raise ValueError(f"loss.{name}={v} must be a finite number > 0 (it divides the logits)")
        if not math.isfinite(self.me_max_weight) or self.me_max_weight < 0:
            raise ValueError(f"loss.me_max_weight={self.me_max_weight} must be a finite number >= 0")
        if self.sinkhorn_iters < 0:
            raise ValueError(f"loss.sinkhorn_iters={self.sinkhorn_iters} must be >= 0")
        if self.backend not in ("auto", "triton", "torch"):
            raise ValueError(f"loss.backend={self.backend!r}: choose auto, triton or torch")


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    epochs: int = 800
    """training epochs (the schedules' nominal length)"""
    warmup_epochs: float = 15
    """linear lr warm-up epochs"""
    start_lr: float = 2e-4
    """lr at step 0"""
    lr: float = 1e-3
    """peak lr (reached after warm-up)"""
    final_lr: float = 1e-6
    """lr at the end of the cosine horizon"""
    weight_decay: float = 0.04
    """weight decay at step 0"""
    final_weight_decay: float = 0.4
    """weight decay at the end of the horizon"""
    ema_start: float = 0.996
    """EMA momentum of the target at step 0"""
    ema_end: float = 1.0
    """EMA momentum at the end of the horizon"""
    horizon_scale: float = 1.25
    """official trick: schedules run over horizon_scale × the training length (1.0 = end at their end values)"""
    clip_grad: float = 3.0
    """gradient-norm clip of the encoder (0 = off); prototypes are not clipped"""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas"""

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"optim.epochs={self.epochs} must be >= 1")
        if self.horizon_scale < 1.0:
            raise ValueError(f"optim.horizon_scale={self.horizon_scale} must be >= 1")


@dataclass(kw_only=True, slots=True)
class DistConfig:
    param_dtype: str = "auto"
    """compute dtype of the encoders: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32; loss and prototypes stay fp32"""
    fsdp: str = "auto"
    """FSDP2 sharding: auto (on when several processes or bf16) | on | off"""
    activation_checkpointing: bool = False
    """recompute each ViT block in the backward instead of saving its activations"""
    compile: bool = False
    """torch.compile each ViT block"""
    optimizer: str = "auto"
    """auto (torch's fused AdamW) | apex (apex FusedAdam, CUDA, no FSDP)"""

    def __post_init__(self):
        if self.param_dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"dist.param_dtype={self.param_dtype!r}: choose auto, bf16 or fp32")
        if self.fsdp not in ("auto", "on", "off"):
            raise ValueError(f"dist.fsdp={self.fsdp!r}: choose auto, on or off")
        if self.optimizer not in ("auto", "apex"):
            raise ValueError(f"dist.optimizer={self.optimizer!r}: choose auto or apex")


@dataclass(kw_only=True, slots=True)
class RunConfig:
    out_dir: str = "runs/msn"
    """where the config, metrics, checkpoints and report go"""
    seed: int = 0
    """random seed"""
    device: str = "auto"
    """auto (cuda if available) | cpu | cuda | cuda:N"""
    max_steps: int = 0
    """stop after this many steps (0 = run all epochs); the schedules then decay over these steps"""
    time_budget: float = 0.0
    """wall-clock minutes for the whole run, end-of-run evaluation included (0 = none): the steps that fit are
    planned from the first steps' speed and the schedules decay over them"""
    log_every: int = 10
    """steps between log lines"""
    checkpoint_every: int = 500
    """steps between checkpoints (and one at the end, and on Ctrl-C/SIGTERM)"""
    eval_lowshot: bool = True
    """after training, low-shot logistic regression on the embedded dataset or on data.path's labels"""
    eval_draws: int = 5
    """random draws of the labelled images per shot count"""
    resume: bool = False
    """continue from the latest checkpoint in <out_dir>/checkpoints if there is one"""
    max_bad_steps: int = 10
    """stop after this many consecutive non-finite losses (each is skipped and counted; checked at log lines)"""
    keep_checkpoints: int = 2
    """complete checkpoints kept on disk (the newest ones; at least 1)"""

    def __post_init__(self):
        if self.keep_checkpoints < 1:
            raise ValueError(f"run.keep_checkpoints={self.keep_checkpoints} must be >= 1")
        if self.checkpoint_every < 1:
            raise ValueError(f"run.checkpoint_every={self.checkpoint_every} must be >= 1")
        if not (math.isfinite(self.time_budget) and self.time_budget >= 0):
            raise ValueError(f"run.time_budget={self.time_budget} must be a number of minutes >= 0 (0 = none)")
        if self.max_bad_steps < 1:
            raise ValueError(f"run.max_bad_steps={self.max_bad_steps} must be >= 1")


@dataclass(kw_only=True, slots=True)
class Config:
    model: str = "vit_tiny"
    """model and recipe name: vit_tiny, vit_s16, vit_b16, vit_b8, vit_b4, vit_l16, vit_l7, vit_h14"""
    vit: ViTConfig = field(default_factory=ViTConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        if self.data.global_size < self.vit.patch_size or self.data.focal_size < self.vit.patch_size:
            raise ValueError(
                f"views ({self.data.global_size} and {self.data.focal_size} px) must be at least one patch "
                f"({self.vit.patch_size} px)"
            )


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_json(cfg) -> str:
    return json.dumps(to_dict(cfg), indent=2)


def from_dict(d: dict) -> Config:
    """Inverse of `to_dict` (tuples restored from JSON lists)."""
    sections = {}
    for f in dataclasses.fields(Config):
        if f.name == "model":
            continue
        section_cls = {"vit": ViTConfig, "head": HeadConfig, "mask": MaskConfig, "data": DataConfig,
                       "loss": LossConfig, "optim": OptimConfig, "dist": DistConfig, "run": RunConfig}[f.name]
        vals = {k: tuple(v) if isinstance(v, list) else v for k, v in d.get(f.name, {}).items()}
        sections[f.name] = section_cls(**vals)
    return Config(model=d.get("model", "vit_tiny"), **sections)
