"""msn_fast.loss: the MSN objective against a float64 computation from the paper's equations, and its pieces."""

import math

import pytest
import torch
from conftest import rounding_bound

from msn_fast.loss import all_reduce_mean, mean_entropy_gap, msn_loss, sinkhorn, target_probs

F64 = torch.float64


def sinkhorn_equations(probs, iters):
    """Sinkhorn-Knopp from its equations, independent of the package: Q = B·diag(u)·P·diag(v), P the
    probabilities normalised to total mass 1, with the scalings updated in the official order each
    iteration: v_k = (1/K) / Σ_b u_b P_bk (every prototype gets mass 1/K), then
    u_b = (1/B) / Σ_k P_bk v_k (every sample mass 1/B). Rows of Q then sum to 1 exactly and its
    prototype marginals tend to B/K."""
    p = probs.double() / probs.double().sum()
    b, k = p.shape
    u, v = torch.ones(b, dtype=F64), torch.ones(k, dtype=F64)
    for _ in range(iters):
        v = (1.0 / k) / (u[:, None] * p).sum(0)
        u = (1.0 / b) / (p * v[None, :]).sum(1)
    return b * u[:, None] * p * v[None, :]


def equations_loss(anchor, target, protos, num_views, tau, T, lam, sinkhorn_iters=0):
    """Paper Eq. 1 in float64 with explicit exp/log/pow (no log_softmax, no library softmax)."""
    a = anchor.double()
    a = a / a.norm(dim=1, keepdim=True)
    t = target.double()
    t = t / t.norm(dim=1, keepdim=True)
    q = protos.double()
    q = q / q.norm(dim=1, keepdim=True)
    ea = torch.exp(a @ q.T / tau)
    p = ea / ea.sum(1, keepdim=True)
    with torch.no_grad():
        et = torch.exp(t @ q.detach().T / tau)
        pt = et / et.sum(1, keepdim=True)
        sharp = pt ** (1 / T) / (pt ** (1 / T)).sum(1, keepdim=True)  # sharpen(p, T)
        if sinkhorn_iters:
            sharp = sinkhorn_equations(sharp, sinkhorn_iters)
    targets = sharp.repeat(num_views, 1)
    ce = -(targets * torch.log(p)).sum(1).mean()
    pbar = p.mean(0)
    rloss = (pbar * torch.log(pbar)).sum() + math.log(q.shape[0])
    return ce + lam * rloss


@pytest.mark.parametrize("num_views,b,k,sink,lam", [(1, 7, 16, 0, 1.0), (11, 5, 64, 0, 5.0), (3, 8, 32, 3, 1.0)])
def test_loss_matches_equations_values_and_grads(num_views, b, k, sink, lam):
    d = 12
    anchor = torch.randn(num_views * b, d, dtype=torch.float64, requires_grad=True)
    target = torch.randn(b, d, dtype=torch.float64)
    protos = torch.randn(k, d, dtype=torch.float64, requires_grad=True)
    ref = equations_loss(anchor, target, protos, num_views, 0.1, 0.25, lam, sink)
    ga, gp = torch.autograd.grad(ref, (anchor, protos))
    loss, stats = msn_loss(anchor, target, protos, num_views=num_views, tau=0.1, sharpen=0.25,
                           me_max_weight=lam, sinkhorn_iters=sink, backend="torch")
    ka, kp = torch.autograd.grad(loss, (anchor, protos))
    # Two fp64 computations of the same sums: rounding over rows x K terms through exp(cos/τ), whose
    # conditioning is 1/τ; λ weighs the ME-MAX term's share.
    bound = rounding_bound(F64, num_views * b * k, (1 + lam) / 0.1)
    assert abs(loss.item() - ref.item()) <= bound * max(1.0, abs(ref.item()))
    for name, got, want in (("d_anchor", ka, ga), ("d_prototypes", kp, gp)):
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err <= bound, (name, err, bound)
    assert abs((stats.ce + lam * stats.me_max - loss.detach()).item()) <= bound * max(1.0, abs(ref.item()))


def test_fp32_loss_close_to_float64():
    anchor, target, protos = torch.randn(22, 16), torch.randn(2, 16), torch.randn(32, 16)
    loss32, _ = msn_loss(anchor, target, protos, num_views=11, backend="torch")
    loss64 = equations_loss(anchor, target, protos, 11, 0.1, 0.25, 1.0)
    assert loss32.dtype == torch.float32
    bound = rounding_bound(torch.float32, 22 * 32, 2 / 0.1)  # as above, in fp32
    assert abs(loss32.item() - loss64.item()) <= bound * max(1.0, abs(loss64.item()))


def test_bf16_inputs_give_fp32_loss():
    anchor, target, protos = torch.randn(6, 8).bfloat16(), torch.randn(3, 8).bfloat16(), torch.randn(16, 8)
    loss, _ = msn_loss(anchor, target, protos, num_views=2, backend="torch")
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_sharpening_is_softmax_at_tau_times_T():
    s = torch.randn(9, 40, dtype=torch.float64)
    tau, T = 0.1, 0.25
    p = torch.softmax(s / tau, 1)
    sharp = p ** (1 / T) / (p ** (1 / T)).sum(1, keepdim=True)
    torch.testing.assert_close(sharp, torch.softmax(s / (tau * T), 1), atol=1e-12, rtol=1e-10)


def test_no_gradient_through_targets():
    anchor = torch.randn(4, 8, requires_grad=True)
    target = torch.randn(2, 8, requires_grad=True)
    protos = torch.randn(16, 8, requires_grad=True)
    loss, _ = msn_loss(anchor, target, protos, num_views=2, backend="torch")
    loss.backward()
    assert target.grad is None
    assert anchor.grad is not None and protos.grad is not None


@pytest.mark.parametrize("b,k", [(32, 16), (7, 64), (1, 5)])
def test_sinkhorn_matches_equations(b, k):
    probs = torch.softmax(torch.randn(b, k, dtype=F64) * 3, 1)
    for iters in (1, 3, 10):
        got, want = sinkhorn(probs, iters), sinkhorn_equations(probs, iters)
        assert got.shape == (b, k) and (got >= 0).all()
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err <= rounding_bound(F64, b * k, 2 * iters), (iters, err)


@pytest.mark.parametrize("b,k", [(32, 16), (16, 64), (33, 8)])
def test_sinkhorn_marginals(b, k):
    """Rows (samples) sum to 1 after every call; the prototype marginals reach B/K as the iterations go
    on (for strictly positive probabilities Sinkhorn-Knopp converges linearly)."""
    probs = torch.softmax(torch.randn(b, k, dtype=F64) * 3, 1)
    errs = []
    for iters in (1, 3, 10, 300):
        q = sinkhorn(probs, iters)
        row_err = (q.sum(1) - 1).abs().max().item()
        assert row_err <= rounding_bound(F64, k * iters), (iters, row_err)
        errs.append((q.sum(0) - b / k).abs().max().item() / (b / k))
    assert errs[2] < errs[0]  # more iterations balance more
    assert errs[-1] <= 1e-9, errs  # balanced: every prototype holds B/K of the mass
    uniform = sinkhorn(torch.full((b, k), 1.0 / k, dtype=F64), 3)  # already balanced: a fixed point
    assert ((uniform - 1.0 / k).abs().max() <= rounding_bound(F64, b * k, 1.0 / k)).item()


def test_me_max_is_zero_at_uniform_mean():
    # anchors pointing at each prototype equally: mean prediction uniform -> ME-MAX term 0
    k = 8
    protos = torch.eye(k, dtype=torch.float64)
    anchor = torch.eye(k, dtype=torch.float64)  # row i predicts prototype i; the mean over rows is uniform
    target = torch.eye(k, dtype=torch.float64)
    _, stats = msn_loss(anchor, target, protos, num_views=1, backend="torch")
    assert abs(stats.me_max.item()) < 1e-12
    # and positive for a non-uniform mean
    _, stats = msn_loss(anchor[:2].repeat(4, 1), target, protos, num_views=1, backend="torch")
    assert stats.me_max.item() > 0.1


def test_stats():
    protos = torch.eye(4)
    target = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [1.0, 0.1, 0, 0]])
    _, stats = msn_loss(torch.randn(3, 4), target, protos, num_views=1, backend="torch")
    assert stats.num_targets.item() == 2
    assert 0.9 < stats.max_target_prob.item() <= 1.0


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match="num_views"):
        msn_loss(torch.randn(5, 4), torch.randn(2, 4), torch.randn(8, 4), num_views=2)
    with pytest.raises(ValueError, match="embedding dims"):
        msn_loss(torch.randn(4, 4), torch.randn(2, 3), torch.randn(8, 4), num_views=2)
    with pytest.raises(TypeError, match="int64"):
        msn_loss(torch.ones(4, 4, dtype=torch.int64), torch.randn(2, 4), torch.randn(8, 4), num_views=2)


@pytest.mark.parametrize("sink", [0, 3])
def test_target_probs_rows_are_probabilities(sink):
    target, protos = torch.randn(9, 12, dtype=F64), torch.randn(40, 12, dtype=F64, requires_grad=True)
    q = target_probs(target, protos, 0.1, 0.25, sink)
    assert q.shape == (9, 40) and (q >= 0).all() and not q.requires_grad
    assert (q.sum(1) - 1).abs().max().item() <= rounding_bound(F64, 40 * (1 + sink))


def test_me_max_and_the_cross_process_mean():
    """ME-MAX is log K - H(p̄); with one process the mean is the value itself and its backward the identity."""
    p = torch.softmax(torch.randn(16, dtype=F64), 0).requires_grad_()
    entropy = -(p * p.log()).sum()
    assert abs((mean_entropy_gap(p) - (math.log(16) - entropy)).item()) <= rounding_bound(F64, 16, math.log(16))
    g = torch.randn(16, dtype=F64)
    mean = all_reduce_mean(p)
    mean.backward(g)
    assert torch.equal(mean.detach(), p.detach()) and torch.equal(p.grad, g)
