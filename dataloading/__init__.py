"""msn_fast.dataloading: image sources and MSN multi-view loaders (torch fallback; DALI where installed).

Stands alone: imports torch, torchvision, numpy and PIL, never the model or the kernels. nvidia.dali is imported
only when a DALI loader is built (`build_dali_loader`; `dali_available()` says whether it can be).
"""

from .dali import DaliMultiViewLoader, build_dali_loader, dali_available
from .loader import MultiViewBatch, MultiViewLoader, ShardedSampler, build_loader, collate
from .sources import DataError, Digits, ImageFolder, load_image, read_image, to_rgb
from .views import IMAGENET_MEAN, IMAGENET_STD, MultiViewTransform, ViewRecipe, eval_transform

__all__ = [
    "MultiViewBatch", "MultiViewLoader", "ShardedSampler", "build_loader", "collate", "DataError", "Digits",
    "ImageFolder", "load_image", "read_image", "to_rgb", "IMAGENET_MEAN", "IMAGENET_STD", "MultiViewTransform",
    "ViewRecipe", "eval_transform", "DaliMultiViewLoader", "build_dali_loader", "dali_available",
]
