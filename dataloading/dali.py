"""MSN multi-view loader on NVIDIA DALI: each image decoded once, then 1 target + 1 anchor + F focal views.

Same interface and output as the torch loader (`MultiViewLoader`): `batches_per_epoch`, `set_position(epoch,
batch)`, iteration -> MultiViewBatch (float32, normalised, NCHW, grouped by size; CUDA tensors when `device_id` is
set, CPU otherwise). nvidia.dali is imported lazily, so this module imports without it.

How it stays identical to the torch loader where it matters:
- The torch loader's ShardedSampler picks each batch's indices, and every random number of every view is drawn
  in Python from a counter-based stream keyed by (seed, epoch, index). The DALI graph draws nothing: crop boxes,
  flips, jitter factors, grey and blur choices reach it through `external_source`. So sharding (rank/world,
  drop_last, each image once per epoch), determinism and resume are the torch loader's, and batches do not
  depend on DALI's thread count or prefetching.
- Per view (msn_spec.md section 6): random resized crop and horizontal flip in one ROI resize (torchvision's
  crop-box rule, bilinear, antialiased) -> with p 0.8 colour jitter: brightness and contrast about the grey mean
  (`brightness_contrast`, as PIL), then saturation and hue (`hsv`, hue delta = 360 * torchvision's hue fraction,
  in degrees) -> grey with p 0.2 (`hsv` saturation 0 = PIL's ITU-R 601 luma) -> Gaussian blur p 0.5, sigma
  U(0.1, 2) (PIL's radius is its sigma) -> normalise. The ops run under `if` (DALI conditionals), only on the
  samples that need them. Differences, all small: jitter runs in a fixed order (torchvision shuffles the four),
  DALI's hue is a rotation in YIQ space rather than PIL's HSV shift, and brightness is not clipped before contrast.

Robustness (an epoch never dies because of one file):
- Folder files are read in Python. At first sight each gets a PIL header check (no decode): a complete
  8-bit RGB or grey JPEG/PNG (JPEG ends with EOI, PNG with IEND) goes to DALI's decoder as bytes; anything else
  (CMYK, 16-bit, alpha, palette, other formats, truncated files) is decoded by `read_image` (PIL, `to_rgb`) and
  passed on as uncompressed PPM bytes, so it comes out as the torch loader sees it. Files PIL cannot decode are
  skipped as in the torch loader: replaced by an image drawn from (seed, epoch, index) (`loader.replacements`),
  counted in `MultiViewBatch.skipped` (slots replaced) and `broken` (files met), warned about by name once per
  loader and kept in `unreadable`. A slot with no readable replacement raises one DataError line.
- If DALI's decoder still fails (corrupt data behind a valid header), the files of the failed and prefetched
  batches are checked one by one (PIL, then a one-image DALI decode), the culprits re-routed or skipped, and the
  pipeline rebuilt and re-run from the failed batch: the output is what it would have been had the file been
  routed that way from the start.

In-memory sources (e.g. Digits) pass decoded HWC pixels through the same graph. With `device_id` set, decoding is
`mixed` and every op runs on the GPU; brightness/contrast is then written as GPU arithmetic, because an argument
input (the grey mean) must live on the CPU. The pipeline is built once and reused by the next epoch when an epoch
ran to its end (rebuilt after a break or a resume). The GPU path has not been run yet (no GPU where it was written).
"""

from __future__ import annotations

import ctypes
import io
import logging
import weakref
from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .loader import MAX_REPLACEMENTS, MultiViewBatch, ShardedSampler, exhausted_message, replacements
from .params import _NPARAM, RATIO, uniforms, view_params  # noqa: F401  (RATIO: importable from here as before)
from .recipe import ViewRecipe
from .sources import DataError, ImageFolder, read_image
from .views import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

_FAST, _PIL, _BAD = 0, 1, 2  # how a folder file reaches DALI: its own bytes, PIL-decoded PPM, skipped


def dali_available() -> bool:
    """True when nvidia.dali imports (the `dali` extra: nvidia-dali-cuda120, Linux x86_64)."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return False
    return True


def _fast_path(data: bytes) -> tuple[bool, tuple[int, int]]:
    """(DALI can take these bytes as they are, (h, w)) from a PIL header parse; raises if PIL cannot parse it."""
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        fmt, mode = im.format, im.mode
    complete = (fmt == "JPEG" and data.rstrip(b"\0").endswith(b"\xff\xd9")) or (
        fmt == "PNG" and data[-12:-4] == b"\0\0\0\0IEND")
    return complete and mode in ("RGB", "L") and w > 0 and h > 0, (h, w)


def _ppm(img: Image.Image) -> np.ndarray:
    """8-bit RGB PIL image -> binary PPM bytes (no compression: the cheapest input DALI's decoder takes)."""
    return np.frombuffer(b"P6 %d %d 255\n" % img.size + img.tobytes(), np.uint8)


def _graph(recipe: ViewRecipe, encoded: bool, gpu: bool, source):
    """The DALI graph: per-batch inputs from `source` -> one normalised CHW float view per output."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    r = recipe
    nv = r.num_global + r.num_focal
    ins = fn.external_source(source=source, num_outputs=1 + nv * _NPARAM, batch=True)
    img = ins[0]
    if encoded:
        img = fn.decoders.image(img, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                adjust_orientation=False)
    else:
        img = fn.reshape(img, layout="HWC")
        img = img.gpu() if gpu else img
    mean, std = [255 * m for m in IMAGENET_MEAN], [255 * s for s in IMAGENET_STD]
    outs = []
    for v in range(nv):
        start, end, jit, bright, contrast, colour, hue, sat, blur, sigma = ins[1 + v * _NPARAM:1 + (v + 1) * _NPARAM]
        size = r.global_size if v < r.num_global else r.focal_size
        x = fn.resize(img, size=[size, size], roi_start=start, roi_end=end, antialias=True,
                      interp_type=types.INTERP_LINEAR)
        if jit:  # PIL: contrast blends with the grey mean; brightness scales (b·(m + c·(x - m)))
            centre = fn.reductions.mean(fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY))
            if gpu:  # argument inputs must live on the CPU: the same formula as GPU arithmetic (10x slower on CPU)
                y = bright.gpu() * (centre + contrast.gpu() * (x - centre))
                x = fn.cast(dmath.clamp(y + 0.5, 0, 255), dtype=types.UINT8)
            else:
                x = fn.brightness_contrast(x, brightness=bright, contrast=contrast, contrast_center=centre)
        if colour:
            x = fn.hsv(x, hue=hue, saturation=sat)
        if blur:
            x = fn.gaussian_blur(x, sigma=sigma)
        outs.append(fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std))
    return tuple(outs)


def views_to_torch(outs, recipe: ViewRecipe, b: int, device_id: int | None, pin_memory: bool):
    """DALI's per-view outputs (one TensorList [b, 3, size, size] per view) -> (globals [G, b, 3, S, S], focals
    [F, b, 3, s, s]) torch tensors, copied straight into them (on GPU `device_id`, or the CPU)."""
    r = recipe
    dev = "cpu" if device_id is None else f"cuda:{device_id}"
    g = torch.empty(r.num_global, b, 3, r.global_size, r.global_size, device=dev, pin_memory=pin_memory)
    f = torch.empty(r.num_focal, b, 3, r.focal_size, r.focal_size, device=dev, pin_memory=pin_memory)
    stream = None if device_id is None else torch.cuda.current_stream(dev).cuda_stream
    for v, tl in enumerate(outs):
        dst = g[v] if v < r.num_global else f[v - r.num_global]
        if stream is None:
            tl.copy_to_external(ctypes.c_void_p(dst.data_ptr()))
        else:
            tl.copy_to_external(ctypes.c_void_p(dst.data_ptr()), stream, non_blocking=False)
    return g, f


class DaliMultiViewLoader:
    """Iterable of MultiViewBatch for one process, decoded and augmented by DALI (see the module docstring)."""

    def __init__(self, source: Sequence, recipe: ViewRecipe, batch_size: int, *, rank: int = 0, world: int = 1,
                 seed: int = 0, num_threads: int = 2, device_id: int | None = None, prefetch: int = 2,
                 pin_memory: bool = False):
        if not dali_available():
            raise ImportError("the DALI loader needs nvidia.dali: pip install 'msn-fast[dali]' (Linux x86_64), "
                              "or use data.backend=torch")
        self.source, self.recipe, self.batch_size, self.seed = source, recipe, batch_size, seed
        self.num_threads, self.device_id, self.prefetch = num_threads, device_id, prefetch
        self.pin_memory = pin_memory and device_id is None and torch.cuda.is_available()
        self.sampler = ShardedSampler(len(source), batch_size, rank, world, seed)
        self.encoded = isinstance(source, ImageFolder)
        self.route = np.full(len(source), -1, np.int8)  # folder files: -1 unseen, else _FAST/_PIL/_BAD
        self.hw = np.zeros((len(source), 2), np.int64)
        self.unreadable: dict[int, str] = {}  # source index -> "PATH: why", each warned about once, when found
        self._fatal: str | None = None  # a slot with no readable replacement (raised as DataError by __iter__)
        self.epoch, self.start = 0, 0
        self._pipe, self._meta, self._plan, self._next, self._clean, self._label = None, deque(), [], 0, False, -1

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start

    def set_position(self, epoch: int, batch: int = 0) -> None:
        self.epoch, self.start = epoch, batch
        self.sampler.set_position(epoch, batch)

    # ---- Python side: images and random numbers of one batch -------------------------------------------------
    def _mark(self, j: int, route: int, why: str) -> None:
        self.route[j] = route
        path = self.source.samples[j][0] if self.encoded else f"item {j} of the source"
        if route == _BAD:
            self.unreadable[j] = f"{path}: {why}"
            log.warning("skipping unreadable image %s: %s", path, why)
        else:
            log.warning("image %s: %s; decoding it with PIL", path, why)

    def _load(self, j: int) -> np.ndarray | None:
        """Input bytes (folder) or HWC uint8 pixels (in-memory source) of image j, or None if it is unreadable."""
        if not self.encoded:
            img, self._label = self.source[j]
            if img is None:
                self._mark(j, _BAD, "no image")
                return None
            arr = np.asarray(img.convert("RGB"))
            self.hw[j] = arr.shape[:2]
            return arr
        path = self.source.samples[j][0]
        if self.route[j] in (-1, _FAST):
            try:
                with open(path, "rb") as f:
                    data = f.read()
                if self.route[j] == -1:
                    fast, self.hw[j] = _fast_path(data)
                    self.route[j] = _FAST if fast else _PIL
                if self.route[j] == _FAST:
                    return np.frombuffer(data, np.uint8)
            except Exception:  # unreadable or unparseable: let PIL's decode say why
                self.route[j] = _PIL
        if self.route[j] == _PIL:
            try:
                img = read_image(path)
            except Exception as e:  # PIL raises many types
                self._mark(j, _BAD, str(e))
                return None
            self.hw[j] = img.size[::-1]
            return _ppm(img)
        return None

    def _inputs(self, t: int):
        """External-source callback: the inputs of the plan's batch t (StopIteration after the last one)."""
        if t >= len(self._plan):
            raise StopIteration
        data, keys, used, labels, broken = [], [], [], [], {}
        for i in self._plan[t]:
            j, x = self._readable(i, broken)
            data.append(x), keys.append(i), used.append(j)
            labels.append(self.source.samples[j][1] if self.encoded else self._label)
        params = view_params(self.recipe, keys, self.hw[used], self.seed, self.epoch)
        self._meta.append((t, used, labels, sum(j != i for i, j in zip(keys, used)), broken))
        return [data] + [p for view in params for p in view]

    def _readable(self, i: int, broken: dict[int, str]) -> tuple[int, np.ndarray]:
        """(index, input) of image i, or of its first readable replacement (the torch loader's draw); adds the
        unreadable files met to `broken`. None readable: a DataError (kept in `_fatal`, as DALI may wrap it)."""
        if self.route[i] != _BAD and (x := self._load(i)) is not None:
            return i, x
        tried = {i: self.unreadable[i]}  # _load returns None only after _mark(_BAD), which fills `unreadable`
        for j in replacements(len(self.source), i, self.seed, self.epoch, MAX_REPLACEMENTS):
            if self.route[j] != _BAD and (x := self._load(j)) is not None:
                broken.update(tried)
                return j, x
            tried[j] = self.unreadable[j]
        self._fatal = exhausted_message(self.source, i, tried)
        raise DataError(self._fatal)

    # ---- DALI side -----------------------------------------------------------------------------------------
    def _build(self, first: int) -> None:
        from nvidia.dali import pipeline_def

        self._pipe, self._meta, self._next = None, deque(), first
        self._plan_iter = iter(range(first, len(self._plan)))

        me = weakref.ref(self)  # no loader <-> pipeline cycle: a dropped loader frees its pipeline (and threads) at
        # once, not at a later garbage collection, which could even run in a forked DataLoader worker and crash it

        def source():
            loader = me()
            if loader is None:
                raise StopIteration
            return loader._inputs(next(loader._plan_iter))  # StopIteration ends the epoch for DALI

        graph = pipeline_def(_graph, enable_conditionals=True)
        self._pipe = graph(self.recipe, self.encoded, self.device_id is not None, source,
                           batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                           prefetch_queue_depth=self.prefetch)  # no seed: the graph draws nothing
        self._pipe.build()

    def _to_torch(self, outs, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return views_to_torch(outs, self.recipe, b, self.device_id, self.pin_memory)

    def _diagnose(self) -> int:
        """After a DALI failure: re-route or skip the culprits among the fast-path files of the batches in flight.

        Each is decoded by PIL (fails: skipped) and alone by DALI's CPU decoder (fails: PIL route). If that finds
        no culprit (say the GPU decoder rejects what the CPU one takes), all of them take the PIL route."""
        from nvidia.dali import fn, pipeline_def, types

        suspects = sorted({j for m in self._meta for j in m[1] if self.route[j] == _FAST})
        fixed = 0

        @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1, exec_async=False,
                      exec_pipelined=False)
        def probe():
            return fn.decoders.image(fn.external_source(name="x"), device="cpu", output_type=types.RGB)

        pipe = None
        for j in suspects:
            try:
                read_image(self.source.samples[j][0])
            except Exception as e:
                self._mark(j, _BAD, f"PIL cannot decode it either ({e})")
                fixed += 1
                continue
            try:
                pipe = pipe or probe()
                pipe.feed_input("x", [self._load(j)])
                pipe.run()
            except Exception as e:
                self._mark(j, _PIL, f"DALI's decoder rejects it ({str(e).splitlines()[-1][:120]})")
                pipe, fixed = None, fixed + 1
        if not fixed:
            for j in suspects:
                self._mark(j, _PIL, "in a batch DALI's decoder failed on")
                fixed += 1
        return fixed

    def __iter__(self) -> Iterator[MultiViewBatch]:
        bs = self.batch_size
        idx = self.sampler.indices()
        self._plan = [idx[t * bs:(t + 1) * bs] for t in range(self.start, self.batches_per_epoch)]
        if self._pipe is not None and self._clean:  # the last epoch ran to its end: reuse the pipeline
            self._pipe.reset()
            self._meta, self._next, self._plan_iter = deque(), 0, iter(range(len(self._plan)))
        else:
            self._build(0)
        self._clean, self._fatal = False, None
        failures = 0
        while True:
            try:
                outs = self._pipe.run()
            except StopIteration:
                break
            except Exception as e:
                if self._fatal is not None:  # no readable image for a slot: not the decoder's fault
                    self._pipe, self._fatal, message = None, None, self._fatal
                    raise DataError(message) from None
                t = self._meta[0][0] if self._meta else self._next
                failures += 1
                if failures > 2 or not self._diagnose():
                    raise RuntimeError(f"DALI pipeline failed at batch {self.start + t} of epoch {self.epoch}: "
                                       f"{str(e).splitlines()[-1][:300]}") from e
                self._build(t)
                continue
            t, used, labels, skipped, broken = self._meta.popleft()
            g, f = self._to_torch(outs, len(used))
            self._next, failures = t + 1, 0
            lab = torch.tensor(labels, dtype=torch.long)
            yield MultiViewBatch(g, f, lab if self.device_id is None else lab.to(g.device), int(skipped), broken)
        if self._fatal is not None:  # in case DALI took the error for the end of the data
            self._pipe, self._fatal, message = None, None, self._fatal
            raise DataError(message)
        self._clean = True


def build_dali_loader(source: Sequence, recipe: ViewRecipe, batch_size: int, *, rank: int = 0, world: int = 1,
                      seed: int = 0, num_threads: int = 2, device_id: int | None = None,
                      num_workers: int | None = None, pin_memory: bool = False):
    """The DALI loader of an image source, or of WebDataset shards (a ShardSet: dali_shards.DaliShardLoader, DALI's
    own webdataset reader); `num_workers` (if given) is taken as `num_threads`, so build_loader's keywords work too.

    device_id=None: CPU decoding and augmentation (CPU tensors); an int: `mixed` (GPU) decoding, GPU augmentation
    and CUDA tensors on that device.
    """
    from .shards import ShardSet

    if num_workers is not None:
        num_threads = max(1, num_workers)
    if isinstance(source, ShardSet):
        from .dali_shards import DaliShardLoader as loader_class
    else:
        loader_class = DaliMultiViewLoader
    return loader_class(source, recipe, batch_size, rank=rank, world=world, seed=seed, num_threads=num_threads,
                        device_id=device_id, pin_memory=pin_memory)


__all__ = ["DaliMultiViewLoader", "build_dali_loader", "dali_available", "uniforms", "view_params", "views_to_torch"]
