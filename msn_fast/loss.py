"""The MSN objective: cross-entropy to sharpened targets plus the ME-MAX regulariser (arXiv 2204.07141, Eq. 1).

As the official recipe computes it (msn_spec.md, section 3), over N = V·B anchor rows (view-major) per process:
  p   = softmax(â p̂ᵀ / τ)           anchors, all V views                kernels.prototype_cross_entropy
  p⁺  = softmax(ẑ⁺ p̂ᵀ / (τ·T))      targets, no gradient                `target_probs` (== sharpen(softmax(·/τ), T))
  p⁺  = sinkhorn(p⁺)                optional, sums over all processes   `sinkhorn`
  L   = mean_rows H(p⁺, p) + λ·(Σ p̄ log p̄ + log K),  p̄ = mean of p over all anchor rows of all processes
The row-wise work over [N, K] (normalise, match prototypes, log-softmax, cross-entropy against the targets repeated
over views, the mean prediction, and its backward) is one fused op of msn_fast.kernels; this file is the method
around it, in fp32 via softmax / log_softmax (fp64 for fp64 inputs), never log(p ** -t).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from msn_fast.kernels import prototype_cross_entropy
from msn_fast.kernels._utils import check_dtype, check_finite, check_int, check_same_device

from .distributed import world_size

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class LossStats(NamedTuple):
    """What the trainer logs, as 0-dim detached tensors."""

    ce: torch.Tensor  # cross-entropy term (this process's rows)
    me_max: torch.Tensor  # Σ p̄ log p̄ + log K  (0 at a uniform mean prediction)
    num_targets: torch.Tensor  # number of distinct argmax prototypes among the local targets
    max_target_prob: torch.Tensor  # mean over targets of max_k p⁺_k


def _all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    if world_size(group) > 1:
        dist.all_reduce(x, group=group)
    return x


class _AllReduceMean(torch.autograd.Function):
    """Mean across processes in the forward; identity in the backward.

    Identity is the right backward because the gradients of the replicated loss are themselves averaged
    across processes by DDP/FSDP (the official code's AllReduce does the same).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        world = world_size(group)
        x = _all_reduce_sum(x.clone(), group)
        return x / world if world > 1 else x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def all_reduce_mean(x: torch.Tensor, process_group=None) -> torch.Tensor:
    """The mean of x over the processes of the group (default: world), with an identity backward."""
    return _AllReduceMean.apply(x, process_group)


@torch.no_grad()
def sinkhorn(probs: torch.Tensor, iters: int = 3, process_group=None) -> torch.Tensor:
    """Sinkhorn-Knopp balancing of target probabilities, as the official code does it.

    probs: [B_local, K] sharpened target probabilities (fp32). Returns [B_local, K] whose rows sum to 1 and
    whose prototype marginals over the global batch are B_global / K after the last iteration's column step.
    Sums over prototypes cross all processes.
    """
    q = probs.t().clone()  # (K, B_local)
    k, b_local = q.shape
    b_global = b_local * world_size(process_group)
    q /= _all_reduce_sum(q.sum(), process_group)
    for _ in range(iters):
        q /= _all_reduce_sum(q.sum(dim=1, keepdim=True), process_group)  # prototypes: equal mass
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # samples: equal mass
        q /= b_global
    q *= b_global
    return q.t()


@torch.no_grad()
def target_probs(target: torch.Tensor, prototypes: torch.Tensor, tau: float, sharpen: float,
                 sinkhorn_iters: int = 0, process_group=None) -> torch.Tensor:
    """[B, d] target embeddings -> [B, K] sharpened (optionally balanced) targets, no grad; fp32 maths
    (fp64 for fp64 targets). The sharpening rule lives here: softmax at temperature τ·T."""
    acc = torch.float64 if target.dtype == torch.float64 else torch.float32
    t = F.normalize(target.to(acc), dim=1)
    protos = F.normalize(prototypes.detach().to(acc), dim=1)
    q = torch.softmax(t @ protos.t() / (tau * sharpen), dim=1)
    if sinkhorn_iters > 0:
        q = sinkhorn(q, sinkhorn_iters, process_group)
    return q


def mean_entropy_gap(p_mean: torch.Tensor) -> torch.Tensor:
    """ME-MAX: Σ_k p̄_k log p̄_k + log K = log K - H(p̄) >= 0, zero at a uniform p̄ [K]."""
    return torch.special.xlogy(p_mean, p_mean).sum() + math.log(p_mean.shape[0])


@torch.no_grad()
def target_stats(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distinct argmax prototypes, mean max probability) of targets [B, K], counted on the device (torch.unique
    would wait for it)."""
    k = q.shape[1]
    hits = torch.zeros(k, device=q.device).index_fill_(0, q.argmax(dim=1), 1.0)
    return hits.sum(), q.max(dim=1).values.mean()


def _check_inputs(anchor, target, prototypes, num_views, tau, sharpen, me_max_weight, sinkhorn_iters) -> None:
    op = "msn_loss"
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


def msn_loss(
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
        anchor: [V*B, d] anchor embeddings, view-major (rows v*B..v*B+B-1 are view v); fp32/bf16/fp16/fp64.
        target: [B, d] target embeddings (no gradient flows to them or, through them, to the prototypes).
        prototypes: [K, d] learned prototypes (fp32 parameter); normalised on the fly.
        num_views: V >= 1, the number of anchor views per target (B >= 1, K >= 1, d >= 1).
        tau: anchor temperature; sharpen: T, so targets use temperature tau*T (both finite and > 0).
        me_max_weight: λ (finite) of the mean-entropy regulariser; sinkhorn_iters: >= 0, 0 turns Sinkhorn off.
        process_group: the group whose anchors form the batch for ME-MAX and Sinkhorn (default: world).
        backend: of the cross-entropy op, `msn_fast.kernels.prototype_cross_entropy`: "auto" (Triton on CUDA
            tensors, torch otherwise), "triton" (on a CPU only under TRITON_INTERPRET=1), "torch".
    Returns:
        (scalar loss, LossStats); gradients come back in the inputs' dtypes. All maths in fp32 whatever the
        input dtype (fp64 inputs: fp64). Never syncs with the host.
    Raises:
        ValueError (TypeError for a dtype) naming the bad argument, for every backend alike.
    """
    _check_inputs(anchor, target, prototypes, num_views, tau, sharpen, me_max_weight, sinkhorn_iters)
    # 1. targets: sharpened, optionally balanced predictions of the target views; no gradient.   (B, K)
    q = target_probs(target, prototypes, tau, sharpen, sinkhorn_iters, process_group)
    # 2. anchors: cross-entropy to the targets repeated over views, and this process's mean prediction.   (), (K,)
    ce, p_local = prototype_cross_entropy(anchor, prototypes, q, num_views=num_views, tau=tau, backend=backend,
                                          selfcheck_group=_agreement_group(process_group))
    # 3. ME-MAX on the mean prediction over every process's anchor rows.
    me_max = mean_entropy_gap(all_reduce_mean(p_local, process_group))
    loss = ce + me_max_weight * me_max
    num_targets, max_target_prob = target_stats(q)
    return loss, LossStats(ce.detach(), me_max.detach(), num_targets, max_target_prob)


def _agreement_group(process_group):
    """The group over which the op's first-use self-check must agree, None for one process. The op is local, so
    mixing its two implementations across ranks would still be correct; agreeing keeps every rank on the same
    code (reproducible across heterogeneous nodes) and lets rank 0, the one that logs, report a kernel that
    failed on another rank."""
    if world_size(process_group) == 1:
        return None
    return process_group if process_group is not None else dist.group.WORLD


def msn_loss_ref(
    anchor: torch.Tensor, target: torch.Tensor, prototypes: torch.Tensor, **kwargs
) -> tuple[torch.Tensor, LossStats]:
    """The eager objective: `msn_loss` on the op's torch reference (`prototype_cross_entropy_ref`), which keeps
    autograd's own intermediates; what the tests and benchmarks compare the fused path with. Arguments as
    `msn_loss`, without backend."""
    return msn_loss(anchor, target, prototypes, **kwargs, backend="torch")
