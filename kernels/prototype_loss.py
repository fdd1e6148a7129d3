"""The MSN prototype objective: cross-entropy to sharpened targets plus the ME-MAX regulariser.

Paper Eq. 1 (arXiv 2204.07141) and the official recipe (see msn_spec.md, section 3):
  p   = softmax(ẑ q̂ᵀ / τ)                 anchors, all V views (view-major rows)
  p⁺  = softmax(ẑ⁺ q̂ᵀ / (τ·T))            targets, no gradient; == sharpen(softmax(·/τ), T)
  p⁺  = sinkhorn(p⁺)                      optional, 3 iterations, sums over all processes
  L   = mean_rows H(p⁺, p) + λ·(Σ p̄ log p̄ + log K),  p̄ = mean of p over all anchor rows of all processes
Everything runs in fp32 via log_softmax (never log(p ** -t)). The cross-entropy uses the view
repetition of the targets by broadcasting, without materialising it. `msn_prototype_loss_ref` is the
eager version; backend="triton" runs the fused kernels of prototype_loss_triton.py through
`MsnPrototypeLossFunction` (gradient formulas in its docstring and in kernels_notes.md section 3).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import prototype_loss_triton as tri
from . import selfcheck
from ._utils import check_dtype, check_finite, check_int, check_same_device, resolve_backend

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class LossStats(NamedTuple):
    """What the trainer logs, as 0-dim detached tensors."""

    ce: torch.Tensor  # cross-entropy term
    me_max: torch.Tensor  # Σ p̄ log p̄ + log K  (0 at a uniform mean prediction)
    num_targets: torch.Tensor  # number of distinct argmax prototypes among the local targets
    max_target_prob: torch.Tensor  # mean over targets of max_k p⁺_k


class _Local:
    """A process group of this process alone: no collectives (the self-check of one rank's slice)."""

    def __repr__(self) -> str:
        return "msn_fast.kernels.prototype_loss.LOCAL"


LOCAL = _Local()


def _world(group) -> int:
    if group is LOCAL:
        return 1
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


class _AllReduceMean(torch.autograd.Function):
    """Mean across processes in the forward; identity in the backward.

    Identity is the right backward because the gradients of the replicated loss are themselves
    averaged across processes by DDP/FSDP (the official code's AllReduce does the same).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        world = _world(group)
        if world == 1:
            return x.clone()
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x / world

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    if _world(group) > 1:
        dist.all_reduce(x, group=group)
    return x


@torch.no_grad()
def sinkhorn(probs: torch.Tensor, iters: int = 3, process_group=None) -> torch.Tensor:
    """Sinkhorn-Knopp balancing of target probabilities, as the official code does it.

    probs: [B_local, K] sharpened target probabilities (fp32). Returns [B_local, K] whose rows sum
    to 1 and whose prototype marginals over the global batch are B_global / K after the last
    iteration's column step. Sums over prototypes cross all processes.
    """
    q = probs.t().clone()  # (K, B_local)
    k, b_local = q.shape
    b_global = b_local * _world(process_group)
    q /= _all_reduce_sum(q.sum(), process_group)
    for _ in range(iters):
        q /= _all_reduce_sum(q.sum(dim=1, keepdim=True), process_group)  # prototypes: equal mass
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # samples: equal mass
        q /= b_global
    q *= b_global
    return q.t()


def target_probs(
    target: torch.Tensor, prototypes: torch.Tensor, tau: float, sharpen: float, sinkhorn_iters: int, process_group
) -> torch.Tensor:
    """[B, d] target embeddings -> [B, K] sharpened (optionally balanced) targets, no grad; fp32 maths
    (fp64 for fp64 targets)."""
    acc = torch.float64 if target.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        t = F.normalize(target.to(acc), dim=1)
        protos = F.normalize(prototypes.detach().to(acc), dim=1)
        q = torch.softmax(t @ protos.t() / (tau * sharpen), dim=1)
        if sinkhorn_iters > 0:
            q = sinkhorn(q, sinkhorn_iters, process_group)
    return q


def msn_prototype_loss_ref(
    anchor: torch.Tensor,
    target: torch.Tensor,
    prototypes: torch.Tensor,
    *,
    num_views: int,
    tau: float = 0.1,
    sharpen: float = 0.25,
    me_max_weight: float = 1.0,
    sinkhorn_iters: int = 0,
    process_group=None,
) -> tuple[torch.Tensor, LossStats]:
    """Plain-torch MSN objective (fp32 maths; fp64 inputs stay fp64). Shapes as `msn_prototype_loss`."""
    acc = torch.float64 if anchor.dtype == torch.float64 else torch.float32
    vb, _ = anchor.shape
    b, k = target.shape[0], prototypes.shape[0]
    a = F.normalize(anchor.to(acc), dim=1)
    protos = F.normalize(prototypes.to(acc), dim=1)
    log_p = torch.log_softmax(a @ protos.t() / tau, dim=1)  # (V*B, K)
    q = target_probs(target, prototypes, tau, sharpen, sinkhorn_iters, process_group).to(acc)  # (B, K)
    # Cross-entropy against targets repeated over views, by broadcasting: (V, B, K) * (1, B, K).
    ce = -(log_p.view(num_views, b, k) * q.unsqueeze(0)).sum(dim=2).mean()
    p_mean = _AllReduceMean.apply(log_p.exp().mean(dim=0), process_group)  # (K,)
    me_max = torch.special.xlogy(p_mean, p_mean).sum() + math.log(k)
    loss = ce + me_max_weight * me_max
    stats = LossStats(
        ce=ce.detach(),
        me_max=me_max.detach(),
        # distinct argmax prototypes, counted on the device (torch.unique would wait for it)
        num_targets=torch.zeros(k, device=q.device).index_fill_(0, q.argmax(dim=1), 1.0).sum(),
        max_target_prob=q.max(dim=1).values.mean().detach(),
    )
    assert vb == num_views * b
    return loss, stats


def _check_inputs(anchor, target, prototypes, num_views, tau, sharpen, me_max_weight, sinkhorn_iters) -> None:
    op = "msn_prototype_loss"
    # Scalars first: a bad one gives NaN in torch and a ZeroDivisionError in the Triton launcher.
    check_int(op, "num_views", num_views, 1)
    check_finite(op, "tau", tau, positive=True)
    check_finite(op, "sharpen", sharpen, positive=True)
    check_finite(op, "me_max_weight", me_max_weight)
    check_int(op, "sinkhorn_iters", sinkhorn_iters, 0)
    for name, t in (("anchor", anchor), ("target", target), ("prototypes", prototypes)):
        if t.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D [rows, dim]; got shape {tuple(t.shape)}")
        check_dtype(op, name, t, SUPPORTED_DTYPES)
    check_same_device(op, anchor=anchor, target=target, prototypes=prototypes)
    if not (anchor.shape[1] == target.shape[1] == prototypes.shape[1]):
        raise ValueError(
            f"{op}: embedding dims differ: anchor {tuple(anchor.shape)}, target {tuple(target.shape)}, "
            f"prototypes {tuple(prototypes.shape)}"
        )
    if anchor.shape[1] == 0:
        raise ValueError(f"{op}: embedding dim is 0 (anchor {tuple(anchor.shape)}); need d >= 1")
    if prototypes.shape[0] == 0:
        raise ValueError(f"{op}: prototypes has shape {tuple(prototypes.shape)}; need K >= 1 prototypes")
    if anchor.shape[0] == 0 or target.shape[0] == 0:  # the means over rows would be 0/0
        raise ValueError(
            f"{op}: empty batch: anchor {tuple(anchor.shape)}, target {tuple(target.shape)}; need at least one row"
        )
    if anchor.shape[0] != num_views * target.shape[0]:
        raise ValueError(
            f"{op}: anchor has {anchor.shape[0]} rows but num_views={num_views} x {target.shape[0]} target rows "
            f"= {num_views * target.shape[0]} (anchor rows are view-major: [view 0 batch; view 1 batch; ...])"
        )


class MsnPrototypeLossFunction(torch.autograd.Function):
    """Fused MSN loss: forward kernels, and a backward that only runs GEMMs on one [N, K] buffer.

    With s = â p̂ᵀ/τ (N = V·B local rows), p = softmax(s), q⁺ the targets, p̄ the all-process mean of p:
      ∂L/∂s_i = [p_i Σq⁺ - q⁺_{i mod B} + λ p_i ⊙ (log p̄ - Σ_j p_ij log p̄_j)] / N
    (Σq⁺ = 1 up to rounding; the identity backward of the p̄ all-reduce makes the ME-MAX term local);
    ∂L/∂â = ∂L/∂s p̂ / τ, ∂L/∂p̂ = ∂L/∂sᵀ â / τ, and through x̂ = x / max(‖x‖, ε):
    ∂L/∂x = (∂L/∂x̂ - x̂ (x̂·∂L/∂x̂)) / ‖x‖. Verified against autograd of the reference in fp64 (tests).

    Forward (kernels in prototype_loss_triton.py): normalise the prototypes; cuBLAS raw logits
    x @ p̂ᵀ for the targets and the anchors; a target kernel (sharpened softmax, and Sinkhorn when one
    process holds the batch; across processes Sinkhorn is `sinkhorn` in torch); an anchor row kernel
    (lse, CE, partial sums of p); the all-reduce of p̄; then, because p̄ is now known, a second row
    kernel that overwrites the logits with ∂L/∂s · rnorm/τ (Liger style) and writes the loss and stats.
    That buffer is the only [N, K] tensor saved; the targets [B, K] are freed after the forward.
    Backward: ds @ p̂ and dsᵀ @ a (cuBLAS), then the L2-normalise backward scaled by the upstream
    gradient on the device.
    """

    @staticmethod
    def forward(ctx, anchor, target, prototypes, tau, sharpen, me_max_weight, sinkhorn_iters, process_group,
                need_grad, block_m):
        acc = torch.float64 if anchor.dtype == torch.float64 else torch.float32
        world = _world(process_group)
        protos = tri.l2norm_fwd(prototypes, acc, block_m)  # (K, d) p̂
        fused_iters = sinkhorn_iters if world == 1 else 0
        q = tri.target_probs_(target.to(acc) @ protos.t(), target, 1.0 / (tau * sharpen), fused_iters, block_m)
        if sinkhorn_iters > 0 and world > 1:
            q = sinkhorn(q, sinkhorn_iters, process_group)  # a transposed view: the kernels take strides
        logits = anchor.to(acc) @ protos.t()  # (V*B, K), raw: the kernels apply 1/(‖a‖ τ) per row
        lse, rnorm, ce_rows, p_sum, q_max, q_arg = tri.prototype_loss_fwd(logits, anchor, q, 1.0 / tau, block_m)
        if world > 1:  # p̄ over every anchor row of every process; the backward of this mean is the identity
            dist.all_reduce(p_sum, group=process_group)
        loss, stats = tri.prototype_loss_bwd_(logits, lse, rnorm, q, p_sum, ce_rows, q_max, q_arg, world=world,
                                              tau=tau, me_max_weight=me_max_weight, write_grad=need_grad,
                                              block_m=block_m)
        if need_grad:
            ctx.save_for_backward(anchor, prototypes, protos, logits)
        ctx.block_m = block_m
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_stats):
        anchor, prototypes, protos, ds = ctx.saved_tensors  # ds: (N, K) ∂L/∂s · rnorm_i / τ
        grad_out = grad_loss.reshape(1).to(ds.dtype).contiguous()
        d_anchor = d_protos = None
        if ctx.needs_input_grad[0]:  # ds @ p̂ = rnorm · ∂L/∂â
            d_anchor = tri.l2norm_bwd(anchor, ds @ protos, grad_out, prescaled=True, block_m=ctx.block_m)
        if ctx.needs_input_grad[2]:  # dsᵀ @ a = ∂L/∂p̂ (the rnorm in ds normalises a)
            g_protos = ds.t() @ anchor.to(ds.dtype)
            d_protos = tri.l2norm_bwd(prototypes, g_protos, grad_out, prescaled=False, block_m=ctx.block_m)
        return d_anchor, None, d_protos, *([None] * 7)


def _msn_prototype_loss_triton(anchor, target, prototypes, *, num_views, tau, sharpen, me_max_weight,
                                sinkhorn_iters, process_group, block_m=None):
    """The fused path (num_views is implied by the shapes, checked by the caller); `block_m` is rows
    per program, for tests (None picks it from K)."""
    need_grad = torch.is_grad_enabled() and (anchor.requires_grad or prototypes.requires_grad)
    loss, stats = MsnPrototypeLossFunction.apply(
        anchor, target, prototypes, tau, sharpen, me_max_weight, sinkhorn_iters, process_group, need_grad, block_m
    )
    # Views of one small tensor: no launches. The reference reports the target count in fp32.
    return loss, LossStats(stats[0], stats[1], stats[2].to(torch.float32), stats[3])


def msn_prototype_loss(
    anchor: torch.Tensor,
    target: torch.Tensor,
    prototypes: torch.Tensor,
    *,
    num_views: int,
    tau: float = 0.1,
    sharpen: float = 0.25,
    me_max_weight: float = 1.0,
    sinkhorn_iters: int = 0,
    process_group=None,
    backend: str = "auto",
) -> tuple[torch.Tensor, LossStats]:
    """MSN loss over prototypes.

    Args:
        anchor: [V*B, d] anchor embeddings, view-major (rows v*B..v*B+B-1 are view v); fp32/bf16/fp16.
        target: [B, d] target embeddings (no gradient flows to them or, through them, to the prototypes).
        prototypes: [K, d] learned prototypes (fp32 parameter); normalised on the fly.
        num_views: V >= 1, the number of anchor views per target (B >= 1, K >= 1, d >= 1).
        tau: anchor temperature; sharpen: T, so targets use temperature tau*T (both finite and > 0).
        me_max_weight: λ (finite) of the mean-entropy regulariser; sinkhorn_iters: >= 0, 0 turns Sinkhorn off.
        process_group: the group whose anchors form the batch for ME-MAX and Sinkhorn (default: world).
        backend: "auto" (Triton on CUDA tensors, torch otherwise), "triton" (the fused kernels; on a CPU
            only under TRITON_INTERPRET=1), "torch" (`msn_prototype_loss_ref`).
    Returns:
        (scalar loss, LossStats); gradients come back in the inputs' dtypes. All maths in fp32
        whatever the input dtype (fp64 inputs: fp64). The Triton path never syncs with the host.
    Raises:
        ValueError (TypeError for a dtype) naming the bad argument, for every backend alike.
    """
    _check_inputs(anchor, target, prototypes, num_views, tau, sharpen, me_max_weight, sinkhorn_iters)
    requested, backend = backend, resolve_backend(backend, anchor, "msn_prototype_loss")
    kwargs = dict(num_views=num_views, tau=tau, sharpen=sharpen, me_max_weight=me_max_weight,
                  sinkhorn_iters=sinkhorn_iters, process_group=process_group)
    if backend == "triton" and _self_checked(anchor, target, prototypes, kwargs, strict=requested == "triton"):
        return _msn_prototype_loss_triton(anchor, target, prototypes, **kwargs)
    return msn_prototype_loss_ref(anchor, target, prototypes, **kwargs)


def _self_checked(anchor, target, prototypes, kwargs, strict: bool) -> bool:
    """First use per shape class: the fused path against the reference on 8 targets and their anchor rows
    (selfcheck.py); every rank of the group takes the same path, as p̄ and Sinkhorn cross them."""
    v, (b, d), k = kwargs["num_views"], target.shape, prototypes.shape[0]
    grad = anchor.requires_grad or prototypes.requires_grad
    key = (anchor.dtype, target.dtype, prototypes.dtype, v, d, k, kwargs["sinkhorn_iters"] > 0, grad)

    def sample() -> dict:
        rows = min(b, 8)
        part = dict(kwargs, process_group=None)
        rows_of_each_view = anchor.reshape(v, b, d)[:, :rows].reshape(v * rows, d)
        return dict(part, anchor=selfcheck.marked(rows_of_each_view, anchor), target=target.detach()[:rows],
                    prototypes=selfcheck.marked(prototypes, prototypes))

    return selfcheck.use_triton("msn_prototype_loss", key, sample, anchor, strict=strict,
                                process_group=kwargs["process_group"], agree=True)
