"""The MSN objective (msn_fast.loss.msn_loss) on the fused op vs its eager reference: loss, statistics, grads.

backend="triton" runs the prototype cross-entropy's kernels (msn_fast.kernels.prototype_cross_entropy, tested
on its own in tests/kernels/test_prototype_ce.py) inside the whole objective: targets, Sinkhorn, ME-MAX. On a
CPU the kernels run in the Triton interpreter (tests/conftest.py). fp64 inputs run the kernels in fp64 and must
match the reference to rounding; fp32 and bf16 inputs must be as close to the fp64 reference as plain torch is
(x2, plus a floor). A 2-process gloo run checks that the distributed p̄ and Sinkhorn sums reproduce one process
holding the whole batch. `gpu` tests use MSN's shapes.
"""

import functools
import math
import os
import socket
import subprocess
import sys
from unittest import mock

import pytest
import torch
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

from msn_fast import loss as ml
from msn_fast.kernels import prototype_ce as pce
from msn_fast.kernels import prototype_ce_triton as tri

F64 = torch.float64


def _inputs(views, batch, k, d, dtype=F64, proto_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seeded(seed))  # changes with MSN_TEST_SEED
    target = torch.randn(batch, d, generator=g, dtype=F64)
    # Anchors near their target (as after some training) so CE and the gradients are not just noise.
    anchor = target.repeat(views, 1) + 0.8 * torch.randn(views * batch, d, generator=g, dtype=F64)
    protos = torch.rand(k, d, generator=g, dtype=F64) * 0.125 - 0.0625  # MSN init, U(±1/√256)
    return anchor.to(DEVICE, dtype), target.to(DEVICE, dtype), protos.to(DEVICE, proto_dtype or dtype)


def _run(fn, anchor, target, protos, grad_scale=0.7, **kw):
    """loss, stats and (∂anchor, ∂prototypes) of fn at fresh leaves; the upstream gradient is grad_scale."""
    a, p = anchor.detach().clone().requires_grad_(), protos.detach().clone().requires_grad_()
    t = target.detach().clone().requires_grad_()  # must receive no gradient
    loss, stats = fn(a, t, p, **kw)
    (loss * grad_scale).backward()
    assert t.grad is None
    return loss.detach(), stats, a.grad, p.grad


def _triton(block_m=None):
    """msn_loss on the fused op, its kernels at `block_m` rows per program (None: the launchers' choice; the
    op keeps it for its backward)."""
    fused = functools.partial(pce._prototype_cross_entropy_triton, block_m=block_m)

    def fn(a, t, p, **kw):
        with mock.patch.object(pce, "_prototype_cross_entropy_triton", fused):
            return ml.msn_loss(a, t, p, **kw, backend="triton")
    return fn


def _ref64(anchor, target, protos, **kw):
    """The reference objective, everything in float64."""
    return _run(ml.msn_loss_ref, anchor.double(), target.double(), protos.double(), **kw)



def _loss_bound(rows, k, tau=0.1, dtype=F64):
    """Relative error the rounding model allows in `dtype`: sums over rows x K entries, each through
    exp of a logit cos/τ whose conditioning is |cos|/τ <= 1/τ (conftest.rounding_bound). In fp32 it is
    the floor of the 2 x plain-torch rule, so the floor scales with 1/τ (the logits)."""
    return rounding_bound(dtype, rows * k, 1 / tau)


def _errors(res, ref):
    """Relative max errors of loss, CE, ME-MAX, mean max target prob, ∂anchor, ∂prototypes."""
    (loss, st, da, dp), (rloss, rst, rda, rdp) = res, ref
    return [abs(loss.item() - rloss.item()) / max(1.0, abs(rloss.item())),
            abs(st.ce.item() - rst.ce.item()) / max(1.0, abs(rst.ce.item())),
            abs(st.me_max.item() - rst.me_max.item()),
            abs(st.max_target_prob.item() - rst.max_target_prob.item()),
            rel_err(da, rda), rel_err(dp, rdp)]


# (views, batch, K, d, sinkhorn iters, rows per program): row counts that do not divide the block,
# K in {64, 1024} (and 37), embedding dims that are not powers of two.
CASES = [
    (1, 7, 64, 32, 0, 4),
    (1, 7, 64, 32, 3, 4),
    (11, 3, 64, 40, 0, 8),
    (11, 7, 64, 40, 3, 16),  # 77 rows in blocks of 16: a partial last block
    (11, 5, 1024, 48, 0, None),
    (11, 5, 1024, 48, 3, 16),
    (1, 20, 1024, 24, 3, 8),  # 20 targets (Sinkhorn and the statistics are torch on both paths)
    (3, 4, 37, 24, 3, 2),
]


@pytest.mark.parametrize("views,batch,k,d,sk,block_m", CASES)
def test_fp64_matches_reference(views, batch, k, d, sk, block_m):
    anchor, target, protos = _inputs(views, batch, k, d)
    got = _run(_triton(block_m), anchor, target, protos, num_views=views, sinkhorn_iters=sk)
    ref = _ref64(anchor, target, protos, num_views=views, sinkhorn_iters=sk)
    bound = _loss_bound(views * batch, k)
    names = ("loss", "ce", "me_max", "max_target_prob", "d_anchor", "d_prototypes")
    for name, err in zip(names, _errors(got, ref)):
        assert err <= bound, (name, err, bound)
    assert got[1].num_targets.item() == ref[1].num_targets.item() > 1
    assert got[2].dtype == got[3].dtype == F64
    assert ref[0].item() > 0.5 and ref[1].me_max.item() > 1e-4  # both terms matter in these inputs


@pytest.mark.parametrize("views,batch,k,d,sk", [(11, 5, 1024, 48, 3), (1, 7, 64, 32, 0), (11, 3, 64, 40, 3)])
def test_fp32_close_to_fp64_reference(views, batch, k, d, sk):
    anchor, target, protos = _inputs(views, batch, k, d, dtype=torch.float32)
    kw = dict(num_views=views, sinkhorn_iters=sk)
    got = _errors(_run(_triton(), anchor, target, protos, **kw), _ref64(anchor, target, protos, **kw))
    eager = _errors(_run(ml.msn_loss_ref, anchor, target, protos, **kw), _ref64(anchor, target, protos, **kw))
    floor = _loss_bound(views * batch, k, dtype=torch.float32)
    for name, g, e in zip(("loss", "ce", "me_max", "max_target_prob", "d_anchor", "d_prototypes"), got, eager):
        assert g <= 2 * e + floor, (name, g, e, floor)


@pytest.mark.parametrize("dtype,proto_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float16, torch.float32)])
def test_low_precision_inputs(dtype, proto_dtype):
    """Under the interpreter fp32 -> bf16 stores truncate (the GPU rounds to nearest), so ∂anchor's
    error here is up to 2x torch's; the rule below still holds with that."""
    views, batch, k, d = 11, 3, 1024, 48
    anchor, target, protos = _inputs(views, batch, k, d, dtype=dtype, proto_dtype=proto_dtype)
    kw = dict(num_views=views, sinkhorn_iters=3)
    loss, stats, da, dp = got = _run(_triton(), anchor, target, protos, **kw)
    assert loss.dtype == torch.float32 and da.dtype == dtype and dp.dtype == proto_dtype
    ref = _ref64(anchor, target, protos, **kw)  # the same bf16 values, upcast
    eager = _errors(_run(ml.msn_loss_ref, anchor, target, protos, **kw), ref)
    floor = LOWP_FLOOR[dtype]
    for name, g, e in zip(("loss", "ce", "me_max", "max_target_prob", "d_anchor", "d_prototypes"), _errors(got, ref),
                          eager):
        assert g <= 2 * e + floor, (name, g, e)
    # The maths is fp32 inside: before the output cast the values are as good as fp32's.
    assert _errors(got, ref)[0] <= _loss_bound(views * batch, k, dtype=torch.float32)


def test_poisoned_buffers_are_fully_written():
    anchor, target, protos = _inputs(3, 5, 37, 40)  # 15 rows in blocks of 4, K and d not powers of two
    kw = dict(num_views=3, sinkhorn_iters=3)
    clean = _run(_triton(block_m=4), anchor, target, protos, **kw)

    def poisoned(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else 10**9  # an unwritten element shows
        return torch.full(shape, fill, dtype=dtype, device=device)

    with mock.patch.object(tri, "_empty", poisoned):
        dirty = _run(_triton(block_m=4), anchor, target, protos, **kw)
    for x, y in zip((clean[0], *clean[1], clean[2], clean[3]), (dirty[0], *dirty[1], dirty[2], dirty[3])):
        assert torch.isfinite(y).all()
        torch.testing.assert_close(x, y, atol=0, rtol=0)


def test_zero_anchor_row_and_partial_grads():
    """A zero embedding takes F.normalize's eps branch; grads requested for one input only, or none."""
    anchor, target, protos = _inputs(2, 5, 64, 32)
    anchor[3] = 0
    kw = dict(num_views=2, sinkhorn_iters=0)
    got, ref = _run(_triton(8), anchor, target, protos, **kw), _ref64(anchor, target, protos, **kw)
    bound = _loss_bound(10, 64)
    assert max(_errors(got, ref)[:4] + [rel_err(got[3], ref[3])]) <= bound
    other = torch.arange(anchor.shape[0]) != 3
    assert rel_err(got[2][other], ref[2][other]) <= bound
    assert rel_err(got[2][3], ref[2][3]) < 1e-7  # the kernels' eps literal is fp32's nearest value to 1e-12
    assert ref[2][3].abs().max() > 1e6  # the gradient of x / eps
    # Other paths through the same maths (one grad requested, or none): equal up to rounding, not bits.
    only_p = protos.clone().requires_grad_()
    _triton(8)(anchor, target, only_p, **kw)[0].mul(0.7).backward()
    assert rel_err(only_p.grad, got[3]) <= bound
    with torch.no_grad():
        loss, stats = ml.msn_loss(anchor.requires_grad_(), target, protos, **kw, backend="triton")
    assert not loss.requires_grad
    assert_rounding_close(loss, got[0], F64, n=10 * 64, scale=10.0, name="no-grad loss")


def test_backend_switch_and_other_hyperparameters():
    anchor, target, protos = _inputs(2, 6, 64, 32)
    kw = dict(num_views=2, tau=0.2, sharpen=0.5, me_max_weight=5.0, sinkhorn_iters=2)
    auto = _run(ml.msn_loss, anchor, target, protos, **kw)  # Triton on CUDA, torch on a CPU
    same = _run(ml.msn_loss, anchor, target, protos, **kw, backend="triton" if anchor.is_cuda else "torch")
    torch.testing.assert_close(auto[2], same[2], atol=0, rtol=0)
    ref = _ref64(anchor, target, protos, **kw)
    fused = _run(ml.msn_loss, anchor, target, protos, **kw, backend="triton")
    bound = _loss_bound(12, 64, tau=0.2)
    assert max(_errors(fused, ref)) <= bound
    kw["me_max_weight"] = 0.0  # λ = 0: the ME-MAX term leaves the gradient but is still reported
    got, ref = _run(_triton(), anchor, target, protos, **kw), _ref64(anchor, target, protos, **kw)
    assert max(_errors(got, ref)) <= bound and got[1].me_max.item() > 1e-4


def test_one_rows_by_k_tensor_saved_for_backward():
    views, batch, k, d = 11, 4, 64, 32
    anchor, target, protos = _inputs(views, batch, k, d, dtype=torch.float32)

    def saved(fn):
        found = []
        a, p = anchor.clone().requires_grad_(), protos.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: found.append(t) or t, lambda t: t):
            fn(a, target, p, num_views=views)
        return [t for t in found if t.data_ptr() not in (a.data_ptr(), p.data_ptr())]

    fused = saved(_triton())
    rows_by_k = [t for t in fused if t.numel() >= views * batch * k]
    assert len(rows_by_k) == 1 and rows_by_k[0].shape == (views * batch, k)
    # Plus the normalised prototypes [K, d], the op's lse and rnorm [N], the targets [B, K] its backward reads,
    # and ME-MAX's p̄ [K] (xlogy keeps it as both of its arguments).
    n = views * batch
    assert sum(t.numel() for t in fused) == n * k + k * d + 2 * n + batch * k + 2 * k
    eager = saved(ml.msn_loss_ref)
    assert sum(t.numel() >= views * batch * k for t in eager) >= 2


def test_input_errors():
    anchor, target, protos = _inputs(2, 3, 64, 32)
    loss = ml.msn_loss
    with pytest.raises(ValueError, match="num_views"):
        loss(anchor, target, protos, num_views=3, backend="triton")
    with pytest.raises(ValueError, match="dims differ"):
        loss(anchor, target, protos[:, :16], num_views=2, backend="triton")
    with pytest.raises(ValueError, match="2-D"):
        loss(anchor[0], target, protos, num_views=2, backend="triton")
    with pytest.raises(TypeError, match="dtype"):
        loss(anchor.long(), target, protos, num_views=2, backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        loss(anchor, target, protos, num_views=2, backend="cuda")
    wide = torch.zeros(2, tri.MAX_COLS + 1, device=DEVICE)
    with pytest.raises(ValueError, match="exceed"):
        loss(wide, wide, wide, num_views=1, backend="triton")
    with pytest.raises(ValueError, match="power of two"):
        _triton(block_m=3)(anchor, target, protos, num_views=2)




NAN, INF = float("nan"), float("inf")
# Each bad scalar gave NaN (torch) or a ZeroDivisionError (Triton), or a loss for a nonsensical value.
BAD_SCALARS = {
    **BAD_TAU_AND_VIEWS,
    "sharpen_zero": ("sharpen", 0.0, "finite number > 0"),
    "sharpen_negative": ("sharpen", -0.25, "finite number > 0"),
    "sharpen_nan": ("sharpen", NAN, "finite number > 0"),
    "sharpen_inf": ("sharpen", INF, "finite number > 0"),
    "me_max_nan": ("me_max_weight", NAN, "finite number"),
    "me_max_inf": ("me_max_weight", -INF, "finite number"),
    "sinkhorn_negative": ("sinkhorn_iters", -1, "integer >= 0"),
    "sinkhorn_float": ("sinkhorn_iters", 1.5, "integer >= 0"),
}


@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
@pytest.mark.parametrize("case", list(BAD_SCALARS))
def test_bad_hyperparameters_raise_before_dispatch(case, backend):
    anchor, target, protos = _inputs(2, 3, 16, 8)
    raises_bad_scalar("msn_loss", BAD_SCALARS[case], lambda **kw: ml.msn_loss(
        anchor, target, protos, backend=backend, **{"num_views": 2, **kw}))


# (anchor rows, target rows, prototypes, embedding dim) -> what the message names.
BAD_SHAPES = {
    "empty_batch": ((0, 8), (0, 8), (16, 8), r"empty batch: anchor \(0, 8\), target \(0, 8\)"),
    "empty_anchor": ((0, 8), (3, 8), (16, 8), r"empty batch: anchor \(0, 8\), target \(3, 8\)"),
    "no_prototypes": ((6, 8), (3, 8), (0, 8), r"prototypes has shape \(0, 8\); need K >= 1"),
    "zero_dim": ((6, 0), (3, 0), (16, 0), r"embedding dim is 0 \(anchor \(6, 0\)\)"),
    "views_mismatch": ((5, 8), (3, 8), (16, 8), r"anchor has 5 rows but num_views=2 x 3 target rows"),
}


@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
@pytest.mark.parametrize("case", list(BAD_SHAPES))
def test_bad_shapes_raise_alike(case, backend):
    *shapes, match = BAD_SHAPES[case]  # (anchor, target, prototypes)
    raises_bad_shapes("msn_loss", shapes, match, lambda a, t, p: ml.msn_loss(a, t, p, num_views=2, backend=backend))


# ------------------------------------------------------------------------------------ two processes, gloo

_WORKER = r"""
import os, sys
import torch, torch.distributed as dist
rank, world, port, folder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
from msn_fast import loss as ml
inp = torch.load(os.path.join(folder, "inputs.pt"))
views, b = inp["views"], inp["target"].shape[0] // world
target = inp["target"][rank * b:(rank + 1) * b]
anchor = inp["anchor"].view(views, world * b, -1)[:, rank * b:(rank + 1) * b].reshape(views * b, -1)
out = {}
for sk in (0, 3):
    for backend in ("triton", "torch"):
        a, p = anchor.clone().requires_grad_(), inp["protos"].clone().requires_grad_()
        loss, st = ml.msn_loss(a, target, p, num_views=views, sinkhorn_iters=sk, backend=backend)
        loss.backward()
        out[(sk, backend)] = (loss.detach(), st.ce, st.me_max, st.max_target_prob, a.grad, p.grad)
    out[("q", sk)] = ml.target_probs(target, inp["protos"], 0.1, 0.25, sk, None)
torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
print(f"RESULT rank={rank} ok", flush=True)
dist.barrier()
dist.destroy_process_group()
os._exit(0)
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_matches_one_process(tmp_path):
    """Rank r holds targets r*B..r*B+B-1 and, for each view, the same rows of anchors.

    Exact relations with one process holding the whole batch (identity backward of the p̄ all-reduce):
    mean of rank losses = loss; ME-MAX identical on every rank; rank targets (with Sinkhorn) = the
    process's rows; ∂anchor on a rank = world x ∂anchor of those rows; mean of ranks' ∂prototypes
    (what DDP averaging gives) = ∂prototypes.
    """
    world, views, b, k, d = 2, 3, 4, 64, 32
    anchor, target, protos = _inputs(views, world * b, k, d)
    torch.save({"anchor": anchor, "target": target, "protos": protos, "views": views}, tmp_path / "inputs.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(r), str(world), port, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for r, (p, o) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"RESULT rank={r} ok" in o, o[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    rows = [torch.arange(world * b).view(world, b)[r].repeat(views) + torch.arange(views).repeat_interleave(b)
            * world * b for r in range(world)]  # the single-process anchor rows held by rank r
    tol = _loss_bound(views * world * b, k)  # other summation orders across ranks: rounding, not bits
    close = dict(atol=tol, rtol=tol)
    for sk in (0, 3):
        q_single = ml.target_probs(target, protos, 0.1, 0.25, sk, None)
        for r in range(world):
            torch.testing.assert_close(ranks[r][("q", sk)], q_single[r * b:(r + 1) * b], **close)
        for backend in ("triton", "torch"):
            single = _run(ml.msn_loss, anchor, target, protos, grad_scale=1.0, num_views=views,
                          sinkhorn_iters=sk, backend=backend)
            loss, ce, me_max, max_t, da, dp = (torch.stack([rk[(sk, backend)][i] for rk in ranks]) for i in range(6))
            torch.testing.assert_close(loss.mean(), single[0], **close)
            torch.testing.assert_close(ce.mean(), single[1].ce, **close)
            torch.testing.assert_close(me_max, single[1].me_max.expand(world), **close)
            torch.testing.assert_close(max_t.mean(), single[1].max_target_prob, **close)
            for r in range(world):
                torch.testing.assert_close(da[r], world * single[2][rows[r]], **close)
            torch.testing.assert_close(dp.mean(0), single[3], **close)
            if backend == "triton":  # and the distributed kernel equals the distributed reference
                ref = [rk[(sk, "torch")] for rk in ranks]
                for r in range(world):
                    for x, y in zip(ranks[r][(sk, "triton")], ref[r]):
                        torch.testing.assert_close(x, y, **close)


# ------------------------------------------------------------------------------------------- real shapes


@pytest.mark.gpu
@pytest.mark.parametrize("name,views,batch", [("S/16", 11, 64), ("L/7", 11, 128)])
@pytest.mark.parametrize("sk", [0, 3])
def test_gpu_real_shapes(name, views, batch, sk):
    anchor, target, protos = _inputs(views, batch, 1024, 256, dtype=torch.bfloat16, proto_dtype=torch.float32)
    kw = dict(num_views=views, sinkhorn_iters=sk)
    got = _run(ml.msn_loss, anchor, target, protos, **kw, backend="triton")
    ref = _ref64(anchor, target, protos, **kw)
    eager = _errors(_run(ml.msn_loss_ref, anchor, target, protos, **kw), ref)
    for g, e in zip(_errors(got, ref), eager):
        assert g <= 2 * e + LOWP_FLOOR[torch.bfloat16], (name, g, e)
    a32, t32, p32 = anchor.float(), target.float(), protos
    got32 = _errors(_run(ml.msn_loss, a32, t32, p32, **kw, backend="triton"), ref)
    eager32 = _errors(_run(ml.msn_loss_ref, a32, t32, p32, **kw), ref)
    for g, e in zip(got32, eager32):  # fp32 GEMMs: cuBLAS in both paths; allow for the kernels' own rounding
        assert g <= 2 * e + 1e-4, (name, g, e)
    assert math.isfinite(got[0].item())
