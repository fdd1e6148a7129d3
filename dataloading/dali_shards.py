"""MSN multi-view batches from WebDataset shards on DALI's own webdataset reader (the DALI twin of ShardLoader).

Same interface as the other loaders: `batches_per_epoch`, `set_position(epoch, batch)`, iteration -> MultiViewBatch
(float32, normalised, CHW; CUDA tensors on `device_id`, CPU tensors when it is None), `unreadable`. nvidia.dali is
imported lazily, so this module imports without it.

Reading: each epoch builds its own pipeline. `fn.readers.webdataset` gets the shards in an order drawn from (seed,
epoch), the same on every process, and `shard_id=rank, num_shards=world`: process r reads samples [floor(N·r/W),
floor(N·(r+1)/W)) of the concatenation, through a shuffle buffer of SHUFFLE_BUFFER samples. The reader and every
random op get their own seed from (seed, epoch): the same (seed, epoch) gives the same batches bit for bit, whatever
`num_threads`. Every process stops after `batches_per_epoch` = floor(smallest share / batch size) batches, before
DALI wraps into its next pass: a sample is read at most once per epoch, and ranks are disjoint. As in ShardLoader,
samples mix only by shard order and the buffer: shards in class order would give batches of few classes, which is
why write_shards writes in a seeded random order (unless --no-shuffle). Indexes: `X.idx` beside `X.tar`
(shards.ensure_index builds a missing one), or, in a read-only shard folder, one in cache_dir() ($XDG_CACHE_HOME
or ~/.cache, then msn_fast/wds-index).

Views (recipe.py and views.py, msn_spec.md §6): one decode per sample, then per view a random resized crop (area in the
recipe's scale, aspect 3/4..4/3, bilinear, antialiased) -> with p 0.8 brightness and contrast about the grey mean
(PIL's rule), saturation and hue (`hsv`; torchvision's hue fraction x 360 degrees) -> grey with p 0.2 (`hsv`
saturation 0: PIL's ITU-R 601 luma) -> Gaussian blur with p blur_prob, sigma U(0.1, 2) -> normalise, with the
horizontal flip (p 0.5) folded in (it commutes with the colour ops and the blur). Deviations from torchvision,
all small: DALI's crop draws (area, aspect and ratio-clamped fallback measured to follow torchvision's law);
jitter in a fixed order (torchvision shuffles the four); hue as a rotation in YIQ (PIL shifts HSV hue); no clip
between brightness and contrast; a true Gaussian blur (PIL's is box-based).

Resume: `set_position(epoch, k)` rebuilds the epoch's pipeline and runs (discards) its first k batches: exact, at
the cost of decoding and augmenting those k batches (DALI's reader position cannot be restored without its
checkpointing API, whose state would have to go into every training checkpoint).

Unreadable samples: DALI's decoder raises on one and takes the batch down. Then this process's tars of the epoch
not checked yet are checked once with PIL (`read_image`; formats DALI does not read, such as GIF, count as
unreadable), each unreadable member is warned about once (`TAR:KEY.EXT: why`) and kept in `unreadable`, its index
line is pointed at a readable sample of its tar drawn from (seed, sample) in an index copy in cache_dir(), and the
epoch is rebuilt and replayed to the failed batch. Counts, rank ranges and `batches_per_epoch` stay as they were
(dropping the line would shift the other processes' ranges) and the output is the same whichever run finds the
sample (resume stays exact). A tar with no readable sample is a DataError. Batches' `skipped`/`broken` stay empty.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .dali import dali_available, views_to_torch
from .loader import MultiViewBatch
from .params import RATIO
from .recipe import ViewRecipe
from .shards import IMAGE_EXTS, SHUFFLE_BUFFER, ShardSet, ensure_index, scan_tar, write_index
from .sources import DataError, read_image
from .views import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

DALI_FORMATS = frozenset({"JPEG", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"})
"""PIL's names of the formats DALI's image decoder reads (PPM covers PGM); others count as unreadable."""
SCAN_CHUNK = 256
"""Members read into memory at a time while checking a tar."""
_MASK = (1 << 63) - 1  # SeedSequence takes non-negative integers


# --- index files ---------------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """Where indexes go that cannot be written beside their tar: $XDG_CACHE_HOME (or ~/.cache)/msn_fast/wds-index."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "msn_fast" / "wds-index"


def _cache_key(tar: str) -> str:
    """A name for `tar`'s cached index: changes when the tar is moved, rewritten or touched."""
    st = os.stat(tar)
    return hashlib.sha1(f"{os.path.abspath(tar)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]


def _write_cached(name: str, samples: list) -> str:
    # write_index writes beside the tar path it is given: a name in the cache folder puts the index there
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return str(write_index(folder / f"{name}.tar", samples))


def index_for(tar: str) -> str:
    """The path of `tar`'s DALI index: shards.ensure_index's beside it, else (read-only folder) a cached copy."""
    try:
        return str(ensure_index(tar))
    except OSError:  # the folder (or a stale index in it) is not writable
        pass
    cached = cache_dir() / f"{_cache_key(tar)}.idx"
    if cached.is_file():  # its name pins the tar's size and mtime: nothing to check
        return str(cached)
    samples, error = scan_tar(tar)
    if error is not None:
        raise DataError(f"shard {tar} is damaged ({error}): rewrite it")
    log.info("%s is read-only: its DALI index goes to %s", Path(tar).parent, cache_dir())
    return _write_cached(_cache_key(tar), samples)


# --- checking members ----------------------------------------------------------------------------------------------

def _why_unreadable(data: bytes | None) -> str | None:
    """None if DALI's decoder can take these image bytes (as PIL sees them), else why not."""
    if data is None:
        return "no image member"
    try:
        read_image(data)
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
    except Exception as e:  # PIL raises many types; "cannot identify image file <_io.BytesIO object at 0x...>"
        return re.sub(r" <_io\.BytesIO object at \w+>", "", str(e)) or type(e).__name__
    return None if fmt in DALI_FORMATS else f"a {fmt} image, which DALI's decoder does not read"


def _read(f, member: tuple[str, int, int, str] | None) -> bytes | None:
    if member is None:
        return None
    f.seek(member[1])
    return f.read(member[2])


def check_tar(tar: str, samples: list, threads: int) -> dict[int, tuple[str, str]]:
    """{sample index: ("TAR:KEY.EXT", "TAR:KEY.EXT: why")} of the samples of `tar` (scan_tar's list) whose image
    is unreadable (PIL's decode, or a format DALI does not read). Decodes on `threads` threads."""
    broken = {}
    with open(tar, "rb") as f, ThreadPoolExecutor(max(1, threads)) as pool:
        for lo in range(0, len(samples), SCAN_CHUNK):
            chunk = samples[lo:lo + SCAN_CHUNK]
            images = [next((m for m in s if m[0].lower() in IMAGE_EXTS), None) for s in chunk]
            whys = pool.map(_why_unreadable, [_read(f, m) for m in images])
            for j, (s, m, why) in enumerate(zip(chunk, images, whys), lo):
                if why is not None:  # no image member: named by its key
                    name = f"{tar}:{m[3] if m else s[0][3][:-len(s[0][0]) - 1]}"
                    broken[j] = name, f"{name}: {why}"
    return broken


# --- the DALI graph ------------------------------------------------------------------------------------------------

def _graph(paths: list[str], index_paths: list[str], recipe: ViewRecipe, rank: int, world: int, gpu: bool, seeds):
    """Reader -> one decode -> G global + F focal views (normalised CHW float) and the raw `.cls` bytes."""
    from nvidia.dali import fn, types

    data, cls = fn.readers.webdataset(
        paths=paths, index_paths=index_paths, ext=[";".join(sorted(IMAGE_EXTS)), "cls"],
        case_sensitive_extensions=False, missing_component_behavior="empty", shard_id=rank, num_shards=world,
        random_shuffle=True, initial_fill=SHUFFLE_BUFFER, seed=next(seeds), name="reader")
    img = fn.decoders.image(data, device="mixed" if gpu else "cpu", output_type=types.RGB, adjust_orientation=False)
    r = recipe
    views = [_view(img, r.global_size, r.global_scale, r, gpu, seeds) for _ in range(r.num_global)]
    views += [_view(img, r.focal_size, r.focal_scale, r, gpu, seeds) for _ in range(r.num_focal)]
    return (*views, cls)


def _view(img, size: int, scale: tuple[float, float], recipe: ViewRecipe, gpu: bool, seeds):
    """One view [3, size, size] of every decoded image (see the module docstring); ops run under DALI `if`, only on
    the samples that need them. All random numbers are drawn outside the branches, each op with its own seed."""
    from nvidia.dali import fn, types

    s = recipe.color_jitter

    def uniform(lo: float, hi: float):  # DALI wants lo < hi: a constant (color_jitter 0) as its one value
        return fn.random.uniform(**({"range": [lo, hi]} if hi > lo else {"values": [lo]}), seed=next(seeds))

    def coin(p: float):
        return fn.random.coin_flip(probability=p, dtype=types.BOOL, seed=next(seeds))

    x = fn.random_resized_crop(img, size=[size, size], random_area=list(scale), random_aspect_ratio=list(RATIO),
                               num_attempts=10, antialias=True, interp_type=types.INTERP_LINEAR, seed=next(seeds))
    flip = fn.random.coin_flip(probability=0.5, seed=next(seeds))
    jitter, grey, blur = coin(0.8), coin(0.2), coin(recipe.blur_prob)
    bright, contrast, saturation = (uniform(1 - 0.8 * s, 1 + 0.8 * s) for _ in range(3))
    hue = uniform(-0.2 * s * 360, 0.2 * s * 360)  # torchvision's hue fraction of a turn, in degrees
    sigma = uniform(0.1, 2.0)
    if jitter:
        x = _brightness_contrast(x, bright, contrast, gpu)
        x = fn.hsv(x, hue=hue, saturation=saturation)
    if grey:
        x = fn.hsv(x, saturation=0.0)
    if blur:
        x = fn.gaussian_blur(x, sigma=sigma)
    mean, std = [255 * m for m in IMAGENET_MEAN], [255 * v for v in IMAGENET_STD]
    return fn.crop_mirror_normalize(x, mirror=flip, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std)


def _brightness_contrast(x, bright, contrast, gpu: bool):
    """PIL's brightness then contrast about the grey mean m, unclipped between: b·(m + c·(x - m)) (as dali.py)."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    centre = fn.reductions.mean(fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY))
    if not gpu:
        return fn.brightness_contrast(x, brightness=bright, contrast=contrast, contrast_center=centre)
    # argument inputs must live on the CPU and the mean is on the GPU: the same formula as GPU arithmetic
    y = bright.gpu() * (centre + contrast.gpu() * (x - centre))
    return fn.cast(dmath.clamp(y + 0.5, 0, 255), dtype=types.UINT8)


def _dali_message(e: Exception) -> str:
    """The operator and the cause from a DALI pipeline error (which repeats itself over many lines)."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    op = next((s for s in lines if s.startswith("Error in")), "")
    why = lines[lines.index("encountered:") + 1] if "encountered:" in lines[:-1] else (lines or [repr(e)])[-1]
    return f"{op} {why}".strip()[:300]


def _label(raw) -> int:
    """A `.cls` member's bytes (ASCII digits) -> its class; -1 when absent or not a number."""
    try:
        return int(bytes(np.asarray(raw)).decode().strip())
    except (ValueError, UnicodeDecodeError):
        return -1


# --- the loader ----------------------------------------------------------------------------------------------------

class DaliShardLoader:
    """Iterable of MultiViewBatch from WebDataset shards for one process, read, decoded and augmented by DALI (see
    the module docstring). `unreadable`: "TAR:KEY.EXT" -> "TAR:KEY.EXT: why", the run's broken samples."""

    def __init__(self, shards: ShardSet, recipe: ViewRecipe, batch_size: int, *, rank: int = 0, world: int = 1,
                 seed: int = 0, num_threads: int = 2, device_id: int | None = None, prefetch: int = 2,
                 pin_memory: bool = False):
        if not dali_available():
            raise ImportError("the DALI loader needs nvidia.dali: pip install 'msn-fast[dali]' (Linux x86_64), "
                              "or use data.backend=torch")
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1; got {batch_size}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} not in [0, {world})")
        self.shards, self.recipe, self.batch_size, self.rank, self.world = shards, recipe, batch_size, rank, world
        self.seed, self.num_threads, self.device_id, self.prefetch = seed, num_threads, device_id, prefetch
        self.pin_memory = pin_memory and device_id is None and torch.cuda.is_available()
        n = len(shards)
        shares = [n * (r + 1) // world - n * r // world for r in range(world)]  # DALI's split: the same any order
        self.batches_per_epoch = min(shares) // batch_size
        if self.batches_per_epoch < 1:
            raise DataError(f"{n} samples in {len(shards.urls)} shard(s) are too few for batch size {batch_size} on "
                            f"{world} process(es): DALI gives each process {min(shares)} to {max(shares)}; lower "
                            "data.batch_size or write more samples")
        self.index = [index_for(u) for u in shards.urls]  # DataError for a damaged tar
        self.unreadable: dict[str, str] = {}
        self._checked: set[int] = set()  # tars checked for unreadable samples
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, batch: int = 0) -> None:
        self.epoch, self.start = epoch, batch

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start)

    def order(self, epoch: int) -> list[int]:
        """The shards in the order DALI reads them in `epoch` (ShardStream's permutation): the same on every process."""
        return [int(i) for i in np.random.default_rng([self.seed & _MASK, epoch, 0x5A4D]).permutation(
            len(self.shards.urls))]

    def share(self, epoch: int) -> list[int]:
        """The shards of which this process reads samples in `epoch`: those meeting its range of DALI's split."""
        n, out, at = len(self.shards), [], 0
        lo, hi = n * self.rank // self.world, n * (self.rank + 1) // self.world
        for i in self.order(epoch):
            c = self.shards.counts[i]
            if c and at < hi and at + c > lo:
                out.append(i)
            at += c
        return out

    def _build(self, epoch: int):
        from nvidia.dali import pipeline_def

        r = self.recipe
        n_seeds = 2 + 10 * (r.num_global + r.num_focal)  # pipeline, reader, and 10 random ops per view
        seeds = iter(int(s) & 0x7FFFFFFF for s in
                     np.random.SeedSequence([self.seed & _MASK, epoch, 0xDA11]).generate_state(n_seeds))
        order = self.order(epoch)
        graph = pipeline_def(_graph, enable_conditionals=True)
        pipe = graph([self.shards.urls[i] for i in order], [self.index[i] for i in order], r, self.rank, self.world,
                     self.device_id is not None, seeds, batch_size=self.batch_size, num_threads=self.num_threads,
                     device_id=self.device_id, prefetch_queue_depth=self.prefetch, seed=next(seeds))
        pipe.build()
        return pipe

    def _repair(self, epoch: int) -> int:
        """After a failed run: check this epoch's unchecked tars of this process and point each unreadable sample's
        index line at a readable sample of its tar. Returns how many unreadable samples it found."""
        found = 0
        for i in self.share(epoch):
            if i in self._checked:
                continue
            url = self.shards.urls[i]
            samples, error = scan_tar(url)
            if error is not None:
                raise DataError(f"shard {url} is damaged ({error}): rewrite it")
            broken = check_tar(url, samples, self.num_threads)
            self._checked.add(i)
            for name, why in broken.values():
                if name not in self.unreadable:
                    self.unreadable[name] = why
                    log.warning("skipping unreadable image %s", why)
            if broken:
                self.index[i] = self._patched_index(i, samples, broken)
                found += len(broken)
        return found

    def _patched_index(self, i: int, samples: list, broken: dict) -> str:
        """A copy of tar i's index in which each broken sample's line is that of a readable sample of the tar."""
        url = self.shards.urls[i]
        ok = [j for j in range(len(samples)) if j not in broken]
        if not ok:
            raise DataError(f"all {len(samples)} samples of shard {url} are unreadable (e.g. "
                            f"{next(iter(broken.values()))[1]}): rewrite it or leave it out of data.path")
        patched = list(samples)
        for j in broken:  # drawn from (seed, sample) alone: the same whenever a run finds it
            patched[j] = samples[ok[np.random.default_rng([self.seed & _MASK, i, j]).integers(len(ok))]]
        key = hashlib.sha1(f"{_cache_key(url)}|{self.seed}|{sorted(broken)}".encode()).hexdigest()[:24]
        return _write_cached(f"patched-{key}", patched)

    def _to_torch(self, outs) -> MultiViewBatch:
        *views, cls = outs
        b = len(cls)
        g, f = views_to_torch(views, self.recipe, b, self.device_id, self.pin_memory)
        labels = torch.tensor([_label(cls.at(k)) for k in range(b)], dtype=torch.long)
        return MultiViewBatch(g, f, labels if self.device_id is None else labels.to(g.device))

    def __iter__(self) -> Iterator[MultiViewBatch]:
        epoch, skip = self.epoch, self.start
        if skip >= self.batches_per_epoch:
            return
        pipe, t = self._build(epoch), 0
        while t < self.batches_per_epoch:
            try:
                outs = pipe.run()
            except Exception as e:  # an undecodable sample (or worse): find, patch, rebuild, replay to batch t
                pipe, message = None, _dali_message(e)
                if "decoders.image" not in message:
                    raise RuntimeError(f"DALI pipeline failed at batch {t} of epoch {epoch}: {message}") from e
                if not self._repair(epoch):
                    raise RuntimeError(f"DALI's decoder failed at batch {t} of epoch {epoch} and no unreadable sample "
                                       f"was found in this process's shards: {message}") from e
                pipe, skip, t = self._build(epoch), max(skip, t), 0
                continue
            t += 1
            if t > skip:
                yield self._to_torch(outs)
        del pipe


def build_dali_shard_loader(shards: ShardSet, recipe: ViewRecipe, batch_size: int, **kwargs) -> DaliShardLoader:
    """The DALI loader of WebDataset shards (dali.build_dali_loader with a ShardSet; its keyword arguments)."""
    from .dali import build_dali_loader

    return build_dali_loader(shards, recipe, batch_size, **kwargs)


__all__ = ["DaliShardLoader", "build_dali_shard_loader", "cache_dir", "check_tar", "index_for"]
