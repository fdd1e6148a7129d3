"""Run configuration: nested dataclasses, one per concern, every field overridable from the CLI.

`python -m msn_fast.train --model vit_l7 --optim.lr 5e-4 --data.path DIR` starts from the named
recipe (msn_fast/recipes.py) and overrides fields with typed, dotted flags (parsed by msn_fast/cli.py,
which reads the attribute docstrings below for `--help`). Every check names the flag, so a bad value is one
`error:` line. The view fields are dataloading's ViewRecipe, which DataConfig inherits. The resolved config
is written to `<run.out_dir>/config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import ClassVar

from msn_fast.dataloading.recipe import ViewRecipe


def _require(ok: bool, flag: str, rule: str, value) -> None:
    """A field check: `--<flag> must be <rule>; got <value>` (the trainer prints it as one `error:` line)."""
    if not ok:
        shown = " ".join(map(str, value)) if isinstance(value, tuple) else repr(value) if isinstance(value, str) \
            else value
        raise ValueError(f"--{flag} must be {rule}; got {shown}")


def _positive(section, flag_section: str, *names: str) -> None:
    """Each named int field of `section` is >= 1."""
    for name in names:
        _require(getattr(section, name) >= 1, f"{flag_section}.{name}", ">= 1", getattr(section, name))


def _finite_at_least(section, flag_section: str, low: float, *names: str) -> None:
    """Each named float field of `section` is a finite number >= low."""
    for name in names:
        v = getattr(section, name)
        _require(math.isfinite(v) and v >= low, f"{flag_section}.{name}", f"a finite number >= {low:g}", v)


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
    stem: str = "linear"
    """patch embedding: linear (the official P x P projection) | conv (3x3 stride-2 convs with BatchNorm, then 1x1)"""
    stem_hides_dropped: bool = False
    """with the conv stem, zero a masked view's dropped patches before the stem, so no kept token sees their pixels"""

    def __post_init__(self):
        _positive(self, "vit", "dim", "depth", "heads", "patch_size")
        _require(self.dim % self.heads == 0, "vit.dim", f"divisible by --vit.heads={self.heads}", self.dim)
        _require(self.img_size >= self.patch_size, "vit.img_size", f"at least --vit.patch_size={self.patch_size}",
                 self.img_size)
        _require(math.isfinite(self.mlp_ratio) and self.mlp_ratio > 0, "vit.mlp_ratio", "a finite number > 0",
                 self.mlp_ratio)
        _require(self.attn_impl in ("auto", "triton", "torch", "eager", "xformers"), "vit.attn_impl",
                 "auto, triton, torch, eager or xformers", self.attn_impl)
        _require(self.embed_impl in ("auto", "triton", "torch"), "vit.embed_impl", "auto, triton or torch",
                 self.embed_impl)
        _require(self.stem in ("linear", "conv"), "vit.stem", "linear or conv", self.stem)
        _require(self.stem == "linear" or (self.patch_size >= 2 and self.patch_size & (self.patch_size - 1) == 0),
                 "vit.patch_size", "a power of two (2, 4, 8, ...) with --vit.stem conv", self.patch_size)
        _require(not self.stem_hides_dropped or self.stem == "conv", "vit.stem_hides_dropped",
                 "false with --vit.stem linear (the projection never sees the dropped patches)",
                 self.stem_hides_dropped)


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

    def __post_init__(self):
        _positive(self, "head", "hidden_dim", "out_dim", "num_prototypes")


@dataclass(kw_only=True, slots=True)
class MaskConfig:
    ratio: float = 0.15
    """fraction of the anchor view's patches dropped (keep = floor(N·(1−ratio)))"""
    mode: str = "shared"
    """shared (official: one permutation per batch) | per_sample"""

    def __post_init__(self):
        _require(0.0 <= self.ratio < 1.0, "mask.ratio", "in [0, 1) (at least one patch is kept)", self.ratio)
        _require(self.mode in ("shared", "per_sample"), "mask.mode", "shared or per_sample", self.mode)


@dataclass(kw_only=True, slots=True)
class DataConfig(ViewRecipe):
    """The data, and the views' fields inherited from ViewRecipe (dataloading/recipe.py): global_size, focal_size,
    num_focal, global_scale, focal_scale, color_jitter, blur_prob. cfg.data is what the loaders take as the
    recipe, so the view parameters are defined once."""

    flag_prefix: ClassVar[str] = "--data."  # ViewRecipe's checks name the flags

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
    """loader worker processes (0: decode and augment in the training process, between steps; DALI: its threads)"""
    cache_mb: float = 1024.0
    """memory for decoded images kept from one epoch to the next, so each is decoded once (the torch loader with
    augment batched and num_workers 0; images past it are decoded every epoch; 0: off)"""

    def __post_init__(self):
        ViewRecipe.__post_init__(self)  # explicit: zero-argument super() fails in a slots dataclass
        _require(self.backend in ("torch", "dali"), "data.backend", "torch or dali", self.backend)
        _require(self.augment in ("per_image", "batched"), "data.augment", "per_image or batched", self.augment)
        _require(self.eval_split in ("auto", "val", "test"), "data.eval_split", "auto, val or test", self.eval_split)
        _require(self.batch_size >= 2, "data.batch_size", ">= 2 (BatchNorm in the head)", self.batch_size)
        _require(self.num_workers >= 0, "data.num_workers", ">= 0", self.num_workers)
        _require(math.isfinite(self.cache_mb) and self.cache_mb >= 0, "data.cache_mb", "a finite number >= 0",
                 self.cache_mb)


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
    symmetric: bool = False
    """both global views serve as target and as masked anchor, each predicting the other's target, with the focal
    views split between the two targets (data.num_focal must be even); off: view 0 is the target, view 1 the
    anchor and every focal view predicts view 0's target (official). A step costs about 1.5x; in an hour of
    cpu_photos on a CPU it scored level with the official (README, sweep round twelve)"""

    def __post_init__(self):
        for name in ("tau", "sharpen"):
            v = getattr(self, name)
            _require(math.isfinite(v) and v > 0, f"loss.{name}", "a finite number > 0 (it divides the logits)", v)
        _finite_at_least(self, "loss", 0, "me_max_weight")
        _require(self.sinkhorn_iters >= 0, "loss.sinkhorn_iters", ">= 0", self.sinkhorn_iters)
        _require(self.backend in ("auto", "triton", "torch"), "loss.backend", "auto, triton or torch", self.backend)


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
        _positive(self, "optim", "epochs")
        _finite_at_least(self, "optim", 0, "warmup_epochs", "start_lr", "lr", "final_lr", "weight_decay",
                         "final_weight_decay", "clip_grad")
        _finite_at_least(self, "optim", 1, "horizon_scale")
        for name in ("ema_start", "ema_end"):
            v = getattr(self, name)
            _require(0 <= v <= 1, f"optim.{name}", "a momentum in [0, 1]", v)
        _require(all(0 <= b < 1 for b in self.betas), "optim.betas", "two numbers in [0, 1)", self.betas)


@dataclass(kw_only=True, slots=True)
class DistConfig:
    param_dtype: str = "auto"
    """compute dtype of the encoders: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32; loss and prototypes stay fp32"""
    fsdp: str = "auto"
    """FSDP2 sharding: auto (on when several processes or bf16) | on | off (with several processes: each holds
    the whole model and the step averages the gradients, replicated data parallelism)"""
    activation_checkpointing: bool = False
    """recompute each ViT block in the backward instead of saving its activations"""
    compile: bool = False
    """torch.compile each ViT block"""
    optimizer: str = "auto"
    """auto (torch's fused AdamW) | apex (apex FusedAdam, CUDA, no FSDP)"""

    def __post_init__(self):
        _require(self.param_dtype in ("auto", "bf16", "fp32"), "dist.param_dtype", "auto, bf16 or fp32",
                 self.param_dtype)
        _require(self.fsdp in ("auto", "on", "off"), "dist.fsdp", "auto, on or off", self.fsdp)
        _require(self.optimizer in ("auto", "apex"), "dist.optimizer", "auto or apex", self.optimizer)


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
        _positive(self, "run", "log_every", "checkpoint_every", "eval_draws", "max_bad_steps", "keep_checkpoints")
        _require(self.max_steps >= 0, "run.max_steps", ">= 0 (0 = run all epochs)", self.max_steps)
        _require(math.isfinite(self.time_budget) and self.time_budget >= 0, "run.time_budget",
                 "a number of minutes >= 0 (0 = none)", self.time_budget)


@dataclass(kw_only=True, slots=True)
class Config:
    model: str = "vit_tiny"
    """model and recipe name: cpu_demo (CPU demo, 32 px digits), vit_tiny (DeiT-Ti, as these defaults), vit_s16,
    vit_b16, vit_b8, vit_b4, vit_l16, vit_l7, vit_h14"""
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
        if self.loss.symmetric and self.data.num_focal % 2:
            raise ValueError(
                f"loss.symmetric splits the focal views between the two targets: data.num_focal must be even, "
                f"got {self.data.num_focal}"
            )


def section_fields(section) -> list[dataclasses.Field]:
    """A section's fields, its own before those it inherits (DataConfig's view fields, from ViewRecipe): the order
    of `--help` and config.json."""
    own = type(section).__dict__.get("__annotations__", {})
    return sorted(dataclasses.fields(section), key=lambda f: f.name not in own)  # stable


def to_dict(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    return {k: {f.name: v[f.name] for f in section_fields(getattr(cfg, k))} if isinstance(v, dict) else v
            for k, v in d.items()}


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


MODEL_SHAPE_FIELDS = {"vit": ("dim", "depth", "heads", "patch_size", "img_size", "mlp_ratio", "stem"),
                      "head": ("hidden_dim", "out_dim", "use_bn", "num_prototypes")}
"""Fields that fix the weights' shapes or their layout (`heads` splits the same qkv weights differently): a resumed
run must keep them."""

RESUME_IGNORED = {("run", "resume"), ("run", "out_dir")}


def config_changes(saved: dict, cfg: Config) -> list[tuple[str, object, object]]:
    """(flag, saved value, this run's value) for each field of `cfg` that differs from `saved` (a checkpoint's
    config dict, `to_dict`'s form), in config.json's order. Fields `saved` does not hold (an older version's
    checkpoint) and `RESUME_IGNORED` are left out."""
    def norm(v):
        return list(v) if isinstance(v, tuple) else v

    if not isinstance(saved, dict):
        return []
    now = to_dict(cfg)
    out = []
    if "model" in saved and saved["model"] != now["model"]:
        out.append(("--model", saved["model"], now["model"]))
    for sec, fields in now.items():
        if not isinstance(fields, dict) or not isinstance(saved.get(sec), dict):
            continue
        for name, v in fields.items():
            if (sec, name) in RESUME_IGNORED or name not in saved[sec]:
                continue
            if norm(saved[sec][name]) != norm(v):
                out.append((f"--{sec}.{name}", saved[sec][name], v))
    return out


def check_resume_shapes(saved: dict, cfg: Config, where: str) -> None:
    """Raises ValueError naming the flags when a resumed run (`cfg`) would change a weight shape or layout
    (MODEL_SHAPE_FIELDS) of its checkpoint's (`saved`, from `where`). Other changes are `config_changes`' to list:
    the trainer warns with them (they change the run from the resumed step on)."""
    shape_flags = {f"--{sec}.{name}" for sec, names in MODEL_SHAPE_FIELDS.items() for name in names}
    shape = [c for c in config_changes(saved, cfg) if c[0] in shape_flags]
    if shape:
        said = ", ".join(f"{f} {old} (this run: {new})" for f, old, new in shape)
        raise ValueError(f"--run.resume: the checkpoint {where} holds a model with {said}; resume with the same "
                         "model settings, or start a new run in another --run.out_dir")
