"""Triton attention vs an fp64 eager reference: output and dQ, dK, dV, at odd lengths and head dims.

On a CPU the kernels run in the Triton interpreter (tests/conftest.py); the `gpu` tests repeat the
checks at MSN's real shapes. fp32 is held to elementwise bounds from a rounding model (_fp32_bounds),
peaked softmaxes included; fp16/bf16 to the flash-attention rule: the kernel's max error vs the
reference is at most twice plain torch's same-dtype error plus a floor (tests/conftest.py).
"""

import importlib
import re
import warnings

import pytest
import torch
from conftest import DEVICE, HAS_CUDA, assert_flash_rule, assert_rounding_close, assert_within

from msn_fast.kernels import attention_triton as attn_tri
from msn_fast.kernels.attention import SUPPORTED_HEAD_DIMS, attention, attention_bwd, attention_fwd, attention_ref

# In the interpreter, masked-off lanes of a load without `other=` read NaN (undefined on a GPU).
pytestmark = pytest.mark.usefixtures("poison_masked_loads")


@pytest.fixture(autouse=True)
def _first_config_only(monkeypatch):
    """On a GPU, skip autotuning (compiling ~18 configs per head dim and dtype would dominate the run);
    test_every_block_config covers each config and the bench validates the autotuned choice."""
    monkeypatch.setenv("MSN_FAST_AUTOTUNE", "0")


# The package re-exports the function `attention` under the module's own name, so fetch the module.
attn_mod = importlib.import_module("msn_fast.kernels.attention")


def _rand(shape, dtype, mag=1.0):
    return (torch.randn(shape, device=DEVICE, dtype=torch.float32) * mag).to(dtype)


def _grads(fn, q, k, v, do):
    """Output and (dq, dk, dv) of fn at fresh leaves made from q, k, v."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    return (out, *torch.autograd.grad(out, leaves, do.to(out.dtype)))


def _plain_same_dtype(q, k, v, scale=None):
    """What a user gets from plain torch ops at the input dtype (no fp32 upcast)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    p = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)
    return p @ v


def _fp32_bounds(q, k, v, do, scale=None, safety=2.0):
    """Elementwise error bounds for fp32 (out, dq, dk, dv) of attention against fp64, from a rounding
    model of the computation (every tensor here is fp64, built from the fp32 inputs).

    u = 2^-24. A logit s_ij = scale·q_i·k_j summed over D terms in fp32 is off by at most
    δ = u·(sqrt(D)·scale·max(|q|·|k|ᵀ) + 4·max|s| + 1) (the dot product, then the scale, the log2(e)
    fold, the max subtraction and exp2). A softmax weight moves by a relative ρ = 2δ + 2·sqrt(N)·u
    (numerator and denominator), however peaked the softmax is: its conditioning is all in δ, which
    grows with the logits' magnitude. Propagating ρ and the sqrt(n)·u of each further sum through
    out = P v, dv = Pᵀ dO, dS = P∘(dO vᵀ - rowsum(dO∘out)), dq = scale·dS k, dk = scale·dSᵀ q, with
    absolute values, gives a bound per element; `safety` covers the first-order approximations.
    Contributions below u·max of a tensor (fp32 underflow of tiny weights) are absorbed by a floor
    at that level. Measured: the kernel's and plain fp32 torch's errors stay under 7% of these bounds
    (seeds 0-3, std-1 and peaked inputs), while the same maths on inputs rounded to tf32 (what a dot
    that silently dropped to tf32 would do) exceeds them 1.3-66x (seeds 0-2); a wrong rescale, mask or
    scale is an O(1) relative error.
    """
    u = 2.0**-24
    q, k, v, do = (t.double() for t in (q, k, v, do))
    n_kv, d, dv_dim = k.shape[-2], q.shape[-1], v.shape[-1]
    scale = d**-0.5 if scale is None else scale
    qa, ka, va, doa = q.abs(), k.abs(), v.abs(), do.abs()
    s = (q @ k.transpose(-2, -1)) * scale
    p = torch.softmax(s, dim=-1)
    pt = p.transpose(-2, -1)
    delta = u * (d**0.5 * scale * (qa @ ka.transpose(-2, -1)).amax() + 4 * s.abs().amax() + 1)
    rho = 2 * delta + 2 * n_kv**0.5 * u
    sum_kv = n_kv**0.5 * u
    out = p @ v
    dp = do @ v.transpose(-2, -1)
    rowsum = (do * out).sum(-1, keepdim=True)
    ds = p * (dp - rowsum)
    # Σ|terms| of each output element: what the rounding of its own last sum scales with.
    mag_out, mag_dv = p @ va, pt @ doa
    mag_dq, mag_dk = scale * ds.abs() @ ka, scale * ds.abs().transpose(-2, -1) @ qa
    b_out = (rho + sum_kv) * mag_out
    b_dv = (rho + sum_kv) * mag_dv
    e_dp = dv_dim**0.5 * u * (doa @ va.transpose(-2, -1))
    e_rowsum = dv_dim**0.5 * u * (doa * out.abs()).sum(-1, keepdim=True) + (doa * b_out).sum(-1, keepdim=True)
    e_ds = rho * p * (dp - rowsum).abs() + p * (e_dp + e_rowsum)
    b_dq = scale * e_ds @ ka + sum_kv * mag_dq
    b_dk = scale * e_ds.transpose(-2, -1) @ qa + q.shape[-2] ** 0.5 * u * mag_dk
    return [safety * (b + u * mag.amax())
            for b, mag in ((b_out, mag_out), (b_dq, mag_dq), (b_dk, mag_dk), (b_dv, mag_dv))]


def _check(names, got, ref, dtype, plain=None, bounds=None):
    """fp32 in the interpreter: elementwise within `bounds` (_fp32_bounds) of the fp64 reference.
    16-bit, and fp32 on a GPU (its dots may round like tf32): the flash-attention rule
    (conftest.assert_flash_rule). Never anything non-finite."""
    for i, (name, g, r) in enumerate(zip(names, got, ref)):
        if plain is None:
            assert_within(g, r, bounds[i], name)  # checks shape and finiteness too
        else:
            assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)} vs {tuple(r.shape)}"
            assert torch.isfinite(g).all(), f"{name}: non-finite values"
            assert_flash_rule(g, r, plain[i], dtype, n=r.shape[-2] if r.dim() > 1 else 1, name=name)


def _compare(q, k, v, scale=None):
    dtype = q.dtype
    do = _rand((*q.shape[:3], v.shape[-1]), dtype)
    got = _grads(lambda *t: attention(*t, scale=scale, backend="triton"), q, k, v, do)
    ref = _grads(lambda *t: attention_ref(*t, scale=scale), q.double(), k.double(), v.double(), do.double())
    plain = bounds = None
    if dtype != torch.float32 or HAS_CUDA:
        plain = _grads(lambda *t: _plain_same_dtype(*t, scale=scale), q, k, v, do)
    else:
        bounds = _fp32_bounds(q, k, v, do, scale)
    assert got[0].dtype == dtype and all(g.dtype == dtype for g in got[1:])
    _check(("out", "dq", "dk", "dv"), got, ref, dtype, plain, bounds)


# (B, H, N, D, dtype): every N and head dim, batch/head counts 1-3, not the whole product.
CASES = [
    (1, 1, 1, 32, torch.float32),
    (2, 3, 13, 64, torch.float32),
    (1, 2, 37, 80, torch.float32),
    (3, 1, 64, 96, torch.float32),
    (1, 1, 129, 128, torch.float32),
    (2, 1, 197, 64, torch.float32),
    (2, 2, 1, 64, torch.bfloat16),
    (1, 2, 129, 32, torch.bfloat16),
    (2, 1, 13, 80, torch.bfloat16),
    (1, 3, 37, 64, torch.bfloat16),
    (1, 1, 64, 128, torch.bfloat16),
    (2, 1, 129, 96, torch.bfloat16),
    (1, 2, 197, 64, torch.bfloat16),
    (1, 2, 13, 32, torch.float16),
    (3, 1, 1, 96, torch.float16),
    (2, 1, 37, 128, torch.float16),
    (3, 2, 64, 64, torch.float16),
    (1, 1, 197, 80, torch.float16),
]


@pytest.mark.parametrize("B,H,N,D,dtype", CASES)
def test_attention_matches_reference(B, H, N, D, dtype):
    q, k, v = (_rand((B, H, N, D), dtype) for _ in range(3))
    _compare(q, k, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peaked_softmax_and_custom_scale(dtype):
    # Logits with std ~40: exp2 underflows for most keys and the running max jumps between key
    # blocks, so the rescaling is exercised. fp32 itself is ill-conditioned here (an error of
    # 1 ulp in a logit moves p by ~40 ulp): _fp32_bounds grows with the logits' magnitude (δ), so
    # fp32 is compared with fp64 at a bound that says why it holds, not with another fp32 path.
    q, k, v = _rand((1, 2, 129, 64), dtype, 4.0), _rand((1, 2, 129, 64), dtype, 4.0), _rand((1, 2, 129, 64), dtype)
    _compare(q, k, v, scale=0.3)


# inf/NaN arise in the padded dK/dV rows, which are never stored (see _attention_bwd_dkdv_kernel).
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
def test_very_negative_logits_stay_finite():
    # Every logit ~ -128 (lse ~ -185 in log2 units): a padded key column, if not masked out of P,
    # would get weight exp2(185) = inf and turn dQ into NaN through inf * 0.
    x = torch.ones((1, 2, 37, 64), device=DEVICE) + 0.01 * torch.randn((1, 2, 37, 64), device=DEVICE)
    _compare(-4 * x, 4 * x, _rand((1, 2, 37, 64), torch.float32))


def test_cross_attention_lengths_differ():
    q, k, v = (
        _rand((2, 2, 37, 64), torch.float32),
        _rand((2, 2, 129, 64), torch.float32),
        _rand((2, 2, 129, 64), torch.float32),
    )
    _compare(q, k, v)
    q, k, v = (
        _rand((1, 1, 129, 32), torch.float32),
        _rand((1, 1, 13, 32), torch.float32),
        _rand((1, 1, 13, 32), torch.float32),
    )
    _compare(q, k, v)
    # one (CLS) query against every token: the ViT's last block (vit.Block cls_only)
    q, k, v = _rand((3, 2, 1, 32), torch.float32), *(_rand((3, 2, 65, 32), torch.float32) for _ in range(2))
    _compare(q, k, v)


@pytest.mark.parametrize("N,D,dtype", [(37, 64, torch.bfloat16), (197, 32, torch.float32), (13, 80, torch.float16)])
def test_packed_qkv_views_like_a_vit(N, D, dtype):
    """q, k, v as strided views of one [B, N, 3, H, D] projection, as timm's Attention makes them."""
    B, H = 2, 3
    qkv = _rand((B, N, 3, H, D), dtype)
    do = _rand((B, H, N, D), dtype)

    def run(fn, x):
        x = x.detach().clone().requires_grad_()
        q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D), non-contiguous
        out = fn(q, k, v)
        return out, torch.autograd.grad(out, x, do.to(out.dtype))[0]

    q = qkv.permute(2, 0, 3, 1, 4)[0]
    assert not q.is_contiguous()
    got = run(lambda *t: attention(*t, backend="triton"), qkv)
    ref = run(attention_ref, qkv.double())
    plain = bounds = None
    if dtype != torch.float32 or HAS_CUDA:
        plain = run(_plain_same_dtype, qkv)
    else:
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        b_out, *b_qkv = _fp32_bounds(q, k, v, do)
        bounds = [b_out, torch.stack(b_qkv).permute(1, 3, 0, 2, 4)]  # back to the (B, N, 3, H, D) layout
    _check(("out", "dqkv"), got, ref, dtype, plain, bounds)


def test_head_dim_not_unit_stride_and_expanded_grad():
    # D is the slowest dim in memory; and out.sum() hands the backward an all-zero-stride dO.
    q, k, v = (_rand((2, 2, 64, 37), torch.float32).transpose(-1, -2) for _ in range(3))
    assert q.stride(-1) != 1
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    got = torch.autograd.grad(attention(*leaves, backend="triton").sum(), leaves)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = torch.autograd.grad(attention_ref(*leaves).sum(), leaves)
    _check(("dq", "dk", "dv"), got, ref, torch.float32, bounds=_fp32_bounds(q, k, v, torch.ones_like(q))[1:])


@pytest.mark.parametrize("N,D,dtype", [(37, 80, torch.float32), (129, 64, torch.bfloat16)])
def test_poisoned_outputs_are_fully_written_and_nothing_else(N, D, dtype):
    """NaN-filled, strided output buffers inside wider NaN storage: every element in the view is
    written, none outside it (the padded head-dim columns and rows past N must stay NaN)."""
    B, H = 2, 2
    q, k, v, do = (_rand((B, H, N, D), dtype) for _ in range(4))

    def poisoned():
        wide = torch.full((B, N + 3, H, D + 16), float("nan"), device=DEVICE, dtype=dtype)
        return wide, wide[:, :N, :, :D].transpose(1, 2)  # a (B, H, N, D) view with odd strides

    (wo, out), lse = poisoned(), torch.full((B, H, N), float("nan"), device=DEVICE)
    attention_fwd(q, k, v, out=out, lse=lse)
    (wq, dq), (wk, dk), (wv, dv) = poisoned(), poisoned(), poisoned()
    attention_bwd(do, q, k, v, out, lse, dq=dq, dk=dk, dv=dv)

    ref = _grads(attention_ref, q.double(), k.double(), v.double(), do.double())
    plain = _grads(_plain_same_dtype, q, k, v, do) if dtype != torch.float32 or HAS_CUDA else None
    bounds = _fp32_bounds(q, k, v, do) if plain is None else None
    _check(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref, dtype, plain, bounds)
    assert torch.isfinite(lse).all()
    s = q.double() @ k.double().transpose(-2, -1) * D**-0.5
    # lse (log2 units, fp32 whatever the inputs): the logits' rounding plus a sum over N keys.
    assert_rounding_close(lse, torch.logsumexp(s, -1) * attn_mod.LOG2E, torch.float32, n=N * D, name="lse")
    for wide in (wo, wq, wk, wv):
        outside = torch.ones(wide.shape, dtype=torch.bool, device=DEVICE)
        outside[:, :N, :, :D] = False
        assert wide[outside].isnan().all(), "kernel wrote outside its output view"


def test_default_output_layout_is_bnhd():
    q, k, v = (_rand((2, 3, 13, 32), torch.float32) for _ in range(3))
    out = attention(q, k, v, backend="triton")
    assert out.transpose(1, 2).is_contiguous()  # so the ViT's (B, N, H*D) reshape is free


def test_auto_picks_triton_on_cuda_only_and_falls_back_where_it_cannot(monkeypatch):
    calls = []
    real = attn_mod.attention_fwd
    monkeypatch.setattr(attn_mod, "attention_fwd", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    expected = [1] if HAS_CUDA else []  # a CPU tensor takes SDPA, even under the interpreter
    q, k, v = (_rand((1, 2, 13, 64), torch.float32) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v), attention_ref(q, k, v))
    assert calls == expected
    attention(q, k, v, backend="triton")
    assert calls == expected + [1]
    for dtype, d in ((torch.float64, 64), (torch.float32, 48)):  # not for the kernel: SDPA instead
        q, k, v = (_rand((1, 2, 13, d), dtype) for _ in range(3))
        torch.testing.assert_close(attention(q, k, v), attention_ref(q, k, v))
    assert calls == expected + [1]


def test_errors():
    q = _rand((1, 2, 13, 64), torch.float32)
    with pytest.raises(TypeError, match="float64"):
        attention(q.double(), q.double(), q.double(), backend="triton")
    for d in (48, 256):
        x = _rand((1, 2, 13, d), torch.float16)
        with pytest.raises(ValueError, match=r"head dim .*\(32, 64, 80, 96, 128\)"):
            attention(x, x, x, backend="triton")
    with pytest.raises(ValueError, match="mismatched shapes"):
        attention(q, q[:, :1], q[:, :1], backend="triton")
    with pytest.raises(ValueError, match="mismatched shapes"):
        attention(q, q[..., :32], q[..., :32], backend="triton")
    with pytest.raises(ValueError, match=r"\[B, H, N, D\]"):
        attention(q[0], q[0], q[0], backend="triton")
    with pytest.raises(TypeError, match="dtypes differ"):
        attention(q, q.half(), q.half(), backend="triton")
    with pytest.raises(ValueError, match="different devices"):
        attention(q, q.to("meta"), q.to("meta"), backend="triton")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        m = q.to("meta")
        attention(m, m, m, backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        attention(q, q, q, backend="flash")
    with pytest.raises(ValueError, match="out buffer"):
        attention_fwd(q, q, q, out=torch.empty(1, 2, 13, 64, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        attention_fwd(q, q, q, lse=torch.empty(1, 13, 2, device=DEVICE).transpose(1, 2))
    assert SUPPORTED_HEAD_DIMS == (32, 64, 80, 96, 128)


def _error_of(fn) -> Exception:
    with pytest.raises(Exception) as err:
        fn()
    return err.value


_X = (1, 2, 13, 64)
# Inputs every backend must reject with the same error: (q, k, v, scale, exception, match).
BAD_INPUTS = {
    "int64": (torch.ones(_X, dtype=torch.int64),) * 3 + (None, TypeError, r"attention: q has dtype int64; expected"),
    "bool": (torch.ones(_X, dtype=torch.bool),) * 3 + (None, TypeError, r"attention: q has dtype bool; expected"),
    "int_k": (torch.ones(_X), torch.ones(_X, dtype=torch.int32), torch.ones(_X), None, TypeError,
              r"attention: k has dtype int32; expected"),
    "zero_keys": (torch.ones(_X), torch.ones(1, 2, 0, 64), torch.ones(1, 2, 0, 64), None, ValueError,
                  r"k and v have shape \(1, 2, 0, 64\): Nkv = 0 keys, need Nkv >= 1"),
    "zero_head_dim": (torch.ones(1, 2, 13, 0),) * 3 + (None, ValueError, r"head dim D = 0 \(q \(1, 2, 13, 0\)\)"),
    "scale_nan": (torch.ones(_X),) * 3 + (float("nan"), ValueError, r"scale must be a finite number; got nan"),
    "scale_inf": (torch.ones(_X),) * 3 + (float("inf"), ValueError, r"scale must be a finite number; got inf"),
}  # fmt: skip


@pytest.mark.parametrize("backend", ["torch", "eager", "triton", "auto"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_fail_alike_on_every_backend(case, backend):
    *qkv, scale, exc, match = BAD_INPUTS[case]
    q, k, v = (t.to(DEVICE) for t in qkv)
    err = _error_of(lambda: attention(q, k, v, scale=scale, backend=backend))
    assert isinstance(err, exc) and re.search(match, str(err)) and "\n" not in str(err), repr(err)
    # One shared check: the message is the same whichever backend runs.
    assert str(err) == str(_error_of(lambda: attention(q, k, v, scale=scale, backend="torch")))


def _dispatch(monkeypatch):
    """Spies on the two CPU paths of "auto": the list gets "eager" or "sdpa" per call."""
    seen, ref, sdpa = [], attn_mod.attention_ref, attn_mod.F.scaled_dot_product_attention
    monkeypatch.setattr(attn_mod, "attention_ref", lambda *a, **kw: seen.append("eager") or ref(*a, **kw))
    monkeypatch.setattr(attn_mod.F, "scaled_dot_product_attention",
                        lambda *a, **kw: seen.append("sdpa") or sdpa(*a, **kw))
    return seen


def test_auto_on_cpu_takes_the_eager_form_for_short_training_attention(monkeypatch):
    """fp32 attention that autograd records over at most CPU_MATMUL_MAX_KEYS keys, heads at most
    CPU_MATMUL_MAX_HEAD_DIM wide: the eager form; longer, wider, without autograd, or another dtype: SDPA."""
    seen = _dispatch(monkeypatch)
    most = attn_mod.CPU_MATMUL_MAX_KEYS

    def route(nkv, dtype=torch.float32, grad=True, nq=None, d=32):
        seen.clear()
        q = torch.randn(2, 2, nkv if nq is None else nq, d, dtype=dtype, requires_grad=grad)
        k, v = (torch.randn(2, 2, nkv, d, dtype=dtype) for _ in range(2))
        attention(q, k, v)
        return seen[0]

    assert route(17) == route(most) == route(most, nq=1) == route(17, d=16) == "eager"
    assert route(17, d=64) == route(most + 1) == route(17, grad=False) == "sdpa"
    assert route(17, torch.float64) == route(17, torch.bfloat16) == "sdpa"
    with torch.no_grad():
        assert route(17) == "sdpa"
    q, k, v = (torch.randn(2, 2, 17, 32, requires_grad=True) for _ in range(3))
    seen.clear()
    attention(q, k, v, backend="torch")  # a backend named is the backend run
    assert seen == ["sdpa"]


@pytest.mark.parametrize("nq,nkv", [(17, 17), (1, 45), (45, 45), (3, 48)])
def test_auto_on_cpu_short_training_attention_matches_reference(monkeypatch, nq, nkv):
    """The eager form "auto" runs on a CPU (strided q, k, v as a ViT makes them; nq 1 as the CLS-only last block):
    output and every gradient within fp32 rounding bounds of the fp64 reference."""
    seen = _dispatch(monkeypatch)
    b, h, d = 3, 2, 32
    qkv = torch.randn(b, nkv, 3, h, d)
    do = torch.randn(b, h, nq, d)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q = q[:, :, :nq]

    def run(fn, x):
        x = x.detach().clone().requires_grad_()
        q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)
        out = fn(q[:, :, :nq], k, v)
        return out, torch.autograd.grad(out, x, do.to(out.dtype))[0]

    got = run(attention, qkv)
    assert seen and set(seen) == {"eager"}
    ref = run(torch.nn.functional.scaled_dot_product_attention, qkv.double())  # SDPA's math path in fp64
    b_out, *b_qkv = _fp32_bounds(q, k, v, do)
    b_qkv[0] = torch.cat([b_qkv[0], torch.zeros(b, h, nkv - nq, d, dtype=b_out.dtype)], 2)  # unused queries: 0
    _check(("out", "dqkv"), got, ref, torch.float32, None, [b_out, torch.stack(b_qkv).permute(1, 3, 0, 2, 4)])


@pytest.mark.parametrize("backend", ["torch", "eager", "triton"])
def test_zero_queries_give_an_empty_output_and_zero_key_grads(backend):
    q, k, v = (_rand((2, 2, n, 64), torch.float32) for n in (0, 13, 13))
    out, dq, dk, dv = _grads(lambda *x: attention(*x, backend=backend), q, k, v, torch.ones_like(q))
    assert out.shape == (2, 2, 0, 64) and dq.shape == q.shape
    assert torch.equal(dk, torch.zeros_like(k)) and torch.equal(dv, torch.zeros_like(v))


def test_zero_queries_launcher_zeroes_given_key_grad_buffers():
    q, k = _rand((1, 2, 0, 64), torch.float32), _rand((1, 2, 5, 64), torch.float32)
    out, lse = attention_fwd(q, k, k)
    poison = [torch.full_like(k, float("nan")) for _ in range(2)]
    _, dk, dv = attention_bwd(torch.empty_like(q), q, k, k, out, lse, dk=poison[0], dv=poison[1])
    assert torch.equal(dk, torch.zeros_like(k)) and torch.equal(dv, torch.zeros_like(k))


@pytest.mark.parametrize("N,D,dtype", [(197, 64, torch.bfloat16), (37, 80, torch.float16)])
def test_every_block_config(monkeypatch, N, D, dtype):
    """Each autotune config of the three kernels (the interpreter otherwise runs only the first)."""
    kernels = (attn_tri._attention_fwd_kernel, attn_tri._attention_bwd_dkdv_kernel, attn_tri._attention_bwd_dq_kernel)
    for configs in zip(attn_tri.FWD_CONFIGS, attn_tri.DKDV_CONFIGS, attn_tri.DQ_CONFIGS):
        for kernel, config in zip(kernels, configs):
            monkeypatch.setattr(kernel, "configs", [config])
        q, k, v = (_rand((1, 2, N, D), dtype) for _ in range(3))
        _compare(q, k, v)


def test_autotune_pruning(monkeypatch):
    """The GPU config list (one config in the interpreter, so the pruner is checked directly)."""
    import triton

    monkeypatch.setenv("MSN_FAST_AUTOTUNE", "1")

    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}) for m in (64, 128) for n in (32, 64, 128)]
    prune = attn_tri._pruner("BLOCK_M", "BLOCK_N")["early_config_prune"]
    bf16 = torch.empty(1, dtype=torch.bfloat16)
    short = prune(configs, {"Q": bf16, "N_Q": 37, "N_KV": 37})
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in short} == {(64, 32), (64, 64)}
    assert prune(configs, {"Q": bf16, "N_Q": 197, "N_KV": 1025}) == configs
    assert prune(configs, {"Q": torch.empty(1), "N_Q": 197, "N_KV": 197}) == configs[:1]  # fp32: one config
    monkeypatch.setenv("MSN_FAST_AUTOTUNE", "0")
    assert prune(configs, {"Q": bf16, "N_Q": 197, "N_KV": 1025}) == configs[:1]
    assert len(attn_tri.FWD_CONFIGS) == len(attn_tri.DKDV_CONFIGS) == len(attn_tri.DQ_CONFIGS) == 6


def test_custom_ops_pass_opcheck():
    """Fake (meta) shapes, dtypes and strides, schema and autograd registration agree with the kernels."""
    q, k, v = (_rand((1, 2, 13, 32), torch.float32).requires_grad_() for _ in range(3))
    torch.library.opcheck(torch.ops.msn_fast.attention_fwd.default, (q, k, v, 0.2))
    out, lse = torch.ops.msn_fast.attention_fwd(q.detach(), k.detach(), v.detach(), 0.2)
    do = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.msn_fast.attention_bwd.default, (do, q.detach(), k.detach(), v.detach(), out, lse, 0.2)
    )


def test_torch_compile_fullgraph_with_backward():
    def loss(q, k, v):
        return attention(q, k, v, backend="triton").square().sum()

    q, k, v = (_rand((1, 2, 37, 64), torch.float32).requires_grad_() for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # dynamo's note on the functools.cache in _utils
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
        got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for name, g, w in zip(("dq", "dk", "dv"), got, want):  # two paths: the same kernels, maybe other sums
        assert_rounding_close(g, w, torch.float32, n=37 * 64, name=name)


# ---- real shapes: CUDA only -------------------------------------------------------------------

GPU_CASES = [  # (B, H, N, D, dtype): MSN's ViT-S/16, B/16 and L/7 views, the batch of a training step
    (640, 6, 37, 64, torch.bfloat16),
    (64, 6, 167, 64, torch.bfloat16),
    (64, 12, 197, 64, torch.bfloat16),
    (64, 16, 308, 64, torch.bfloat16),
    (32, 16, 1025, 64, torch.bfloat16),
    (32, 12, 197, 80, torch.float16),
    (16, 8, 1025, 96, torch.float16),
    (32, 8, 170, 128, torch.bfloat16),
    (8, 6, 197, 64, torch.float32),
    (4, 4, 1025, 128, torch.float32),
]


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,N,D,dtype", GPU_CASES)
def test_attention_matches_reference_gpu(B, H, N, D, dtype):
    q, k, v = (_rand((B, H, N, D), dtype) for _ in range(3))
    _compare(q, k, v)


@pytest.mark.gpu
@pytest.mark.parametrize("N", [167, 1025])
def test_packed_qkv_and_poison_gpu(N):
    test_packed_qkv_views_like_a_vit(N, 64, torch.bfloat16)
    test_poisoned_outputs_are_fully_written_and_nothing_else(N, 96, torch.bfloat16)
