"""prototype_cross_entropy (Triton) vs prototype_cross_entropy_ref: ce, mean_probs, ∂anchor, ∂prototypes.

On a CPU the kernels run in the Triton interpreter (tests/conftest.py). Both outputs get non-zero upstream
gradients (g for the CE and a pseudo-random γ [K] for the mean prediction, where ME-MAX puts its gradient), so
both terms of the backward are checked. fp64 inputs run the kernels in fp64 and must match the fp64 reference to
rounding; fp32 and 16-bit inputs must be as close to it as plain torch is (x2, plus a floor). The whole MSN
objective around this op is tested in tests/test_loss_backends.py. `gpu` tests use MSN's shapes.
"""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    BAD_TAU_AND_VIEWS,
    DEVICE,
    LOWP_FLOOR,
    assert_rounding_close,
    raises_bad_scalar,
    raises_bad_shapes,
    rel_err,
    rounding_bound,
    seeded,
)

from msn_fast.kernels import prototype_ce as pce
from msn_fast.kernels import prototype_ce_triton as tri

F64 = torch.float64
NAMES = ("ce", "mean_probs", "d_anchor", "d_prototypes")


def _inputs(views, batch, k, d, dtype=F64, proto_dtype=None, seed=0):
    """anchor [V*B, d], prototypes [K, d] and the sharpened targets [B, K] of B target rows (softmax at
    τT = 0.025, as msn_fast.loss makes them: fp32, fp64 for fp64 inputs)."""
    g = torch.Generator().manual_seed(seeded(seed))  # changes with MSN_TEST_SEED
    target = torch.randn(batch, d, generator=g, dtype=F64)
    # Anchors near their target (as after some training) so CE and the gradients are not just noise.
    anchor = target.repeat(views, 1) + 0.8 * torch.randn(views * batch, d, generator=g, dtype=F64)
    protos = torch.rand(k, d, generator=g, dtype=F64) * 0.125 - 0.0625  # MSN init, U(±1/√256)
    targets = torch.softmax(F.normalize(target, dim=1) @ F.normalize(protos, dim=1).t() / 0.025, dim=1)
    q_dtype = F64 if dtype == F64 else torch.float32
    return anchor.to(DEVICE, dtype), protos.to(DEVICE, proto_dtype or dtype), targets.to(DEVICE, q_dtype)


def _run(fn, anchor, protos, targets, grad_ce=0.7, **kw):
    """ce, mean_probs and (∂anchor, ∂prototypes) of fn at fresh leaves, for upstream gradients grad_ce and a
    fixed pseudo-random γ [K] (drawn in fp32, so every dtype sees the same values)."""
    a, p = anchor.detach().clone().requires_grad_(), protos.detach().clone().requires_grad_()
    t = targets.detach().clone().requires_grad_()  # must receive no gradient
    ce, mean = fn(a, p, t, **kw)
    g = torch.Generator().manual_seed(seeded(1))
    gamma = torch.randn(mean.shape, generator=g).to(DEVICE, mean.dtype)
    torch.autograd.backward([ce, mean], [torch.full_like(ce, grad_ce), gamma])
    assert t.grad is None
    return ce.detach(), mean.detach(), a.grad, p.grad


def _triton(block_m=None):
    def fn(a, p, t, num_views, tau=0.1):  # num_views is implied by the shapes on this path
        return pce._prototype_cross_entropy_triton(a, p, t, tau=tau, block_m=block_m)
    return fn


def _ref64(anchor, protos, targets, **kw):
    """The reference, everything in float64."""
    return _run(pce.prototype_cross_entropy_ref, anchor.double(), protos.double(), targets.double(), **kw)



def _errors(res, ref):
    """Relative max errors of ce, mean_probs, ∂anchor, ∂prototypes."""
    return [rel_err(g, r) for g, r in zip(res, ref)]


def _bound(rows, k, tau=0.1, dtype=F64):
    """Relative error the rounding model allows in `dtype`: sums over rows x K entries, each through exp of a
    logit cos/τ whose conditioning is |cos|/τ <= 1/τ (conftest.rounding_bound)."""
    return rounding_bound(dtype, rows * k, 1 / tau)


# (views, batch, K, d, rows per program): row counts that do not divide the block, K in {64, 1024} (and 37, 13),
# embedding dims that are not powers of two, one sample of a two-dimensional embedding.
CASES = [
    (1, 7, 64, 32, 4),
    (11, 3, 64, 40, 8),
    (11, 7, 64, 40, 16),
    (11, 5, 1024, 48, None),
    (11, 5, 1024, 48, 16),
    (1, 20, 1024, 24, 8),
    (3, 4, 37, 24, 2),
    (2, 1, 13, 2, 1),
]


@pytest.mark.parametrize("views,batch,k,d,block_m", CASES)
def test_fp64_matches_reference(views, batch, k, d, block_m):
    anchor, protos, targets = _inputs(views, batch, k, d)
    got = _run(_triton(block_m), anchor, protos, targets, num_views=views)
    ref = _ref64(anchor, protos, targets, num_views=views)
    bound = _bound(views * batch, k)
    for name, err in zip(NAMES, _errors(got, ref)):
        assert err <= bound, (name, err, bound)
    assert all(x.dtype == F64 for x in got)
    assert abs(got[1].sum().item() - 1) <= bound  # the mean of probability rows is a probability
    # Not a degenerate reference: gradients flow, and the CE is not near 0 (its smallest over MSN_TEST_SEED 0-59 is
    # 0.95 at d >= 24; in the 2-d case one target can sit on a prototype, CE down to 0.035, so it is left out).
    assert ref[2].abs().max() > 0 and ref[3].abs().max() > 0
    assert d == 2 or ref[0].item() > 0.5


@pytest.mark.parametrize("grad_ce", [0.0, 0.7])
def test_each_upstream_gradient_alone_and_together(grad_ce):
    """g = 0 leaves only the mean prediction's term of ∂L/∂s, g ≠ 0 adds the CE's; a mean_probs left unused
    (its gradient arrives as zeros) leaves only the CE's."""
    anchor, protos, targets = _inputs(3, 6, 64, 32)
    kw = dict(num_views=3, grad_ce=grad_ce)
    got, ref = _run(_triton(8), anchor, protos, targets, **kw), _ref64(anchor, protos, targets, **kw)
    assert max(_errors(got[2:], ref[2:])) <= _bound(18, 64)
    kw = dict(num_views=3)
    a = anchor.clone().requires_grad_()
    ce, _ = _triton(8)(a, protos, targets, **kw)  # mean_probs unused: its gradient arrives as zeros
    ce.backward()
    a64 = anchor.clone().requires_grad_()
    pce.prototype_cross_entropy_ref(a64, protos, targets, **kw)[0].backward()
    assert rel_err(a.grad, a64.grad) <= _bound(18, 64)


@pytest.mark.parametrize("views,batch,k,d", [(11, 5, 1024, 48), (1, 7, 64, 32), (11, 3, 64, 40)])
def test_fp32_close_to_fp64_reference(views, batch, k, d):
    anchor, protos, targets = _inputs(views, batch, k, d, dtype=torch.float32)
    kw = dict(num_views=views)
    ref = _ref64(anchor, protos, targets, **kw)
    got = _errors(_run(_triton(), anchor, protos, targets, **kw), ref)
    eager = _errors(_run(pce.prototype_cross_entropy_ref, anchor, protos, targets, **kw), ref)
    floor = _bound(views * batch, k, dtype=torch.float32)
    for name, g, e in zip(NAMES, got, eager):
        assert g <= 2 * e + floor, (name, g, e, floor)


@pytest.mark.parametrize("dtype,proto_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float16, torch.float32)])
def test_low_precision_inputs(dtype, proto_dtype):
    """The flash-attention rule against the fp64 reference of the same 16-bit values; outputs in fp32,
    gradients in the inputs' dtypes."""
    views, batch, k, d = 11, 3, 1024, 48
    anchor, protos, targets = _inputs(views, batch, k, d, dtype=dtype, proto_dtype=proto_dtype)
    kw = dict(num_views=views)
    ce, mean, da, dp = got = _run(_triton(), anchor, protos, targets, **kw)
    assert ce.dtype == mean.dtype == torch.float32 and da.dtype == dtype and dp.dtype == proto_dtype
    ref = _ref64(anchor, protos, targets, **kw)
    eager = _errors(_run(pce.prototype_cross_entropy_ref, anchor, protos, targets, **kw), ref)
    for name, g, e in zip(NAMES, _errors(got, ref), eager):
        assert g <= 2 * e + LOWP_FLOOR[dtype], (name, g, e)
    # The maths is fp32 inside: the forward outputs are as good as fp32's.
    assert max(_errors(got, ref)[:2]) <= _bound(views * batch, k, dtype=torch.float32)


def test_poisoned_buffers_are_fully_written():
    anchor, protos, targets = _inputs(3, 5, 37, 40)  # 15 rows in blocks of 4, K and d not powers of two
    clean = _run(_triton(block_m=4), anchor, protos, targets, num_views=3)

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    with mock.patch.object(tri, "_empty", poisoned):
        dirty = _run(_triton(block_m=4), anchor, protos, targets, num_views=3)
    for x, y in zip(clean, dirty):
        assert torch.isfinite(y).all()
        torch.testing.assert_close(x, y, atol=0, rtol=0)


def test_targets_with_any_strides():
    """Sinkhorn hands over a transposed view: the kernels take the targets' strides."""
    anchor, protos, targets = _inputs(2, 6, 64, 32)
    transposed = targets.t().contiguous().t()
    assert not transposed.is_contiguous()
    a, b = (_run(_triton(8), anchor, protos, t, num_views=2) for t in (targets, transposed))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=0, rtol=0)  # the same code on the same values


def test_zero_anchor_row_and_partial_grads():
    """A zero embedding takes F.normalize's eps branch; grads requested for one input only, or none."""
    anchor, protos, targets = _inputs(2, 5, 64, 32)
    anchor[3] = 0
    got, ref = _run(_triton(8), anchor, protos, targets, num_views=2), _ref64(anchor, protos, targets, num_views=2)
    bound = _bound(10, 64)
    assert max(_errors(got[:2], ref[:2]) + [rel_err(got[3], ref[3])]) <= bound
    other = torch.arange(anchor.shape[0]) != 3
    assert rel_err(got[2][other], ref[2][other]) <= bound
    assert rel_err(got[2][3], ref[2][3]) < 1e-7  # the kernels' eps literal is fp32's nearest value to 1e-12
    assert ref[2][3].abs().max() > 1e6  # the gradient of x / eps
    only_p = _run(lambda a, p, t, **kw: _triton(8)(a.detach(), p, t, **kw), anchor, protos, targets, num_views=2)
    assert only_p[2] is None and rel_err(only_p[3], got[3]) <= bound  # equal up to rounding, not bits
    with torch.no_grad():
        ce, mean = pce.prototype_cross_entropy(anchor.requires_grad_(), protos, targets, num_views=2, backend="triton")
    assert not ce.requires_grad and not mean.requires_grad
    assert_rounding_close(ce, got[0], F64, n=10 * 64, scale=10.0, name="no-grad ce")


def test_auto_is_torch_on_a_cpu_and_triton_on_cuda():
    anchor, protos, targets = _inputs(2, 6, 64, 32)
    auto = _run(pce.prototype_cross_entropy, anchor, protos, targets, num_views=2, tau=0.2)
    same = _run(pce.prototype_cross_entropy, anchor, protos, targets, num_views=2, tau=0.2,
                backend="triton" if anchor.is_cuda else "torch")
    for x, y in zip(auto, same):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    fused = _run(pce.prototype_cross_entropy, anchor, protos, targets, num_views=2, tau=0.2, backend="triton")
    assert max(_errors(fused, _ref64(anchor, protos, targets, num_views=2, tau=0.2))) <= _bound(12, 64, tau=0.2)


def test_one_rows_by_k_tensor_saved_for_backward():
    views, batch, k, d = 11, 4, 64, 32
    n = views * batch
    anchor, protos, targets = _inputs(views, batch, k, d, dtype=torch.float32)

    def saved(fn):
        found = []
        a, p = anchor.clone().requires_grad_(), protos.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: found.append(t) or t, lambda t: t):
            out = fn(a, p, targets, num_views=views)
        inputs = (a.data_ptr(), p.data_ptr(), targets.data_ptr())
        return [t for t in found if t.data_ptr() not in inputs], out

    fused, (ce, mean) = saved(_triton())
    rows_by_k = [t for t in fused if t.numel() >= n * k]
    assert len(rows_by_k) == 1 and rows_by_k[0].shape == (n, k) and rows_by_k[0].dtype == torch.float32
    assert sum(t.numel() for t in fused) == n * k + k * d + 2 * n  # plus p̂ [K, d], lse and rnorm [N]
    eager, _ = saved(pce.prototype_cross_entropy_ref)
    assert sum(t.numel() >= n * k for t in eager) >= 2


def test_a_second_backward_through_the_graph_gives_the_same_gradients():
    """The backward turns the saved logits into the gradient; a second one (retain_graph=True) rebuilds them, so
    the gradients accumulate to twice the first, on the fused path as on the reference."""
    anchor, protos, targets = _inputs(3, 4, 64, 32)
    grads = {}
    for name, fn in (("fused", _triton()), ("ref", pce.prototype_cross_entropy_ref)):
        a, p = anchor.clone().requires_grad_(), protos.clone().requires_grad_()
        ce, mean = fn(a, p, targets, num_views=3)
        loss = ce + (mean * torch.linspace(-1, 1, mean.numel(), dtype=mean.dtype)).sum()
        loss.backward(retain_graph=True)
        first = (a.grad.clone(), p.grad.clone())
        loss.backward()
        for g, g1 in zip((a.grad, p.grad), first):
            assert_rounding_close(g, 2 * g1, F64, 2, "accumulated")
        grads[name] = first
    for g, r in zip(grads["fused"], grads["ref"]):
        assert rel_err(g, r) <= _bound(12, 64)


def test_input_errors():
    anchor, protos, targets = _inputs(2, 3, 64, 32)
    op = pce.prototype_cross_entropy
    with pytest.raises(ValueError, match="num_views"):
        op(anchor, protos, targets, num_views=3, backend="triton")
    with pytest.raises(ValueError, match="dims differ"):
        op(anchor, protos[:, :16], targets, num_views=2, backend="triton")
    with pytest.raises(ValueError, match="2-D"):
        op(anchor[0], protos, targets, num_views=2, backend="triton")
    with pytest.raises(TypeError, match="dtype"):
        op(anchor.long(), protos, targets, num_views=2, backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        op(anchor, protos, targets, num_views=2, backend="cuda")
    wide = torch.zeros(2, tri.MAX_COLS + 1, device=DEVICE)
    with pytest.raises(ValueError, match="exceed"):
        op(wide, wide, torch.full((2, 2), 0.5, device=DEVICE), num_views=1, backend="triton")
    with pytest.raises(ValueError, match="power of two"):
        _triton(block_m=3)(anchor, protos, targets, num_views=2)



BAD_SCALARS = BAD_TAU_AND_VIEWS


@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
@pytest.mark.parametrize("case", list(BAD_SCALARS))
def test_bad_scalars_raise_before_dispatch(case, backend):
    anchor, protos, targets = _inputs(2, 3, 16, 8)
    raises_bad_scalar(pce.OP, BAD_SCALARS[case], lambda **kw: pce.prototype_cross_entropy(
        anchor, protos, targets, backend=backend, **{"num_views": 2, **kw}))


# (anchor, prototypes, targets) shapes -> what the message names.
BAD_SHAPES = {
    "empty_batch": ((0, 8), (16, 8), (0, 16), r"empty batch: anchor \(0, 8\), targets \(0, 16\)"),
    "empty_anchor": ((0, 8), (16, 8), (3, 16), r"empty batch: anchor \(0, 8\), targets \(3, 16\)"),
    "no_prototypes": ((6, 8), (0, 8), (3, 0), r"prototypes has shape \(0, 8\); need K >= 1"),
    "zero_dim": ((6, 0), (16, 0), (3, 16), r"embedding dim is 0 \(anchor \(6, 0\)\)"),
    "views_mismatch": ((5, 8), (16, 8), (3, 16), r"anchor has 5 rows but num_views=2 x 3 target rows"),
    "targets_not_k": ((6, 8), (16, 8), (3, 15), r"targets has shape \(3, 15\) but there are 16 prototypes"),
}


@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
@pytest.mark.parametrize("case", list(BAD_SHAPES))
def test_bad_shapes_raise_alike(case, backend):
    *shapes, match = BAD_SHAPES[case]  # (anchor, prototypes, targets)
    raises_bad_shapes(pce.OP, shapes, match, lambda a, p, t: pce.prototype_cross_entropy(
        a, p, t, num_views=2, backend=backend))


@pytest.mark.gpu
@pytest.mark.parametrize("name,views,batch", [("S/16", 11, 64), ("L/7", 11, 128)])
def test_gpu_real_shapes(name, views, batch):
    anchor, protos, targets = _inputs(views, batch, 1024, 256, dtype=torch.bfloat16, proto_dtype=torch.float32)
    kw = dict(num_views=views)
    ref = _ref64(anchor, protos, targets, **kw)
    got = _errors(_run(pce.prototype_cross_entropy, anchor, protos, targets, **kw, backend="triton"), ref)
    eager = _errors(_run(pce.prototype_cross_entropy_ref, anchor, protos, targets, **kw), ref)
    for n, g, e in zip(NAMES, got, eager):
        assert g <= 2 * e + LOWP_FLOOR[torch.bfloat16], (name, n, g, e)
