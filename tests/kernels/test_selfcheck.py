"""The kernels' first-use self-check (msn_fast.kernels.selfcheck), under the Triton interpreter.

Each op's launcher is broken on purpose (wrong forward values, wrong gradients, a compile error); with
backend="auto" the first call must warn once, naming the op, and give the torch result; later calls of that
shape class stay on torch without checking again; backend="triton" raises; MSN_FAST_SELFCHECK=0 lets the
broken value through (so it is the check that catches it). "auto" is pointed at the interpreter for CPU
tensors through _utils.AUTO_TRITON_ON_INTERPRETER (on a GPU it picks Triton for CUDA tensors).
"""

import importlib
import os
import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from msn_fast.kernels import _utils, attention, embed_kept_patches, gather_tokens, prototype_cross_entropy, selfcheck
from msn_fast.loss import msn_loss

if not (_utils.HAS_TRITON and (torch.cuda.is_available() or _utils.interpreting())):
    pytest.skip("needs Triton with a CUDA GPU or TRITON_INTERPRET=1 (tests/conftest.py sets it)",
                allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
attn_mod, patch_mod, gather_mod = (importlib.import_module(f"msn_fast.kernels.{m}") for m in
                                   ("attention", "patch_embed", "token_gather"))  # fmt: skip
tri = importlib.import_module("msn_fast.kernels.prototype_ce_triton")


def _gather_inputs(d=48):
    idx = torch.stack([torch.randperm(20)[:7] for _ in range(3)]).to(DEVICE)
    return dict(tokens=torch.randn(3, 20, d, device=DEVICE, requires_grad=True), keep_idx=idx,
                pos_embed=torch.randn(20, d, device=DEVICE, requires_grad=True))


def _attention_inputs(d=32):
    return {n: torch.randn(2, 2, 17, d, device=DEVICE, requires_grad=True) for n in "qkv"}


def _patch_inputs(d=40):
    idx = torch.stack([torch.randperm(16)[:5] for _ in range(3)]).to(DEVICE)
    return dict(images=torch.randn(3, 3, 16, 16, device=DEVICE), keep_idx=idx,
                weight=torch.randn(d, 3, 4, 4, device=DEVICE, requires_grad=True),
                bias=torch.randn(d, device=DEVICE, requires_grad=True),
                pos_embed=torch.randn(16, d, device=DEVICE, requires_grad=True))


def _loss_inputs(d=24):
    """Arguments of the whole objective, msn_fast.loss.msn_loss, which calls prototype_cross_entropy."""
    return dict(anchor=torch.randn(3 * 10, d, device=DEVICE, requires_grad=True),
                target=torch.randn(10, d, device=DEVICE),
                prototypes=torch.randn(16, d, device=DEVICE, requires_grad=True), num_views=3, sinkhorn_iters=3)


def _ce_inputs(d=24):
    return dict(anchor=torch.randn(3 * 10, d, device=DEVICE, requires_grad=True),
                prototypes=torch.randn(16, d, device=DEVICE, requires_grad=True),
                targets=torch.softmax(4 * torch.randn(10, 16, device=DEVICE), dim=1), num_views=3)


def _times(k: float):
    return lambda x: None if x is None else x * k


def _nan_first(r):
    """Poison one element of the launcher's (first) output with NaN: |NaN - ref| > bound is False."""
    first = (r[0] if isinstance(r, tuple) else r).clone()
    first.view(-1)[0] = float("nan")
    return (first,) + tuple(r[1:]) if isinstance(r, tuple) else first


# op -> (public function, inputs, first output, (module, forward launcher, how to break its result),
#        (module, backward launcher, how to break its result))
CASES = {
    "gather_tokens": (gather_tokens, _gather_inputs, lambda out: out,
                      (gather_mod, "token_gather_fwd", _times(1.5)), (gather_mod, "token_gather_bwd", _times(0.0))),
    "attention": (attention, _attention_inputs, lambda out: out,
                  (attn_mod, "attention_fwd", lambda r: (r[0] * 1.5, r[1])),
                  (attn_mod, "attention_bwd", lambda r: (r[0], r[1], r[2] * 1.5))),
    "embed_kept_patches": (embed_kept_patches, _patch_inputs, lambda out: out,
                           (patch_mod, "patch_embed_fwd", _times(1.5)),
                           (patch_mod, "patch_embed_bwd", lambda r: (r[0], _times(1.5)(r[1])))),
    "prototype_cross_entropy": (prototype_cross_entropy, _ce_inputs, lambda out: out[0],
                                (tri, "prototype_ce_fwd", lambda r: (r[0] * 1.5,) + tuple(r[1:])),
                                (tri, "l2norm_bwd", _times(1.5))),
}  # fmt: skip


def _call(op, inputs, backend):
    fn, _, first = CASES[op][:3]
    if op == "attention":
        return first(fn(inputs["q"], inputs["k"], inputs["v"], backend=backend))
    return first(fn(**inputs, backend=backend))


def _grads(op, inputs, backend):
    for v in inputs.values():
        if isinstance(v, torch.Tensor):
            v.grad = None
    out = _call(op, inputs, backend)
    out.backward(torch.ones_like(out))
    return out.detach(), {k: v.grad for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}


@pytest.fixture
def checking(monkeypatch):
    monkeypatch.setenv("MSN_FAST_SELFCHECK", "1")
    monkeypatch.setattr(_utils, "AUTO_TRITON_ON_INTERPRETER", True)
    selfcheck.reset()
    yield
    selfcheck.reset()


def _spy(monkeypatch, module, name, change=None):
    """Replace module.name by a wrapper that counts calls and changes the result (or raises)."""
    real, calls = getattr(module, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if isinstance(change, Exception):
            raise change
        out = real(*args, **kwargs)
        return out if change is None else change(out)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def _no_selfcheck_warning(fn):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = fn()
    ours = [str(w.message) for w in seen if issubclass(w.category, selfcheck.KernelSelfCheckWarning)]
    assert not ours, ours
    return out


@pytest.mark.parametrize("op", list(CASES))
def test_a_correct_kernel_is_checked_once_per_shape_class_then_runs(op, checking, monkeypatch):
    module, launcher = CASES[op][3][:2]
    launches = _spy(monkeypatch, module, launcher)
    checks = _spy(monkeypatch, selfcheck, "check_op")
    inputs = CASES[op][1]()
    _no_selfcheck_warning(lambda: _grads(op, inputs, "auto"))
    assert len(checks) == 1 and len(launches) == 2  # the slice, then the call itself
    _no_selfcheck_warning(lambda: _grads(op, inputs, "auto"))
    assert len(checks) == 1 and len(launches) == 3  # no second check
    (res,) = selfcheck.results()
    assert res.ok and res.op == op and res.max_err and all(res.max_err[k] <= res.bound[k] for k in res.max_err)
    assert any(k.startswith("d") for k in res.max_err), "gradients were not compared"
    with torch.no_grad():  # another key (no gradients), checked again
        _call(op, inputs, "auto")
    assert len(checks) == 2


@pytest.mark.parametrize("op", list(CASES))
@pytest.mark.parametrize("broken", ["forward", "backward", "compile", "nan"])
def test_a_broken_kernel_warns_once_and_auto_falls_back_to_torch(op, broken, checking, monkeypatch):
    inputs = CASES[op][1]()
    ref_out, ref_grads = _grads(op, inputs, "torch")
    module, launcher, change = CASES[op][3] if broken != "backward" else CASES[op][4]
    if broken == "compile":
        change = RuntimeError("PTX assembly failed: ptxas fatal (made up for the test)")
    if broken == "nan":
        change = _nan_first
    calls = _spy(monkeypatch, module, launcher, change)
    with pytest.warns(selfcheck.KernelSelfCheckWarning) as seen:
        out, grads = _grads(op, inputs, "auto")
    (w,) = [w for w in seen if issubclass(w.category, selfcheck.KernelSelfCheckWarning)]
    msg = str(w.message)
    assert f"Triton {op} " in msg and torch.__version__ in msg and _utils.triton.__version__ in msg, msg
    named = {"compile": ["made up for the test"], "forward": ["out:", "ce:"], "nan": ["error inf"],
             "backward": [f"d{k}:" for k in ref_grads]}
    assert any(s in msg for s in named[broken]), msg  # what was wrong: the exception, or the output over its bound
    # the torch path's result: same code, same inputs
    assert torch.equal(out, ref_out) and all(torch.equal(grads[k], ref_grads[k]) for k in ref_grads)
    n = len(calls)
    out2, _ = _no_selfcheck_warning(lambda: _grads(op, inputs, "auto"))
    assert len(calls) == n and torch.equal(out2, ref_out)  # stays on torch, no second warning
    (res,) = selfcheck.results()
    assert not res.ok and res.op == op


@pytest.mark.parametrize("op", list(CASES))
def test_backend_triton_raises_on_a_broken_kernel(op, checking, monkeypatch):
    module, launcher, change = CASES[op][3]
    _spy(monkeypatch, module, launcher, change)
    with pytest.raises(selfcheck.KernelSelfCheckError, match=f"Triton {op} disagrees"):
        _call(op, CASES[op][1](), "triton")


def test_selfcheck_off_lets_the_broken_value_through(checking, monkeypatch):
    """MSN_FAST_SELFCHECK=0: nothing is checked, so the broken kernel's value comes out (the check is
    what caught it above)."""
    monkeypatch.setenv("MSN_FAST_SELFCHECK", "0")
    inputs = _gather_inputs()
    ref = _call("gather_tokens", inputs, "torch")
    _spy(monkeypatch, gather_mod, "token_gather_fwd", _times(1.5))
    out = _no_selfcheck_warning(lambda: _call("gather_tokens", inputs, "auto"))
    torch.testing.assert_close(out, ref * 1.5)
    assert selfcheck.results() == []


def test_a_new_shape_class_is_checked_again_and_the_check_leaves_the_rng_alone(checking, monkeypatch):
    checks = _spy(monkeypatch, selfcheck, "check_op")
    state = torch.get_rng_state()
    q64 = _attention_inputs(64)
    torch.set_rng_state(state)
    _call("attention", _attention_inputs(32), "auto")
    after = torch.get_rng_state()
    torch.set_rng_state(state)
    _attention_inputs(32)
    assert torch.equal(after, torch.get_rng_state())  # the check drew nothing from the global generator
    _call("attention", q64, "auto")  # head dim 64: its own check
    assert len(checks) == 2 and len(selfcheck.results()) == 2


def test_inference_mode_and_a_1d_index_are_checked(checking, monkeypatch):
    checks = _spy(monkeypatch, selfcheck, "check_op")
    inputs = _gather_inputs()
    inputs["keep_idx"] = inputs["keep_idx"][0]  # [K] shared by the batch
    with torch.inference_mode():
        out = _no_selfcheck_warning(lambda: _call("gather_tokens", inputs, "auto"))
    torch.testing.assert_close(out, _call("gather_tokens", inputs, "torch").detach())
    assert len(checks) == 1 and selfcheck.results()[0].ok


def test_check_op_reports_and_never_raises_for_a_kernel_failure(monkeypatch):
    inputs = _gather_inputs()
    assert selfcheck.check_op("gather_tokens", **inputs).ok
    _spy(monkeypatch, gather_mod, "token_gather_fwd", RuntimeError("no kernel image for this GPU"))
    res = selfcheck.check_op("gather_tokens", **inputs)
    assert not res.ok and "no kernel image" in res.error and res.shapes.startswith("tokens=[3, 20, 48]")
    with pytest.raises(ValueError, match="unknown op"):
        selfcheck.check_op("softmax", x=inputs["tokens"])


# ---- the prototype cross-entropy inside the MSN loss: every rank takes the same path -------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), MSN_FAST_SELFCHECK="1")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        _utils.AUTO_TRITON_ON_INTERPRETER = True
        if rank == 1:  # only this rank's kernel is wrong
            real = tri.prototype_ce_fwd
            tri.prototype_ce_fwd = lambda *a, **k: (lambda r: (r[0] * 1.5,) + tuple(r[1:]))(real(*a, **k))
        torch.manual_seed(rank)
        inputs = _loss_inputs()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            got = msn_loss(**inputs, backend="auto")[0]  # the loss passes its process group to the op
        ref = msn_loss(**inputs, backend="torch")[0]
        warned = [str(w.message) for w in seen if issubclass(w.category, selfcheck.KernelSelfCheckWarning)]
        results[rank] = (torch.equal(got, ref), warned)
    finally:
        torch.distributed.destroy_process_group()


def test_the_loss_decision_is_agreed_across_ranks():
    """Rank 1's fused cross-entropy is wrong, rank 0's is right: both take the torch path (msn_fast.loss asks the
    op to agree over its process group, so every rank runs the same code and rank 0, the one that logs, learns of
    the failure), and rank 0 says why."""
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(_free_port(), results), nprocs=2, join=True)
    for rank in (0, 1):
        same_as_torch, warned = results[rank]
        assert same_as_torch, f"rank {rank} did not take the torch path"
        assert len(warned) == 1 and "prototype_cross_entropy" in warned[0], warned
    assert "another rank" in results[0][1][0] and "another rank" not in results[1][1][0]
