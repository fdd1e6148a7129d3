"""msn-fast: Masked Siamese Networks (Assran et al. 2022, arXiv 2204.07141), performance-engineered.

Layers, in one direction: `msn_fast.kernels` (Triton kernels with torch fallbacks) and
`msn_fast.dataloading` (image sources and multi-view loaders) stand alone; this package (ViT,
heads, masking, schedules, trainer, evaluation) uses both.
"""

__version__ = "0.1.0"

_EXPORTS = {"Config": "config", "RECIPES": "recipes", "get_recipe": "recipes", "ARCHS": "vit",
            "VisionTransformer": "vit", "build_vit": "vit"}


def __getattr__(name: str):
    """The exports, imported on first use, so that `import msn_fast.kernels` loads only torch and triton: the config
    builds on msn_fast.dataloading's ViewRecipe, and the data loading package brings PIL and torchvision."""
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Config", "RECIPES", "get_recipe", "ARCHS", "VisionTransformer", "build_vit", "__version__"]
