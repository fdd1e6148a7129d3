"""gather_tokens (kept rows of embedded tokens + optional pos-embed; backward = scatter) vs torch indexing.

The reference is torch advanced indexing / torch.gather plus the gathered position rows, in fp64.
"""

import pytest
import torch
from conftest import DEVICE, assert_flash_rule, assert_sum_bound

from msn_fast.kernels.token_gather import gather_tokens, gather_tokens_ref, token_gather_fwd


def _keep_idx(n: int, k: int, b: int, shared: bool, dtype=torch.int32) -> torch.Tensor:
    if shared:
        return torch.randperm(n, device=DEVICE)[:k].to(dtype)
    return torch.argsort(torch.rand(b, n, device=DEVICE), dim=1)[:, :k].to(dtype)


def _run(fn, tokens, pos, grad_out):
    x = tokens.detach().clone().requires_grad_()
    p = None if pos is None else pos.detach().clone().requires_grad_()
    y = fn(x, p)
    y.backward(grad_out.to(y.dtype))
    return [y, x.grad] + ([] if p is None else [p.grad])


def _compare(tokens, idx, pos, grad_out, **kw):
    got = _run(lambda x, p: gather_tokens(x, idx, p, **kw), tokens, pos, grad_out)
    def ref64(x, p):
        return gather_tokens_ref(x.double(), idx, p if p is None else p.double())

    ref = _run(ref64, tokens, pos, grad_out)
    # Linear in tokens and pos: the reference on absolute values bounds each element's sum.
    absolute = _run(ref64, tokens.abs(), None if pos is None else pos.abs(), grad_out.abs())
    for name, g, r, a in zip(("out", "d_tokens", "d_pos"), got, ref, absolute):
        assert_sum_bound(g, r, a, torch.float32, tokens.shape[0] + 1, name)  # d_pos sums over the batch


@pytest.mark.parametrize("with_pos", [True, False], ids=["pos", "no_pos"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_sample"])
@pytest.mark.parametrize("b,n,d", [(2, 1, 16), (3, 13, 48), (2, 37, 100), (2, 197, 384)])
def test_matches_reference(b, n, d, shared, with_pos):
    k = max(1, (n * 5) // 6)
    tokens = torch.randn(b, n, d, device=DEVICE)
    pos = torch.randn(1, n, d, device=DEVICE) if with_pos else None
    _compare(tokens, _keep_idx(n, k, b, shared), pos, torch.randn(b, k, d, device=DEVICE))


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_sample"])
@pytest.mark.parametrize("k", ["one", "all"])
def test_k_is_one_or_n(k, shared):
    b, n, d = 3, 37, 64
    kk = 1 if k == "one" else n
    idx = _keep_idx(n, kk, b, shared, dtype=torch.int64)
    tokens, pos = torch.randn(b, n, d, device=DEVICE), torch.randn(n, d, device=DEVICE)
    _compare(tokens, idx, pos, torch.randn(b, kk, d, device=DEVICE))


def test_strided_tokens_skip_cls_row():
    """A [B, 1+N, D] sequence viewed as x[:, 1:] (no copy), and a transposed-layout tensor."""
    b, n, d = 2, 13, 40
    seq = torch.randn(b, 1 + n, d, device=DEVICE)
    idx = _keep_idx(n, 6, b, shared=False)
    _compare(seq[:, 1:], idx, torch.randn(n, d, device=DEVICE), torch.randn(b, 6, d, device=DEVICE))
    tokens_t = torch.randn(b, d, n, device=DEVICE).transpose(1, 2)
    _compare(tokens_t, idx, None, torch.randn(b, 6, d, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    b, n, d = 2, 37, 96
    tokens = torch.randn(b, n, d, device=DEVICE).to(dtype)
    pos = torch.randn(1, n, d, device=DEVICE)  # fp32 position table with low-precision tokens
    idx = _keep_idx(n, 20, b, shared=False)
    grad_out = torch.randn(b, 20, d, device=DEVICE)
    got = _run(lambda x, p: gather_tokens(x, idx, p), tokens, pos, grad_out)

    def plain(x, p):  # plain torch at the same dtype: gather, then add the cast position rows
        return torch.gather(x, 1, idx.long()[..., None].expand(-1, -1, d)) + p[0][idx.long()].to(dtype)

    low = _run(plain, tokens, pos, grad_out)
    ref = _run(lambda x, p: gather_tokens_ref(x.double(), idx, p.double()), tokens, pos, grad_out)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == torch.float32
    for name, g, lw, r in zip(["out", "tokens", "pos"], got, low, ref):
        assert_flash_rule(g, r, lw, dtype, n=1, name=name)


def test_poisoned_output_is_fully_written():
    b, n, d = 3, 37, 100
    tokens, pos = torch.randn(b, n, d, device=DEVICE), torch.randn(n, d, device=DEVICE)
    idx = _keep_idx(n, 29, b, shared=False)
    out = torch.full((b, 29, d), float("nan"), device=DEVICE)
    token_gather_fwd(tokens, idx, pos, out=out)
    torch.testing.assert_close(out, gather_tokens_ref(tokens, idx, pos))


def test_out_of_range_without_validation_gives_nan_rows():
    tokens = torch.randn(2, 5, 16, device=DEVICE)
    idx = torch.tensor([[0, 4], [7, 1]], dtype=torch.int32, device=DEVICE)
    y = gather_tokens(tokens, idx, torch.zeros(5, 16, device=DEVICE), validate=False, backend="triton")
    assert y[1, 0].isnan().all() and not y[0].isnan().any() and not y[1, 1].isnan().any()


ERRORS = {  # validate=True (the default): the values are checked whichever backend runs
    "out_of_range": (torch.tensor([0, 5]), None, IndexError, r"keep_idx out of range: values in \[0, 5\].*\[0, 5\)"),
    "out_of_range_per_sample": (torch.tensor([[0, 1], [2, 9]], dtype=torch.int32), None, IndexError,
                                r"keep_idx out of range: values in \[0, 9\]"),
    "negative": (torch.tensor([[0, 1], [-1, 2]]), None, IndexError, r"keep_idx out of range: values in \[-1, 2\]"),
    "negative_shared": (torch.tensor([-3, 1]), None, IndexError, r"keep_idx out of range: values in \[-3, 1\]"),
    "duplicate": (torch.tensor([[0, 1], [3, 3]]), None, ValueError, "duplicate"),
    "float_idx": (torch.tensor([0.0]), None, TypeError, "keep_idx"),
    "idx_shape": (torch.zeros(1, 2, 2, dtype=torch.int32), None, ValueError, "keep_idx must be"),
    "cls_in_pos": (torch.tensor([0]), torch.zeros(1, 6, 8), ValueError, "CLS"),
    "pos_shape": (torch.tensor([0]), torch.zeros(5, 4), ValueError, "pos_embed"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ERRORS))
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_errors(case, backend):
    idx, pos, exc, match = ERRORS[case]
    tokens = torch.zeros(2, 5, 8, device=DEVICE)
    with pytest.raises(exc, match=match) as err:
        gather_tokens(tokens, idx.to(DEVICE), None if pos is None else pos.to(DEVICE), backend=backend)
    assert "\n" not in str(err.value)


def test_bad_tokens():
    with pytest.raises(TypeError, match="tokens"):
        gather_tokens(torch.zeros(2, 5, 8, dtype=torch.int32, device=DEVICE), torch.tensor([0], device=DEVICE))
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        gather_tokens(torch.zeros(5, 8, device=DEVICE), torch.tensor([0], device=DEVICE))


# Real shapes: ViT-S/16 224 px (N=196, 15% dropped, B=256) and ViT-L/7 224 px (N=1024, 70% dropped, B=64).
@pytest.mark.gpu
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_sample"])
@pytest.mark.parametrize("b,n,d,drop", [(256, 196, 384, 0.15), (64, 1024, 1024, 0.70)], ids=["S16", "L7"])
def test_real_shapes_bf16(b, n, d, drop, shared):
    k = int(n * (1 - drop))
    tokens = torch.randn(b, n, d, device=DEVICE).bfloat16()
    pos = torch.randn(1, n, d, device=DEVICE)
    idx = _keep_idx(n, k, b, shared)
    grad_out = torch.randn(b, k, d, device=DEVICE)
    got = _run(lambda x, p: gather_tokens(x, idx, p), tokens, pos, grad_out)
    ref = _run(lambda x, p: gather_tokens_ref(x, idx, p), tokens, pos, grad_out)  # same fp32-add-then-round maths
    torch.testing.assert_close(got[0], ref[0], atol=0, rtol=0)
    torch.testing.assert_close(got[1], ref[1], atol=0, rtol=0)
    torch.testing.assert_close(got[2], ref[2], atol=1e-3, rtol=1e-4)  # fp32 sums in a different order
