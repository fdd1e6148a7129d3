"""The parameters of MSN's views (sizes, counts, crop scales, colour, blur), defined once.

Standard library only, so that msn_fast's config (whose DataConfig inherits these fields as its --data.* flags)
loads no image library. The pipelines that make the views are views.py (torchvision), batched_views.py (tensors)
and dali.py (DALI).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar


@dataclass(kw_only=True, slots=True)
class ViewRecipe:
    """Sizes, counts, crop scales and colour of the views; defaults are the official ones.

    The one definition of these parameters: msn_fast's DataConfig inherits the fields (they are its
    --data.global_size ... flags, and the docstrings below are their --help), so a DataConfig is a ViewRecipe.
    Not frozen for that reason (the config is overridden in place); the loaders never change it.
    """

    num_global: ClassVar[int] = 2  # target + anchor: MSN's two global views, not a choice
    flag_prefix: ClassVar[str] = ""  # how a check's message names a field; DataConfig's are its CLI flags

    global_size: int = 224
    """side of the target and anchor views"""
    focal_size: int = 96
    """side of the focal views"""
    num_focal: int = 10
    """focal views per image (official: 10)"""
    global_scale: tuple[float, float] = (0.3, 1.0)
    """random-resized-crop area range of the global views"""
    focal_scale: tuple[float, float] = (0.05, 0.3)
    """random-resized-crop area range of the focal views"""
    color_jitter: float = 0.5
    """colour-jitter strength s (brightness/contrast/saturation 0.8s, hue 0.2s), applied with p=0.8"""
    blur_prob: float = 0.5
    """probability of Gaussian blur"""

    def __post_init__(self):
        p = self.flag_prefix
        for name in ("global_size", "focal_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{p}{name} must be >= 1; got {getattr(self, name)}")
        if self.num_focal < 0:
            raise ValueError(f"{p}num_focal must be >= 0; got {self.num_focal}")
        for name in ("global_scale", "focal_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:  # fractions of the image's area, smallest first
                raise ValueError(f"{p}{name} must be two area fractions 0 < min <= max <= 1; got {lo} {hi}")
        if not (math.isfinite(self.color_jitter) and self.color_jitter >= 0):
            raise ValueError(f"{p}color_jitter must be >= 0; got {self.color_jitter}")
        if not 0 <= self.blur_prob <= 1:
            raise ValueError(f"{p}blur_prob must be a probability in [0, 1]; got {self.blur_prob}")
