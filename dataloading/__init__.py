"""msn_fast.dataloading: image sources and MSN multi-view loaders (torch fallback; DALI where installed).

Stands alone: imports torch, torchvision, numpy and PIL, never the model or the kernels. nvidia.dali is imported
only when a DALI loader is built (`build_dali_loader`; `dali_available()` says whether it can be).
"""


if __name__ != "msn_fast.dataloading":
    # A source checkout on sys.path (python run from the repository root) makes this folder importable as a
    # top-level package `dataloading`, shadowing any installed package of that name (transformers 5.25 installs
    # Hugging Face's `kernels` and imports names from it). Imported so, it loads that installed package in
    # its place, or else stays an empty module without __file__ and imports nothing. Written out in
    # both folders: data loading and the kernels stand alone and may not import each other.
    import importlib.machinery as _machinery
    import importlib.util
    import os as _os
    import sys as _sys

    _checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        __name__, [p for p in _sys.path if _os.path.abspath(p or ".") != _checkout])
    if _spec is not None:  # the installed package of that name: load it in our place
        _real = importlib.util.module_from_spec(_spec)
        _sys.modules[__name__] = _real
        _spec.loader.exec_module(_real)
    __file__ = None

    def __getattr__(name: str):
        raise AttributeError(f"{__name__!r} is msn-fast's dataloading/ folder: import msn_fast.dataloading instead")
else:
    from .batched_views import batched_views
    from .dali import DaliMultiViewLoader, build_dali_loader, dali_available
    from .loader import MultiViewBatch, MultiViewLoader, ShardedSampler, build_loader, collate
    from .shards import ShardLoader, ShardSet, build_shard_loader, open_shards, write_shards
    from .sources import DataError, Digits, ImageFolder, load_image, read_image, to_rgb
    from .views import IMAGENET_MEAN, IMAGENET_STD, MultiViewTransform, ViewRecipe, eval_transform

    __all__ = [
        "MultiViewBatch", "MultiViewLoader", "ShardedSampler", "build_loader", "collate", "DataError", "Digits",
        "ImageFolder", "load_image", "read_image", "to_rgb", "IMAGENET_MEAN", "IMAGENET_STD", "MultiViewTransform",
        "ViewRecipe", "eval_transform", "DaliMultiViewLoader", "build_dali_loader", "dali_available", "batched_views",
        "ShardLoader", "ShardSet", "build_shard_loader", "open_shards", "write_shards",
    ]
