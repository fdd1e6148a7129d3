"""Prototype cross-entropy: the row-wise part of the MSN loss, as a reusable op (its maths: kernels_notes.md §3).

For anchors a [V·B, d] (view-major), prototypes p [K, d] and targets q [B, K] (no gradient):
  s = â p̂ᵀ / τ,   log p = log_softmax(s),   ce = mean_i -Σ_k q_{i mod B, k} log p_ik,   mean_probs = mean_i p_i
with x̂ = x / max(‖x‖, 1e-12). The targets repeat over the V views by broadcasting, never materialised. The
method around it (sharpening, Sinkhorn, the cross-process mean, ME-MAX) is msn_fast/loss.py. backend="triton"
runs the kernels of prototype_ce_triton.py through `PrototypeCrossEntropyFunction`; `prototype_cross_entropy_ref`
is the torch version. The op is local: it runs no collective.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import prototype_ce_triton as tri
from . import selfcheck
from ._utils import check_dtype, check_finite, check_int, check_same_device, resolve_backend

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
OP = "prototype_cross_entropy"


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def prototype_cross_entropy_ref(
    anchor: torch.Tensor, prototypes: torch.Tensor, targets: torch.Tensor, *, num_views: int, tau: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch `prototype_cross_entropy` (fp32 maths; fp64 inputs stay fp64). Shapes as there."""
    acc = _acc(anchor)
    b, k = targets.shape
    a = F.normalize(anchor.to(acc), dim=1)
    protos = F.normalize(prototypes.to(acc), dim=1)
    log_p = torch.log_softmax(a @ protos.t() / tau, dim=1)  # (V*B, K)
    q = targets.detach().to(acc)  # (B, K)
    # Cross-entropy against targets repeated over views, by broadcasting: (V, B, K) * (B, K).
    ce = -(log_p.view(num_views, b, k) * q).sum(dim=2).mean()
    return ce, log_p.exp().mean(dim=0)


def _check_inputs(anchor, prototypes, targets, num_views, tau) -> None:
    # Scalars first: a bad one gives NaN in torch and a ZeroDivisionError in the Triton launcher.
    check_int(OP, "num_views", num_views, 1)
    check_finite(OP, "tau", tau, positive=True)
    for name, t in (("anchor", anchor), ("prototypes", prototypes), ("targets", targets)):
        if t.dim() != 2:
            raise ValueError(f"{OP}: {name} must be 2-D; got shape {tuple(t.shape)}")
        check_dtype(OP, name, t, SUPPORTED_DTYPES)
    check_same_device(OP, anchor=anchor, prototypes=prototypes, targets=targets)
    if anchor.shape[1] != prototypes.shape[1]:
        raise ValueError(f"{OP}: embedding dims differ: anchor {tuple(anchor.shape)}, prototypes "
                         f"{tuple(prototypes.shape)}")
    if anchor.shape[1] == 0:
        raise ValueError(f"{OP}: embedding dim is 0 (anchor {tuple(anchor.shape)}); need d >= 1")
    if prototypes.shape[0] == 0:
        raise ValueError(f"{OP}: prototypes has shape {tuple(prototypes.shape)}; need K >= 1 prototypes")
    if anchor.shape[0] == 0 or targets.shape[0] == 0:  # the means over rows would be 0/0
        raise ValueError(f"{OP}: empty batch: anchor {tuple(anchor.shape)}, targets {tuple(targets.shape)}; "
                         "need at least one row")
    if targets.shape[1] != prototypes.shape[0]:
        raise ValueError(f"{OP}: targets has shape {tuple(targets.shape)} but there are {prototypes.shape[0]} "
                         "prototypes; need [B, K]")
    if anchor.shape[0] != num_views * targets.shape[0]:
        raise ValueError(
            f"{OP}: anchor has {anchor.shape[0]} rows but num_views={num_views} x {targets.shape[0]} target rows "
            f"= {num_views * targets.shape[0]} (anchor rows are view-major: [view 0 batch; view 1 batch; ...])"
        )


class PrototypeCrossEntropyFunction(torch.autograd.Function):
    """Fused forward, and a backward that runs one row kernel and GEMMs on the one saved [N, K] buffer.

    With s = â p̂ᵀ/τ (N = V·B rows), p = softmax(s), q the targets, g = ∂L/∂ce, γ = ∂L/∂mean_probs:
      ∂L/∂s_i = [g (p_i Σq - q_{i mod B}) + p_i ⊙ (γ - <γ, p_i>)] / N,
    ∂L/∂â = ∂L/∂s p̂ / τ, ∂L/∂p̂ = ∂L/∂sᵀ â / τ, and through x̂ = x / max(‖x‖, ε):
    ∂L/∂x = (∂L/∂x̂ - x̂ (x̂·∂L/∂x̂)) / ‖x‖. Verified against autograd of the reference in fp64 (tests).

    Forward: normalise the prototypes; cuBLAS raw logits a @ p̂ᵀ; the row kernel (scaled logits in place, lse,
    rnorm, partial sums of the CE and of p). Saved: that fp32 buffer (the only [N, K] tensor), lse and rnorm [N],
    p̂ [K, d], and the inputs. Backward: the row kernel overwrites the buffer with ∂L/∂s · rnorm/τ (a second
    backward through the graph, retain_graph=True, first recomputes the buffer from the saved inputs), then
    ds @ p̂ and dsᵀ @ a (cuBLAS) and the L2-normalise backwards.
    """

    @staticmethod
    def forward(ctx, anchor, prototypes, targets, tau, need_grad, block_m):
        protos = tri.l2norm_fwd(prototypes, _acc(anchor), block_m)  # (K, d) p̂
        logits = anchor.to(protos.dtype) @ protos.t()  # (V*B, K), raw: the kernel applies 1/(‖a‖ τ) per row
        ce, mean_probs, lse, rnorm = tri.prototype_ce_fwd(logits, anchor, targets, 1.0 / tau, block_m)
        if need_grad:
            ctx.save_for_backward(anchor, prototypes, targets, protos, logits, lse, rnorm)
        ctx.tau, ctx.block_m, ctx.spent = tau, block_m, False
        return ce, mean_probs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ce, grad_mean):
        anchor, prototypes, targets, protos, ds, lse, rnorm = ctx.saved_tensors
        if ctx.spent:  # a second backward (retain_graph=True): the saved buffer holds the last gradient; rebuild it
            ds = anchor.to(protos.dtype) @ protos.t()
            tri.prototype_ce_fwd(ds, anchor, targets, 1.0 / ctx.tau, ctx.block_m)
        ctx.spent = True
        acc = ds.dtype
        tri.prototype_ce_bwd(ds, lse, rnorm, targets, grad_ce.to(acc), grad_mean.to(acc).contiguous(), ctx.tau,
                             ctx.block_m)  # ds: (N, K) ∂L/∂s · rnorm_i / τ from here on
        d_anchor = d_protos = None
        if ctx.needs_input_grad[0]:  # ds @ p̂ = rnorm · ∂L/∂â
            d_anchor = tri.l2norm_bwd(anchor, ds @ protos, prescaled=True, block_m=ctx.block_m)
        if ctx.needs_input_grad[1]:  # dsᵀ @ a = ∂L/∂p̂ (the rnorm in ds normalises a)
            d_protos = tri.l2norm_bwd(prototypes, ds.t() @ anchor.to(acc), prescaled=False, block_m=ctx.block_m)
        return d_anchor, d_protos, None, None, None, None


def _prototype_cross_entropy_triton(anchor, prototypes, targets, *, tau, block_m=None):
    """The fused path (shapes checked by the caller); `block_m` is rows per program, for tests (None picks it
    from K)."""
    need_grad = torch.is_grad_enabled() and (anchor.requires_grad or prototypes.requires_grad)
    return PrototypeCrossEntropyFunction.apply(anchor, prototypes, targets.detach(), tau, need_grad, block_m)


def prototype_cross_entropy(
    anchor: torch.Tensor,
    prototypes: torch.Tensor,
    targets: torch.Tensor,
    *,
    num_views: int,
    tau: float = 0.1,
    backend: str = "auto",
    selfcheck_group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of prototype predictions against per-sample targets repeated over views, and the mean prediction.

    Args:
        anchor: [V*B, d] embeddings, view-major (rows v*B..v*B+B-1 are view v); fp32/bf16/fp16/fp64.
        prototypes: [K, d] prototypes (any of those dtypes); normalised on the fly, as the anchors are.
        targets: [B, K] target probabilities, one row per sample, shared by its V views; no gradient flows to them.
        num_views: V >= 1 (B >= 1, K >= 1, d >= 1); tau: the temperature τ (finite, > 0).
        backend: "auto" (Triton on CUDA tensors, torch otherwise), "triton" (the fused kernels; on a CPU only
            under TRITON_INTERPRET=1), "torch" (`prototype_cross_entropy_ref`).
        selfcheck_group: a process group whose ranks must all run the same implementation (the first-use
            self-check then agrees its verdict across it, one all-reduce per shape class); None: decided locally.
    Returns:
        (ce, mean_probs): the 0-dim mean over the N = V*B rows of -Σ_k q_{i mod B,k} log p_ik, and [K] the mean
        over the rows of p. Both in fp32 whatever the input dtype (fp64 for fp64 anchors), as is all the maths;
        gradients come back in the inputs' dtypes. Both outputs are differentiable. No host sync, no collective.
    Raises:
        ValueError (TypeError for a dtype) naming the bad argument, for every backend alike.
    """
    _check_inputs(anchor, prototypes, targets, num_views, tau)
    requested, backend = backend, resolve_backend(backend, anchor, OP)
    if backend == "triton" and _self_checked(anchor, prototypes, targets, num_views, tau, selfcheck_group,
                                             strict=requested == "triton"):
        return _prototype_cross_entropy_triton(anchor, prototypes, targets, tau=tau)
    return prototype_cross_entropy_ref(anchor, prototypes, targets, num_views=num_views, tau=tau)


def _self_checked(anchor, prototypes, targets, num_views, tau, group, strict: bool) -> bool:
    """First use per shape class: the fused path against the reference on 8 targets and their anchor rows
    (selfcheck.py); with a group, every rank of it takes the same path."""
    (b, k), d = targets.shape, anchor.shape[1]
    grad = anchor.requires_grad or prototypes.requires_grad
    key = (anchor.dtype, prototypes.dtype, targets.dtype, num_views, d, k, grad)

    def sample() -> dict:
        rows = min(b, 8)
        rows_of_each_view = anchor.reshape(num_views, b, d)[:, :rows].reshape(num_views * rows, d)
        return dict(anchor=selfcheck.marked(rows_of_each_view, anchor),
                    prototypes=selfcheck.marked(prototypes, prototypes), targets=targets.detach()[:rows],
                    num_views=num_views, tau=tau)

    return selfcheck.use_triton(OP, key, sample, anchor, strict=strict, process_group=group,
                                agree=group is not None)
