"""msn-fast: Masked Siamese Networks (Assran et al. 2022, arXiv 2204.07141), performance-engineered.

Layers, in one direction: `msn_fast.kernels` (Triton kernels with torch fallbacks) and
`msn_fast.dataloading` (image sources and multi-view loaders) stand alone; this package (ViT,
heads, masking, schedules, trainer, evaluation) uses both.
"""

__version__ = "0.1.0"

from .config import Config  # noqa: E402
from .recipes import RECIPES, get_recipe  # noqa: E402
from .vit import ARCHS, VisionTransformer, build_vit  # noqa: E402

__all__ = ["Config", "RECIPES", "get_recipe", "ARCHS", "VisionTransformer", "build_vit", "__version__"]
