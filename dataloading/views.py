"""MSN's multi-view augmentation on the CPU with torchvision (the fallback of the DALI pipeline).

Per image (msn_spec.md §6; the same pipeline for every view, only size and crop scale differ):
random-resized-crop -> horizontal flip (0.5) -> colour jitter (p 0.8, strength s: 0.8s/0.8s/0.8s/0.2s)
-> grayscale (0.2) -> Gaussian blur (p 0.5, PIL radius 0.1-2) -> normalise (ImageNet mean/std).
Views: 1 target + 1 anchor at `global_size`, then `num_focal` focal views at `focal_size`.
"""

from __future__ import annotations

import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2

from .recipe import ViewRecipe

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RandomGaussianBlur:
    """PIL Gaussian blur with radius ~ U(lo, hi), applied with probability p (the official transform).

    Works on PIL images (PIL's C blur is ~30x faster than a 23-tap blur of a uint8 tensor on a CPU);
    draws from torch's RNG so the per-sample seeding of the loader makes it reproducible.
    """

    def __init__(self, p: float = 0.5, radius: tuple[float, float] = (0.1, 2.0)):
        self.p, self.radius = p, radius

    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.rand(()).item() >= self.p:
            return img
        lo, hi = self.radius
        return img.filter(ImageFilter.GaussianBlur(lo + (hi - lo) * torch.rand(()).item()))


def view_transform(size: int, scale: tuple[float, float], s: float, blur_prob: float) -> v2.Compose:
    """PIL RGB image -> normalised float32 tensor [3, size, size]. Augments on the PIL image, as the official code."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=scale, antialias=True),
        v2.RandomHorizontalFlip(0.5),
        v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
        v2.RandomGrayscale(0.2),
        RandomGaussianBlur(blur_prob),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class MultiViewTransform:
    """PIL image -> (globals [G, 3, S, S], focals [F, 3, s, s])."""

    def __init__(self, recipe: ViewRecipe):
        self.recipe = recipe
        self.global_tf = view_transform(recipe.global_size, recipe.global_scale, recipe.color_jitter,
                                        recipe.blur_prob)
        self.focal_tf = view_transform(recipe.focal_size, recipe.focal_scale, recipe.color_jitter, recipe.blur_prob)

    def __call__(self, img) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.recipe
        g = torch.stack([self.global_tf(img) for _ in range(r.num_global)])
        if r.num_focal:
            f = torch.stack([self.focal_tf(img) for _ in range(r.num_focal)])
        else:
            f = torch.empty(0, 3, r.focal_size, r.focal_size)
        return g, f


def eval_transform(size: int) -> v2.Compose:
    """Evaluation preprocessing: resize the short side to size·256/224, centre-crop `size` (official eval)."""
    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize(int(round(size * 256 / 224)), antialias=True),
        v2.CenterCrop(size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
