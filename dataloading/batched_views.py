"""MSN's multi-view augmentation on a batch of tensors: one operation per view group, not one per image.

Input: B decoded images (uint8 [3, h, w] tensors of any sizes, padded by edge replication to the batch's largest)
on any device. Output: globals [G, B, 3, S, S] and focals [F, B, 3, s, s], float32, normalised: the pipeline of
views.py (msn_spec.md section 6) computed for the whole batch at once:
- crop and resize: one `torchvision.ops.roi_align` per view size over all its B·V boxes (torchvision's crop-box
  rule, from params.view_params); each output pixel averages ceil(box / out)^2 bilinear samples, an area filter
  in place of torchvision's antialiased bilinear resize. The flip is one batched index flip.
- colour jitter with p 0.8: brightness, contrast about the grey mean, then saturation and hue as one 3x3 colour
  matrix per view (one batched product), in this fixed order (torchvision draws an order per image; DALI's graph
  uses the same fixed order). The hue is a rotation about the luma axis in YIQ space, as DALI's (torchvision
  shifts H in HSV), with no clamp between saturation and hue. Grey with p 0.2 is saturation 0 (ITU-R 601 luma,
  as PIL's "L"); Gaussian blur with p blur_prob, sigma U(0.1, 2), one grouped separable convolution over the
  blurred views (edges replicated); normalise.
Random numbers come from (seed, epoch, key) (params.uniforms), as in the DALI loader, so a batch is the same for
any number of workers and on resume. They are not the per-image pipeline's torch draws: same distributions,
other samples (tests/test_batched_views.py compares the statistics).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .params import view_params
from .recipe import ViewRecipe
from .views import IMAGENET_MEAN, IMAGENET_STD

BLUR_RADIUS = math.ceil(3 * 2.0)
"""Taps each side of the blur kernel: 3 sigma at the recipe's largest sigma (2), the same for every batch, so a
sample's views do not depend on the others in its batch."""


def _luma(x: torch.Tensor) -> torch.Tensor:
    """[K, 3, H, W] RGB -> [K, 1, H, W] ITU-R 601-2 luma (PIL's "L", torchvision's rgb_to_grayscale)."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64)


def _colour_matrices(sat: torch.Tensor, hue_deg: torch.Tensor) -> torch.Tensor:
    """[K, 3, 3] RGB maps: saturation `sat` (blend with ITU-R 601 luma; 0 = grey), then a hue rotation by
    `hue_deg` degrees about the luma axis in YIQ space (DALI's hue; torchvision shifts H in HSV instead)."""
    k = sat.shape[0]
    luma = _YIQ[0].expand(3, 3)  # every output channel = the luma row
    eye = torch.eye(3, dtype=torch.float64)
    m_sat = sat.double()[:, None, None] * eye + (1 - sat.double())[:, None, None] * luma
    t = torch.deg2rad(hue_deg.double())
    rot = eye.repeat(k, 1, 1)
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = t.cos(), -t.sin(), t.sin(), t.cos()
    return torch.linalg.inv(_YIQ) @ rot @ _YIQ @ m_sat


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur of each of [K, 3, H, W] with its own sigma [K]: two grouped 1-D convolutions."""
    k, c, h, w = x.shape
    r = BLUR_RADIUS
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    taps = torch.exp(-t[None] ** 2 / (2 * sigma[:, None].to(x.dtype) ** 2))
    taps = (taps / taps.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [K·3, 2r+1]
    y = F.pad(x.reshape(1, k * c, h, w), (r, r, r, r), mode="replicate")
    y = F.conv2d(y, taps[:, None, None, :], groups=k * c)
    y = F.conv2d(y, taps[:, None, :, None], groups=k * c)
    return y.reshape(k, c, h, w)


def _views(images: torch.Tensor, params: list[list[np.ndarray]], views: range, size: int) -> torch.Tensor:
    """The views `views` of images [B, 3, H, W] (float in [0, 1]) at `size`: [len(views), B, 3, size, size]."""
    from torchvision.ops import roi_align

    b, dev = images.shape[0], images.device
    cat = [torch.from_numpy(np.concatenate([params[v][i] for v in views])).to(dev) for i in range(len(params[0]))]
    start, end, jit, bright, contrast, colour, hue, sat, blur, sigma = cat
    flip = start[:, 1] > end[:, 1]
    x0, x1 = torch.minimum(start[:, 1], end[:, 1]), torch.maximum(start[:, 1], end[:, 1])
    idx = torch.arange(b, device=dev, dtype=torch.float32).repeat(len(views))
    rois = torch.stack([idx, x0, start[:, 0], x1, end[:, 0]], 1).to(images.dtype)
    x = roi_align(images, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    rows = flip.nonzero().squeeze(1)
    x[rows] = x[rows].flip(-1)
    one = torch.ones_like(bright)
    b_, c_ = torch.where(jit, bright, one).to(x.dtype), torch.where(jit, contrast, one).to(x.dtype)  # 1: unchanged
    x = (x * b_[:, None, None, None]).clamp(0, 1)
    m = _luma(x).mean((1, 2, 3), keepdim=True)
    x = (c_[:, None, None, None] * x + (1 - c_[:, None, None, None]) * m).clamp(0, 1)
    mats = _colour_matrices(torch.where(colour, sat, one).cpu(), torch.where(jit, hue, torch.zeros_like(hue)).cpu())
    x = torch.einsum("kij,kjhw->kihw", mats.to(device=dev, dtype=x.dtype), x).clamp(0, 1)
    if bool(blur.any()):
        rows = blur.nonzero().squeeze(1)
        x[rows] = _blur(x[rows], sigma[rows])
    mean = torch.tensor(IMAGENET_MEAN, device=dev, dtype=x.dtype)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD, device=dev, dtype=x.dtype)[None, :, None, None]
    return ((x - mean) / std).view(len(views), b, 3, size, size)


def pad_stack(images: list[torch.Tensor]) -> tuple[torch.Tensor, np.ndarray]:
    """uint8 [3, h_i, w_i] images -> (float [B, 3, H, W] in [0, 1], edges replicated to the largest; hw [B, 2])."""
    hw = np.array([im.shape[1:] for im in images], np.int64)
    h, w = hw.max(0)
    out = []
    for im in images:
        x = im.float()[None] / 255.0
        if x.shape[2:] != (h, w):
            x = F.pad(x, (0, int(w) - x.shape[3], 0, int(h) - x.shape[2]), mode="replicate")
        out.append(x)
    return torch.cat(out), hw


def batched_views(images: list[torch.Tensor], recipe: ViewRecipe, keys, seed: int, epoch: int,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(globals [G, B, 3, S, S], focals [F, B, 3, s, s]) of uint8 [3, h, w] images; sample b's views depend on
    (seed, epoch, keys[b]) only. `device`: where the work runs (default: the images' device)."""
    x, hw = pad_stack([im.to(device) if device is not None else im for im in images])
    r = recipe
    params = view_params(r, list(keys), hw, seed, epoch)
    g = _views(x, params, range(r.num_global), r.global_size)
    f = _views(x, params, range(r.num_global, r.num_global + r.num_focal), r.focal_size) if r.num_focal else \
        x.new_zeros(0, len(images), 3, r.focal_size, r.focal_size)
    return g, f
