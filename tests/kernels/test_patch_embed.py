"""embed_kept_patches (fused im2col of kept patches + GEMM + bias + pos-embed) vs the unfused torch path.

The reference is conv2d(stride=P) -> flatten -> + pos_embed -> gather, run in fp64 on fp64 copies of
the inputs. On CPU the Triton kernels run under the interpreter (tests/conftest.py).
"""

import pytest
import torch
from conftest import DEVICE, LOWP_FLOOR, assert_flash_rule, assert_sum_bound

from msn_fast.kernels.patch_embed import (
    embed_kept_patches,
    embed_kept_patches_ref,
    gather_patches,
    patch_embed_fwd,
)


def _keep_idx(n: int, k: int, b: int, shared: bool, dtype=torch.int32) -> torch.Tensor:
    if shared:
        return torch.randperm(n, device=DEVICE)[:k].to(dtype)
    return torch.argsort(torch.rand(b, n, device=DEVICE), dim=1)[:, :k].to(dtype)


def _inputs(patch, h, w, *, b=2, c=3, d=32, bias=True, pos=True):
    """fp32 leaf tensors (images, weight, bias, pos_embed [1, N, D]) with O(1) outputs."""
    n = (h // patch) * (w // patch)
    images = torch.randn(b, c, h, w, device=DEVICE)
    weight = torch.randn(d, c, patch, patch, device=DEVICE) / (c * patch * patch) ** 0.5
    bias_t = torch.randn(d, device=DEVICE) if bias else None
    pos_t = torch.randn(1, n, d, device=DEVICE) * 0.5 if pos else None
    return images, weight, bias_t, pos_t


def _run(fn, tensors, grad_out=None, need=None):
    """Call fn on leaf copies of `tensors`; return (output, grads of those with requires_grad)."""
    need = need or [t is not None and t.is_floating_point() for t in tensors]
    leaves = [t.detach().clone().requires_grad_(r) if t is not None else None for t, r in zip(tensors, need)]
    y = fn(*leaves)
    if grad_out is None:
        return y, None
    y.backward(grad_out.to(y.dtype))
    return y, [t.grad for t, r in zip(leaves, need) if r]


def _fused(**kw):
    return lambda x, w, b, p, i: embed_kept_patches(x, w, b, p, i, **kw)


def _ref64(x, w, b, p, i):
    f64 = [None if t is None else t.double() for t in (x, w, b, p)]
    return embed_kept_patches_ref(*f64, i)


def _check_fp32(tensors, grad_out, need=None, **kw):
    y, grads = _run(_fused(**kw), tensors, grad_out, need)
    y_ref, grads_ref = _run(_ref64, tensors, grad_out, need)
    # The op is linear in each input: the reference on absolute values is Σ|terms| per element.
    absolute = [t.abs() if t is not None and t.is_floating_point() else t for t in tensors]
    y_abs, grads_abs = _run(_ref64, absolute, grad_out.abs(), need)
    x, w, idx = tensors[0], tensors[1], tensors[-1]
    n = max(w[0].numel() + 2, x.shape[0] * idx.shape[-1])  # the im2col dot, or a sum over kept patches
    assert y.dtype == torch.float32 and not y.isnan().any()
    assert_sum_bound(y, y_ref, y_abs, torch.float32, n, "out")
    for name, g, g_ref, g_abs in zip(("d_images", "d_weight", "d_bias", "d_pos"), grads, grads_ref, grads_abs):
        assert_sum_bound(g, g_ref, g_abs, torch.float32, n, name)


# (patch, H, W): every supported patch size on images that a patch does not divide (remainders dropped).
CASES = [(4, 30, 37), (7, 30, 37), (8, 19, 42), (14, 31, 45), (16, 35, 50)]


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_sample"])
@pytest.mark.parametrize("patch,h,w", CASES)
def test_matches_unfused_path(patch, h, w, shared):
    tensors = _inputs(patch, h, w)
    n = (h // patch) * (w // patch)
    k = max(1, (n * 2) // 3)
    idx = _keep_idx(n, k, 2, shared)
    grad_out = torch.randn(2, k, tensors[1].shape[0], device=DEVICE)
    _check_fp32((*tensors, idx), grad_out)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_sample"])
@pytest.mark.parametrize("k", ["one", "all"])
def test_k_is_one_or_n(k, shared):
    tensors = _inputs(8, 30, 37, b=3, d=48)
    n = 3 * 4
    kk = 1 if k == "one" else n
    idx = _keep_idx(n, kk, 3, shared)
    _check_fp32((*tensors, idx), torch.randn(3, kk, 48, device=DEVICE))


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_sample"])
def test_images_grad(shared):
    images, weight, bias, pos = _inputs(7, 23, 30)
    idx = _keep_idx(12, 5, 2, shared)
    # dropped patches and the remainder pixels must get exactly zero gradient
    _check_fp32((images, weight, bias, pos, idx), torch.randn(2, 5, 32, device=DEVICE), need=[True] * 4 + [False])


def test_options_cls_token_no_bias_2d_pos_int64_all_patches():
    images, weight, _, pos = _inputs(4, 17, 22, bias=False)
    n, d = 4 * 5, 32
    cls = torch.randn(1, 1, d, device=DEVICE)
    idx = _keep_idx(n, 7, 2, shared=False, dtype=torch.int64)
    grad_out = torch.randn(2, 8, d, device=DEVICE)

    def fused(x, w, p, c):
        return embed_kept_patches(x, w, None, p[0], idx, cls_token=c)

    def ref(x, w, p, c):
        return embed_kept_patches_ref(x.double(), w.double(), None, p.double(), idx, c.double())

    y, grads = _run(fused, (images, weight, pos, cls), grad_out)
    y_ref, grads_ref = _run(ref, (images, weight, pos, cls), grad_out)
    torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref.double(), atol=1e-5, rtol=1e-5)
    # keep_idx=None keeps every patch in order, without bias or pos_embed
    y_all = embed_kept_patches(images, weight)
    torch.testing.assert_close(y_all, embed_kept_patches_ref(images, weight, None, None, None), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["channels_last", "cropped_view"])
def test_strided_images(layout):
    images, weight, bias, pos = _inputs(7, 24, 31)
    if layout == "channels_last":
        images = images.contiguous(memory_format=torch.channels_last)
    else:  # a non-contiguous view: the kernel follows strides, no copy
        big = torch.randn(2, 5, 30, 40, device=DEVICE)
        images = big[:, 1:4, 3:27, 5:36]
    idx = _keep_idx(12, 9, 2, shared=False)
    _check_fp32((images, weight, bias, pos, idx), torch.randn(2, 9, 32, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("patch,h,w", [(7, 30, 37), (16, 35, 50)])
def test_low_precision(patch, h, w, dtype):
    """Kernel error <= 2 x the unfused torch path's error at the same dtype + floor (fp32 pos_embed)."""
    images, weight, bias, pos = _inputs(patch, h, w, d=64)
    n = (h // patch) * (w // patch)
    idx = _keep_idx(n, n - 1, 2, shared=False)
    grad_out = torch.randn(2, n - 1, 64, device=DEVICE)
    low = (images.to(dtype), weight.to(dtype), bias.to(dtype), pos, idx)
    y, grads = _run(_fused(), low, grad_out)
    y_t, grads_t = _run(lambda *a: embed_kept_patches(*a, backend="torch"), low, grad_out)
    y_ref, grads_ref = _run(_ref64, low, grad_out)
    assert y.dtype == dtype
    for name, got, torch_lp, ref in zip(["out", "images", "weight", "bias", "pos"], [y] + grads, [y_t] + grads_t,
                                        [y_ref] + grads_ref):  # fmt: skip
        assert_flash_rule(got, ref, torch_lp, dtype, n=1, name=name)


def test_poisoned_outputs_are_fully_written():
    images, weight, bias, pos = _inputs(7, 30, 37, d=40)
    n, k = 20, 13
    idx = _keep_idx(n, k, 2, shared=False)
    out = torch.full((2, 1 + k, 40), float("nan"), device=DEVICE)
    patch_embed_fwd(images, weight.reshape(40, -1), bias, pos[0], idx, 7, out=out, out_row0=1)
    assert out[:, 0].isnan().all(), "row 0 (the CLS slot) belongs to the caller"
    torch.testing.assert_close(out[:, 1:], embed_kept_patches_ref(images, weight, bias, pos, idx), atol=1e-5, rtol=1e-5)
    cols = torch.full((2 * k, 3 * 49), float("nan"), device=DEVICE)
    gather_patches(images, idx, 7, out=cols)
    patches = images[:, :, :28, :35].unfold(2, 7, 7).unfold(3, 7, 7)  # (B, C, Gh, Gw, P, P)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(2, n, 3 * 49)
    torch.testing.assert_close(cols, torch.gather(patches, 1, idx.long()[..., None].expand(-1, -1, 147)).flatten(0, 1))


def test_out_of_range_without_validation_gives_nan_rows():
    images, weight, bias, pos = _inputs(8, 16, 24)
    idx = torch.tensor([[0, 5, 2], [1, 99, -3]], dtype=torch.int32, device=DEVICE)
    y = embed_kept_patches(images, weight, bias, pos, idx, validate=False, backend="triton")
    assert not y[0].isnan().any() and not y[1, 0].isnan().any()
    assert y[1, 1:].isnan().all()


def test_autocast_casts_to_low_precision():
    images, weight, bias, pos = _inputs(16, 32, 32)
    weight.requires_grad_()
    with torch.autocast(device_type=DEVICE, dtype=torch.bfloat16):
        y = embed_kept_patches(images, weight, bias, pos, torch.arange(3, device=DEVICE))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert weight.grad is not None and weight.grad.dtype == torch.float32


def _bad(**changes):
    images, weight, bias, pos = _inputs(8, 24, 24)
    args = {"images": images, "weight": weight, "bias": bias, "pos_embed": pos,
            "keep_idx": torch.tensor([0, 3, 5], device=DEVICE)}  # fmt: skip
    args.update(changes)
    return args


ERRORS = {
    "out_of_range": (_bad(keep_idx=torch.tensor([0, 9], device=DEVICE)), IndexError, "out of range"),
    "negative": (_bad(keep_idx=torch.tensor([-1, 2], device=DEVICE)), IndexError, "out of range"),
    "duplicate": (_bad(keep_idx=torch.tensor([[1, 2], [4, 4]], device=DEVICE)), ValueError, "duplicate"),
    "float_idx": (_bad(keep_idx=torch.tensor([0.0, 1.0], device=DEVICE)), TypeError, "keep_idx"),
    "idx_batch": (_bad(keep_idx=torch.zeros(3, 2, dtype=torch.int32, device=DEVICE)), ValueError, "per sample"),
    "too_many": (_bad(keep_idx=torch.arange(10, device=DEVICE)), ValueError, "only N = 9"),
    "empty": (_bad(keep_idx=torch.zeros(0, dtype=torch.int32, device=DEVICE)), ValueError, "empty"),
    "uint8_images": (_bad(images=torch.zeros(2, 3, 24, 24, dtype=torch.uint8, device=DEVICE)), TypeError, "images"),
    "dtype_mix": (_bad(weight=torch.zeros(32, 3, 8, 8, dtype=torch.bfloat16, device=DEVICE)), TypeError, "one dtype"),
    "too_small": (_bad(images=torch.zeros(2, 3, 7, 24, device=DEVICE)), ValueError, "smaller than one 8x8"),
    "channels": (_bad(images=torch.zeros(2, 4, 24, 24, device=DEVICE)), ValueError, "channels"),
    "cls_in_pos": (_bad(pos_embed=torch.zeros(1, 10, 32, device=DEVICE)), ValueError, "CLS"),
    "pos_shape": (_bad(pos_embed=torch.zeros(1, 9, 16, device=DEVICE)), ValueError, "pos_embed"),
    "bias_shape": (_bad(bias=torch.zeros(31, device=DEVICE)), ValueError, "bias"),
    "no_channels_out": (_bad(weight=torch.zeros(0, 3, 8, 8, device=DEVICE), bias=None, pos_embed=None), ValueError,
                        r"weight \(0, 3, 8, 8\) has D = 0 output channels"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ERRORS))
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_errors(case, backend):
    args, exc, match = ERRORS[case]
    with pytest.raises(exc, match=match) as err:
        embed_kept_patches(**args, backend=backend)
    assert "\n" not in str(err.value)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        embed_kept_patches(**_bad(), backend="cudnn")


# Real shapes: ViT-S/16 masked anchor (224 px, 15% dropped, B=256) and ViT-L/7 (224 px, 70% dropped, B=64).
GPU_SHAPES = {"S16": (256, 16, 384, 0.15), "L7": (64, 7, 1024, 0.70)}


@pytest.mark.gpu
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_sample"])
@pytest.mark.parametrize("name", list(GPU_SHAPES))
def test_real_shapes_bf16(name, shared):
    b, patch, d, drop = GPU_SHAPES[name]
    n = (224 // patch) ** 2
    k = int(n * (1 - drop))
    images, weight, bias, pos = _inputs(patch, 224, 224, b=b, d=d)
    idx = _keep_idx(n, k, b, shared)
    grad_out = torch.randn(b, k, d, device=DEVICE)
    low = (images.bfloat16(), weight.bfloat16(), bias.bfloat16(), pos, idx)
    need = [False, True, True, True, False]
    y, grads = _run(_fused(validate=True), low, grad_out, need)
    y_t, grads_t = _run(lambda *a: embed_kept_patches(*a, backend="torch"), low, grad_out, need)
    y_ref, grads_ref = _run(_ref64, low, grad_out, need)
    for name_, got, torch_lp, ref in zip(["out", "weight", "bias", "pos"], [y] + grads, [y_t] + grads_t,
                                         [y_ref] + grads_ref):  # fmt: skip
        err = (got.double() - ref).abs().max().item()
        err_torch = (torch_lp.double() - ref).abs().max().item()
        floor = LOWP_FLOOR[torch.bfloat16] * ref.abs().max().item()  # sums over B*K rows: scale the floor
        assert err <= 2 * err_torch + floor, f"{name_}: {err} vs {err_torch}"
