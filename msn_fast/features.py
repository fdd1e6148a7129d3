"""Frozen features of images, for the evaluation: the three feature sets compared, their extraction and cache.

Every report (`python -m msn_fast.eval --baselines`, the trainer's end-of-run report) compares the same trio,
built here by `trio_trunk`: the trained target encoder, a random-init encoder of the same architecture (what
pre-training adds) and raw pixels (the normalised crop, flattened). An encoder's feature is the CLS token of the
last block before the final LayerNorm, of one centre crop (official logistic_eval.py). Extraction decodes each
image once for every feature set; the cache (the CLI's `--cache`) is keyed by weights, images and transform.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .config import Config
from .cpu_resources import usable_cores
from .model import MSN
from .progress import Progress
from .vit import VisionTransformer

# The evaluation's progress lines go through one logger wherever their loop lives (the CLI prints its name).
log = logging.getLogger("msn_fast.evaluation")

FEATURE_SETS = ("target", "random_init", "raw_pixels")
"""The trio every report compares, by kind (the CLI's --random-init / --raw-pixels flags use these names)."""


def raw_pixels(x: torch.Tensor) -> torch.Tensor:
    """Raw-pixel features: images [B, 3, S, S] -> [B, 3·S·S], the floor any encoder should clear."""
    return x.flatten(1)


def trio_trunk(kind: str, target: VisionTransformer | None, cfg: Config, seed: int,
               device) -> VisionTransformer | None:
    """The encoder of one feature set of FEATURE_SETS, on `device` in eval mode; None for raw pixels.

    "target": `target` itself; "random_init": the trunk a fresh MSN(cfg) draws from `seed` (the caller's RNG is
    left untouched, so the baseline is the same whatever ran before)."""
    if kind == "target":
        trunk = target
    elif kind == "random_init":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            trunk = MSN(cfg).target.trunk
    elif kind == "raw_pixels":
        return None
    else:
        raise ValueError(f"unknown feature set {kind!r}; known: {', '.join(FEATURE_SETS)}")
    return trunk.to(device).eval()


def feature_fn(trunk: VisionTransformer | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """images [B, 3, S, S] -> features [B, D] of `trunk` (see the module docstring), or raw pixels for None."""
    return raw_pixels if trunk is None else trunk.extract_features


def plain_copy(model: MSN, cfg: Config, device) -> MSN:
    """A plain single-process MSN holding `model`'s full weights (gathers FSDP shards; drops AC/compile wrappers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    plain = MSN(cfg).to(device)
    plain.load_state_dict(state)
    return plain


# --- extraction -----------------------------------------------------------------------------------------

def extract_features(fn: Callable[[torch.Tensor], torch.Tensor], source: Sequence, transform,
                     batch_size: int = 256, device="cpu", desc: str = "features", with_index: bool = False,
                     num_workers: int = 1):
    """Apply `fn` (images [B,3,S,S] -> features [B,D]) to every readable image of `source`.

    Returns (features [N, D] float32, labels [N]); unreadable images are left out. `with_index` adds
    the indices into `source` of the N images read. `desc` names the loop in the progress output;
    `num_workers` the decoding processes (see `extract_feature_sets`).
    """
    feats, y, kept = extract_feature_sets({"features": fn}, source, transform, batch_size, device, desc, num_workers)
    return (feats["features"], y, kept) if with_index else (feats["features"], y)


class _Decoded(torch.utils.data.Dataset):
    """source[i] -> (transform(image) or None, label, i), for DataLoader workers."""

    def __init__(self, source: Sequence, transform):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        img, label = self.source[i]
        return (None if img is None else self.transform(img)), label, i


def _stack(items):
    """Collate of _Decoded items: (images [b,3,S,S] of the readable ones, their labels, their indices, items)."""
    ok = [it for it in items if it[0] is not None]
    x = torch.stack([it[0] for it in ok]) if ok else None
    return x, [it[1] for it in ok], [it[2] for it in ok], len(items)


def _decoded_batches(source: Sequence, transform, batch_size: int, num_workers: int):
    """(images, labels, indices, items read) per batch; decoded in `num_workers` worker processes (0: here)."""
    data = _Decoded(source, transform)
    if num_workers > 0 and len(source) > batch_size:
        yield from torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=num_workers,
                                               collate_fn=_stack)
        return
    for s in range(0, len(source), batch_size):
        yield _stack([data[i] for i in range(s, min(len(source), s + batch_size))])


@torch.no_grad()
def extract_feature_sets(fns: dict[str, Callable[[torch.Tensor], torch.Tensor]], source: Sequence, transform,
                         batch_size: int = 256, device="cpu", desc: str = "features", num_workers: int = 1):
    """Every feature set of `fns` (name -> images [B,3,S,S] -> features [B,D]) in one pass over `source`: each
    image is decoded and transformed once (in `num_workers` loader processes while the encoders run here), and
    each batch goes through every function.

    Returns ({name: features [N, D_name] float32}, labels [N], indices into `source` of the N images read);
    unreadable images are left out.
    """
    feats = {name: [] for name in fns}
    labels, kept = [], []
    with Progress(len(source), desc, log, unit="img") as bar:
        for x, y, idx, n in _decoded_batches(source, transform, batch_size, num_workers):
            bar.update(n)
            if x is None:
                continue
            x = x.to(device)
            for name, fn in fns.items():
                feats[name].append(fn(x).float().cpu())
            labels += y
            kept += idx
    out = {name: torch.cat(f).numpy() if f else np.zeros((0, 0), np.float32) for name, f in feats.items()}
    return out, np.asarray(labels, dtype=np.int64), np.asarray(kept, dtype=np.int64)


# --- cache ----------------------------------------------------------------------------------------------

def cache_spec(trunk: VisionTransformer | None) -> dict:
    """What a feature set's cache key says of its features: raw pixels, or the encoder's weights (digest)."""
    if trunk is None:
        return {"kind": "raw-pixels"}
    return {"kind": "cls-prenorm", "weights": _digest_tensors(trunk.state_dict())}


def _digest_tensors(state: dict) -> str:
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


_SOURCE_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _digest_source(src) -> str:
    """Digest of an image folder's files (path, size, mtime, label), once per source object: a report asks for
    it once per split and feature set, and at 60,000 files each asking took 2.5 s."""
    try:
        return _SOURCE_DIGESTS[src]
    except (KeyError, TypeError):  # TypeError: a source that takes no weak reference is digested every time
        pass
    h = hashlib.blake2b(digest_size=16)
    for path, label in src.samples:
        st = os.stat(path)
        h.update(f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{label}\n".encode())
    digest = h.hexdigest()
    try:
        _SOURCE_DIGESTS[src] = digest
    except TypeError:
        pass
    return digest


def cached_features(fn, src, transform, key_parts: dict, cache: Path | None, device,
                    batch_size: int, desc: str = "features") -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """(features, labels, index into src of each row, from_cache) of an image folder `src`. The key covers the
    weights, every image (path, size, mtime) and the transform; a changed checkpoint or crop size extracts anew,
    and so does a changed file once the folder is listed anew (the digest is kept per listing: `_digest_source`;
    every report lists its folders)."""
    file = cache / f"{_cache_key(key_parts, src, transform)}.npz" if cache is not None else None
    hit = _load(file, len(src))
    if hit is not None:
        return (*hit, True)
    # decoding alone (raw pixels): every core decodes; with an encoder, one process decodes while it computes here
    workers = min(usable_cores(), 8) if fn is raw_pixels else 1
    x, y, kept = extract_features(fn, src, transform, batch_size=batch_size, device=device, desc=desc,
                                  with_index=True, num_workers=workers)
    if file is not None:
        _save(file, x, y, kept)
    return x, y, kept, False


PIXEL_CACHE_BYTES = 2 * 2**30
"""Decoded crops of a split are cached (as the raw-pixel features) when they take at most this much."""


def features_via_pixels(fn, spec: dict, src, tf, size: int, split: str, cache: Path | None, device,
                        batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Features of one split, as `cached_features`. Small datasets are decoded once into a cached pixel array
    (the raw-pixel features), which every encoder then reads instead of decoding the images again."""
    raw = {"kind": "raw-pixels", "split": split}
    if spec["kind"] == "raw-pixels" or len(src) * 3 * size * size * 4 > PIXEL_CACHE_BYTES or cache is None:
        desc = f"{split} images" if spec["kind"] == "raw-pixels" else f"{split} features"
        return cached_features(fn, src, tf, {**spec, "split": split}, cache, device, batch_size, desc)
    key = _cache_key({**spec, "split": split}, src, tf)
    file = cache / f"{key}.npz"
    hit = _load(file, len(src))
    if hit is not None:
        return (*hit, True)
    pix, y, kept, _ = cached_features(raw_pixels, src, tf, raw, cache, device, batch_size,
                                      f"{split} images into the pixel cache")
    out = []
    with torch.no_grad(), Progress(len(pix), f"{split} features from the pixel cache", log, unit="img") as bar:
        for s in range(0, len(pix), batch_size):
            batch = torch.from_numpy(pix[s:s + batch_size]).view(-1, 3, size, size).to(device)
            out.append(fn(batch).float().cpu())
            bar.update(len(batch))
    x = torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)
    _save(file, x, y, kept)
    return x, y, kept, False


def _cache_key(key_parts: dict, src, transform) -> str:
    return hashlib.blake2b(json.dumps({**key_parts, "data": _digest_source(src), "transform": repr(transform)},
                                      sort_keys=True).encode(), digest_size=16).hexdigest()


def _load(file: Path | None, n_src: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(x, y, kept) of a cache file, or None. A file from before `kept` was stored counts only when every image
    was read (then kept is every index)."""
    if file is None or not file.is_file():
        return None
    with np.load(file) as z:
        x, y = z["x"], z["y"]
        if "kept" in z:
            return x, y, z["kept"]
    return (x, y, np.arange(n_src)) if len(y) == n_src else None


def _save(file: Path, x: np.ndarray, y: np.ndarray, kept: np.ndarray) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f"{file.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, x=x, y=y, kept=kept)
    os.replace(tmp, file)
