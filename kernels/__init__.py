"""msn_fast.kernels: Triton kernels for ViT training, each with a torch fallback.

Importable with only torch (and triton, where installed: Linux), so other ViT projects can depend
on it alone. Every public function takes `backend="auto" | "triton" | "torch"`: "auto" runs Triton
on CUDA tensors when Triton is installed and torch otherwise (for attention on a CPU, SDPA or, for short fp32
training attention, the eager form: `attention.CPU_MATMUL_MAX_KEYS`); "triton" without it is a RuntimeError.
"""


if __name__ != "msn_fast.kernels":
    # A source checkout on sys.path (python run from the repository root) makes this folder importable as a
    # top-level package `kernels`, shadowing any installed package of that name (transformers 5.25 installs
    # Hugging Face's `kernels` and imports names from it). Imported so, it loads that installed package in
    # its place, or else stays an empty module without __file__ and imports nothing (importing our kernels
    # twice would register their torch custom ops again, over the first). Written out in both folders: data
    # loading and the kernels stand alone and may not import each other.
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
        raise AttributeError(f"{__name__!r} is msn-fast's kernels/ folder: import msn_fast.kernels instead")
else:
    from .attention import attention, attention_ref
    from .patch_embed import embed_kept_patches, embed_kept_patches_ref
    from .prototype_ce import prototype_cross_entropy, prototype_cross_entropy_ref
    from .token_gather import gather_tokens, gather_tokens_ref

    __all__ = [
        "attention",
        "attention_ref",
        "prototype_cross_entropy",
        "prototype_cross_entropy_ref",
        "embed_kept_patches",
        "embed_kept_patches_ref",
        "gather_tokens",
        "gather_tokens_ref",
    ]
