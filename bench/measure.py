"""Device-independent measures of an MSN training step: bytes saved for backward, counted FLOPs, a memory model.

- `SavedBytes`: counts what autograd keeps for the backward (saved_tensors_hooks), one count per storage,
  parameters excluded; blocks under activation checkpointing report their kept input explicitly.
- `flop_counter`: torch.utils.flop_counter.FlopCounterMode plus formulas for the attention ops it does not
  know (CPU flash SDPA, msn_fast::attention_fwd/bwd), so attention FLOPs count the same on every path
  (torch's SDPA convention: backward = 2.5 x forward, the recomputed scores included, as flash kernels do).
- `step_costs`: FLOPs and saved bytes per image of the real step (target fwd, anchor + focal fwd/bwd, loss)
  on fake tensors: no memory is allocated, so ViT-L/7 is measured on a laptop. bf16 parameters, as FSDP2's
  `param_dtype` gives (autocast would also save its bf16 weight copies: trainer_data_notes.md section 5).
- `max_batch_per_gpu`: the largest per-GPU batch that fits, FSDP-sharded states plus bf16 activations.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


class SavedBytes:
    """Context manager: bytes of the tensors autograd saves for backward while active.

    Each storage counts once (views of one buffer share it); `exclude` storages (the parameters) never
    count. Works on real, meta and fake tensors (keys are storage identities, not data pointers).
    """

    _active: SavedBytes | None = None

    def __init__(self, exclude=()):
        self._skip = {StorageWeakRef(t.untyped_storage()).cdata for t in exclude}
        self._seen: set[int] = set()
        self._keep: list[torch.Tensor] = []  # keeps counted storages alive, so an address is never reused
        self.total = 0
        self.storages = 0

    def add(self, t: torch.Tensor) -> torch.Tensor:
        key = StorageWeakRef(t.untyped_storage()).cdata
        if key not in self._skip and key not in self._seen:
            self._seen.add(key)
            self._keep.append(t)
            self.total += t.untyped_storage().nbytes()
            self.storages += 1
        return t

    def __enter__(self) -> SavedBytes:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.add, lambda t: t)
        self._hooks.__enter__()
        self._prev, SavedBytes._active = SavedBytes._active, self
        return self

    def __exit__(self, *exc) -> None:
        SavedBytes._active = self._prev
        self._hooks.__exit__(*exc)
        self._keep.clear()


class CheckpointedBlock(nn.Module):
    """Activation checkpointing of one block (torch.utils.checkpoint, non-reentrant): the backward recomputes it.

    The checkpoint keeps the block's input outside autograd's saved tensors, so it is reported to an active
    `SavedBytes` here. Parameter names keep the `block.` prefix; parameter order is unchanged (EMA zips).
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """kwargs go to the block (the ViT's last block is called with cls_only=True)."""
        if not torch.is_grad_enabled():
            return self.block(x, **kwargs)
        if SavedBytes._active is not None:
            SavedBytes._active.add(x)
        return checkpoint(self.block, x, use_reentrant=False, preserve_rng_state=False, **kwargs)


def checkpoint_blocks(trunk: nn.Module) -> None:
    """Wrap every block of a VisionTransformer trunk in `CheckpointedBlock` (in place)."""
    for i, blk in enumerate(trunk.blocks):
        if not isinstance(blk, CheckpointedBlock):
            trunk.blocks[i] = CheckpointedBlock(blk)


def _attention_flops():
    """FlopCounterMode formulas for the attention ops it has no entry for (shapes in, FLOPs out)."""

    def fwd(q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(q, k, v)

    def bwd(do, q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(do, q, k, v)

    mapping = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: fwd,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd,
    }
    if hasattr(torch.ops, "msn_fast") and hasattr(torch.ops.msn_fast, "attention_fwd"):
        mapping[torch.ops.msn_fast.attention_fwd] = fwd
        mapping[torch.ops.msn_fast.attention_bwd] = bwd
    return mapping


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode that also counts attention on the CPU flash path and the msn_fast Triton op."""
    import msn_fast.kernels  # noqa: F401  (registers msn_fast::attention_*)

    return FlopCounterMode(display=False, custom_mapping=_attention_flops())


@dataclass
class StepCosts:
    """Per-image costs of one training step at one mask ratio (bf16 parameters and activations)."""

    model: str
    mask_ratio: float
    depth: int
    tokens: dict  # per image: target, anchor, focal (CLS included)
    flops_per_image: float  # target fwd + student fwd and bwd + loss (no activation-checkpointing recompute)
    saved_bytes_per_image: float  # saved for backward, no activation checkpointing
    saved_bytes_per_image_ac: float | None  # with every student block checkpointed (its input kept)
    block_saved_bytes_per_image: float  # what one block saves (recomputed into memory under AC)
    student_params: int
    target_params: int
    block_params: int
    prototype_params: int
    extrapolation_error: float | None  # exact vs extrapolated from depths 1 and 2 (None: not run at full depth)

    def as_dict(self) -> dict:
        return asdict(self)


def _tokens(cfg, ratio: float) -> dict:
    v, d = cfg.vit, cfg.data
    n = (d.global_size // v.patch_size) ** 2
    kept = n if ratio == 0 else max(1, math.floor(n * (1 - ratio)))
    return {"target": 1 + n, "anchor": 1 + kept, "focal": d.num_focal * (1 + (d.focal_size // v.patch_size) ** 2)}


def _fake_model(cfg, depth: int, dtype: torch.dtype):
    from msn_fast.model import MSN

    cfg = copy.deepcopy(cfg)
    cfg.vit.depth = depth
    cfg.vit.attn_impl = cfg.vit.embed_impl = "torch"  # CPU fake tensors: SDPA (saves out + logsumexp, like Triton)
    cfg.loss.backend = "torch"
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # `.to(bf16)` does not work on fake tensors; build in bf16 instead
    try:
        model = MSN(cfg, device="meta")  # prototypes stay fp32 (init_prototypes), as in the trainer
    finally:
        torch.set_default_dtype(old)
    return model, cfg


def _fake_run(cfg, ratio: float, depth: int, batch: int, checkpointing: bool, backward: bool, dtype) -> tuple:
    """(flops, saved bytes, parameter counts) of one step of a `depth`-block copy of cfg's model, fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    model, cfg = _fake_model(cfg, depth, dtype)
    cfg.mask.ratio = ratio
    # allow_non_fake_inputs: to_empty() turns the meta parameters into fake ones; ShapeEnv: the loss's
    # statistics (torch.unique) have a data-dependent size.
    with FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv()):
        model.to_empty(device="cpu")
        if checkpointing:
            checkpoint_blocks(model.student.trunk)
        d = cfg.data
        globals_ = torch.empty(2, batch, 3, d.global_size, d.global_size, dtype=dtype)
        focals = torch.empty(d.num_focal, batch, 3, d.focal_size, d.focal_size, dtype=dtype)
        counter = SavedBytes(exclude=list(model.parameters()))
        with flop_counter() as flops:
            with counter:
                loss, _ = model.loss(globals_, focals)
            if backward:
                loss.backward()
        block = model.student.trunk.blocks[0]
        return flops.get_total_flops(), counter.total, _params(model, block)


def _params(model, block) -> dict:
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {
        "student": n(model.student),
        "target": n(model.target),
        "block": n(block),
        "prototypes": model.prototypes.numel(),
    }


def step_costs(
    cfg, ratio: float, *, batch: int = 2, dtype=torch.bfloat16, with_ac: bool = True, exact: bool = False
) -> StepCosts:
    """FLOPs and bytes saved for backward per image for `cfg`'s model at mask `ratio`, on fake tensors.

    Every block but the last (CLS row only) is the same, so every cost is a + depth·b (the last block's
    difference is in a): measured at depths 1 and 2 and extrapolated.
    `exact=True` also runs the full depth, uses it, and records the extrapolation's relative error.
    `with_ac=False` skips the activation-checkpointing runs (their fields are then None).
    batch >= 2: the projection head's BatchNorm needs two rows.
    """
    depth = cfg.vit.depth
    runs = {}
    for dep in sorted({1, 2} | ({depth} if exact else set())):
        f, s, p = _fake_run(cfg, ratio, dep, batch, checkpointing=False, backward=True, dtype=dtype)
        s_ac = _fake_run(cfg, ratio, dep, batch, checkpointing=True, backward=False, dtype=dtype)[1] if with_ac else 0
        runs[dep] = (f, s, s_ac, p)
    (f1, s1, a1, p1), (f2, s2, a2, p2) = runs[1], runs[2]
    lin = lambda y1, y2: y1 + (depth - 1) * (y2 - y1)  # noqa: E731
    f, s, s_ac = lin(f1, f2), lin(s1, s2), lin(a1, a2)
    p = {k: lin(p1[k], p2[k]) for k in p1}
    error = None
    if depth in runs:
        fe, se, ae, p = runs[depth]
        error = max(abs(x - y) / max(abs(y), 1) for x, y in ((f, fe), (s, se), (s_ac, ae)))
        f, s, s_ac = fe, se, ae
    return StepCosts(
        model=cfg.model, mask_ratio=ratio, depth=depth, tokens=_tokens(cfg, ratio), flops_per_image=f / batch,
        saved_bytes_per_image=s / batch, saved_bytes_per_image_ac=s_ac / batch if with_ac else None,
        block_saved_bytes_per_image=(s2 - s1) / batch, student_params=p["student"], target_params=p["target"],
        block_params=p2["block"], prototype_params=p["prototypes"], extrapolation_error=error,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------- memory model

H200_BYTES = 141e9
GIB = 2**30


def memory_terms(costs: StepCosts, *, world: int, checkpointing: bool) -> tuple[float, float]:
    """(fixed bytes per GPU, bytes per image) of a step under FSDP2 over `world` GPUs, fp32 master, bf16 compute.

    Fixed: student fp32 params + fp32 grads + 2 fp32 Adam moments and the fp32 EMA target, all sharded over
    `world`; prototypes replicated (fp32 value, grad, 2 moments); the unsharded working set (2 blocks
    prefetched: bf16 params + fp32 grads before reduce-scatter; the student's unsharded root).
    Per image: saved activations, plus one block's activations again (its gradients during its backward;
    under checkpointing the recomputed block as well: 2 blocks).
    """
    c = costs
    if checkpointing and c.saved_bytes_per_image_ac is None:
        raise ValueError("memory_terms(checkpointing=True) needs costs computed with_ac=True")
    sharded = (c.student_params * (4 + 4 + 8) + c.target_params * 4) / world
    root = c.student_params - c.block_params * c.depth
    unsharded = 2 * c.block_params * (2 + 4) + root * (2 + 4)
    fixed = sharded + c.prototype_params * 16 + unsharded
    act = c.saved_bytes_per_image_ac if checkpointing else c.saved_bytes_per_image
    return fixed, act + (2 if checkpointing else 1) * c.block_saved_bytes_per_image


def max_batch_per_gpu(
    costs: StepCosts,
    *,
    world: int = 8,
    gpu_bytes: float = H200_BYTES,
    checkpointing: bool,
    headroom: float = 0.10,
    reserved: float = 3 * GIB,
) -> dict:
    """Largest per-GPU batch that fits (`memory_terms`), leaving `headroom` of the memory to the allocator's
    fragmentation and `reserved` bytes to the CUDA context, NCCL and cuBLAS workspaces."""
    fixed, per_image = memory_terms(costs, world=world, checkpointing=checkpointing)
    usable = gpu_bytes * (1 - headroom) - reserved
    fits = max(0, int((usable - fixed) // per_image))
    return {
        "world": world,
        "gpu_bytes": gpu_bytes,
        "checkpointing": checkpointing,
        "fixed_bytes": fixed,
        "per_image_bytes": per_image,
        "usable_bytes": usable,
        "max_batch_per_gpu": fits,
        "max_global_batch": fits * world,
    }


# ------------------------------------------------------------------------------------------------ GPU peak


def measured_bf16_peak(device: torch.device, n: int = 8192, iters: int = 20) -> float:
    """Dense bf16 matmul throughput (FLOP/s) of this GPU: median of `iters` n×n×n products."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * n**3 / times[len(times) // 2]
