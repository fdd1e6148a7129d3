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
    # Imported on first use (PEP 562), so that a module that needs one light piece, such as msn_fast's config
    # taking ViewRecipe from .recipe, does not load PIL, torchvision and every loader.
    _EXPORTS = {
        "batched_views": "batched_views",
        "DaliMultiViewLoader": "dali", "build_dali_loader": "dali", "dali_available": "dali",
        "MultiViewBatch": "loader", "MultiViewLoader": "loader", "ShardedSampler": "loader", "build_loader": "loader",
        "collate": "loader",
        "ViewRecipe": "recipe",
        "ShardLoader": "shards", "ShardSet": "shards", "build_shard_loader": "shards", "open_shards": "shards",
        "write_shards": "shards",
        "DataError": "sources", "Digits": "sources", "ImageFolder": "sources", "load_image": "sources",
        "read_image": "sources", "to_rgb": "sources",
        "IMAGENET_MEAN": "views", "IMAGENET_STD": "views", "MultiViewTransform": "views", "eval_transform": "views",
    }
    __all__ = list(_EXPORTS)

    def __getattr__(name: str):
        if name not in _EXPORTS:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
