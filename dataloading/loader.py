"""Torch data loader of MSN multi-view batches: sharded, seeded, resumable, robust to bad files.

Every process (rank) sees a disjoint slice of each global batch of one seeded permutation per epoch
(drop_last, like DistributedSampler), so each image is seen at most once per epoch across ranks. Each sample's
augmentation is seeded from (seed, epoch, index), so batches are identical whatever the number of
workers and whether the epoch was resumed part-way.

A broken image is replaced by a readable one drawn at random from (seed, epoch, index) alone (`replacements`),
so no image is over-sampled and resume stays exact. Workers only report what they met (`MultiViewBatch.broken`);
the main process warns once per file and keeps the run's set (`MultiViewLoader.unreadable`), because workers
are separate processes started anew each epoch. When no readable replacement is found, the worker returns a
marker instead of raising (a worker's exception reaches the main process wrapped in a traceback), and the main
process raises one `DataError` line.
"""

from __future__ import annotations

import inspect
import logging
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .recipe import ViewRecipe
from .sources import DataError, fit_short_side
from .views import MultiViewTransform

log = logging.getLogger(__name__)

MAX_REPLACEMENTS = 64
"""Readable images tried in place of a broken one before the data is declared unusable."""


@dataclass
class MultiViewBatch:
    """Views grouped by size. globals: [G, B, 3, S, S] (0 = target, 1 = anchor); focals: [F, B, 3, s, s]."""

    globals: torch.Tensor
    focals: torch.Tensor
    labels: torch.Tensor  # [B], -1 where unlabelled
    skipped: int = 0  # broken images replaced in this batch
    broken: dict[int, str] = field(default_factory=dict)
    """source index -> "PATH: why" of every unreadable file met filling this batch (replacement draws included).
    A run's count of unreadable files is the size of the union over its batches (the loader's `unreadable`)."""

    def to(self, device, non_blocking: bool = True) -> "MultiViewBatch":
        return MultiViewBatch(self.globals.to(device, non_blocking=non_blocking),
                              self.focals.to(device, non_blocking=non_blocking), self.labels.to(device),
                              self.skipped, self.broken)

    def pin_memory(self) -> "MultiViewBatch":
        return MultiViewBatch(self.globals.pin_memory(), self.focals.pin_memory(), self.labels, self.skipped,
                              self.broken)


@dataclass(frozen=True)
class Unusable:
    """Returned by a worker instead of a batch when a slot has no readable replacement; the loader raises it in
    the main process as DataError(message)."""

    message: str


def replacements(n: int, i: int, seed: int, epoch: int, limit: int = MAX_REPLACEMENTS) -> list[int]:
    """Indices to try, in order, in place of unreadable image i of an n-image source: `limit` distinct others
    (every other one when n <= limit + 1) drawn at random from (seed, epoch, i) alone.

    Uniform over the source, unlike the alphabetical neighbour, which would be drawn twice as often; the same for
    any number of workers and on resume. Computed only for a broken slot: O(limit) (Floyd's sampling) for any n.
    """
    mask = (1 << 63) - 1  # SeedSequence takes non-negative integers
    rng = np.random.default_rng([seed & mask, epoch & mask, i & mask])
    draw = rng.choice(n, size=min(n, limit + 1), replace=False)
    return [int(j) for j in draw if j != i][:limit]


def exhausted_message(source: Sequence, i: int, broken: dict[int, str]) -> str:
    """The one-line DataError of a slot with no readable replacement (`broken`: every file tried, i's first)."""
    n, root = len(source), getattr(source, "root", None)
    where = f"in {root}" if root is not None else "in the data source"
    example = next(iter(broken.values())).splitlines()[0]
    if len(broken) >= n:
        return f"all {n} images {where} are unreadable (e.g. {example}): check the files"
    return (f"image {i} {where} and all {len(broken) - 1} images drawn at random to replace it are unreadable "
            f"(e.g. {example}): most of its {n} files seem broken; check the data")


def note_unreadable(seen: dict[int, str], broken: dict[int, str]) -> None:
    """Add a batch's broken files to the run's `seen`, warning once for each new one."""
    for j, why in broken.items():
        if j not in seen:
            seen[j] = why
            log.warning("skipping unreadable image %s", why)


def _takes_min_size(source) -> bool:
    """Whether `source.load` takes `min_size` (ImageFolder's does; a user's `load(i)` need not)."""
    try:
        return "min_size" in inspect.signature(source.load).parameters
    except (AttributeError, TypeError, ValueError):
        return False


class DecodedCache:
    """Decoded images kept in memory up to `max_bytes`, by source index: uint8 [h, w, 3] arrays, each added while
    it fits and never evicted (the first ones met stay: one epoch's order is random, so any fixed part serves as
    well as another). What a decode-only item holds is a function of its index alone, so a hit returns exactly
    what decoding again would."""

    OVERHEAD = 128  # bytes a kept entry costs beyond its pixels (array header, dict slot), roughly

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes, self.full = max_bytes, 0, False
        self.items: dict[int, tuple[np.ndarray, int]] = {}

    def get(self, i: int) -> tuple[np.ndarray, int] | None:
        return self.items.get(i)

    def put(self, i: int, pixels: np.ndarray, label: int) -> None:
        cost = pixels.nbytes + self.OVERHEAD
        if self.bytes + cost > self.max_bytes:
            self.full = True
            return
        self.items[i] = (pixels, label)
        self.bytes += cost


class MultiViewDataset(Dataset):
    """source[i] -> (globals [G,3,S,S], focals [F,3,s,s], label, replaced, broken) or an Unusable marker; with
    `decode_only`, (uint8 [3, h, w] pixels, (i, epoch), label, replaced, broken) for BatchedCollate.

    cache_bytes (decode-only items): keep decoded images in memory up to this many bytes (DecodedCache), so each
    is decoded once and later epochs read it from memory; 0 turns it off. Worth it in the training process only
    (num_workers 0): a worker's copy of the dataset, with its cache, is dropped at the end of each epoch."""

    MAX_REPLACEMENTS = MAX_REPLACEMENTS

    def __init__(self, source: Sequence, recipe: ViewRecipe, seed: int = 0, decode_only: bool = False,
                 cache_bytes: int = 0):
        self.source, self.transform, self.seed, self.epoch = source, MultiViewTransform(recipe), seed, 0
        self.decode_only = decode_only  # items carry the decoded image; BatchedCollate makes the views
        # Decode-only items need no more than twice the largest view's size on the short side: a larger photo
        # is decoded at a reduced scale where the source can (ImageFolder: JPEG DCT scaling), then box-filtered
        # to exactly that. Crop fractions are relative, so the views' statistics do not change.
        self.max_short_side = 2 * max(recipe.global_size, recipe.focal_size)
        self._load_kwargs = {"min_size": self.max_short_side} if decode_only and _takes_min_size(source) else {}
        self.known: dict[int, str] = {}  # unreadable files found earlier in the run: not decoded again
        self.cache = DecodedCache(cache_bytes) if decode_only and cache_bytes > 0 else None

    def __len__(self) -> int:
        return len(self.source)

    def _read(self, j: int):
        """(image | None, label, None | why it is unreadable), with no warning (the main process warns)."""
        if j in self.known:
            return None, -1, self.known[j]
        if hasattr(self.source, "load"):
            return self.source.load(j, **self._load_kwargs)
        img, label = self.source[j]
        return img, label, None if img is not None else f"item {j} of the source: no image"

    def _pixels(self, j: int):
        """Decode-only read: (uint8 [h, w, 3] array | None, label, None | why), from the cache when it is there."""
        hit = self.cache.get(j) if self.cache is not None else None
        if hit is not None:
            return hit[0], hit[1], None
        img, label, why = self._read(j)
        if img is None:
            return None, label, why
        pixels = np.array(fit_short_side(img, self.max_short_side), np.uint8, copy=True)
        if self.cache is not None:
            self.cache.put(j, pixels, label)
        return pixels, label, None

    def __getitem__(self, i: int):
        read = self._pixels if self.decode_only else self._read
        img, label, why = read(i)
        broken = {}
        if img is None:
            broken[i] = why
            for j in replacements(len(self.source), i, self.seed, self.epoch, self.MAX_REPLACEMENTS):
                img, label, why = read(j)
                if img is not None:
                    break
                broken[j] = why
            else:
                return Unusable(exhausted_message(self.source, i, broken))
        if self.decode_only:  # a view of the array (batched_views copies it into its padded batch)
            return torch.from_numpy(img).permute(2, 0, 1), (i, self.epoch), label, i in broken, broken
        with torch.random.fork_rng(devices=[]):  # the slot's views are seeded by the slot, whatever fills it
            torch.manual_seed((self.seed * 1_000_003 + self.epoch * 100_000_007 + i) % (2**63))
            g, f = self.transform(img)
        return g, f, label, i in broken, broken


def collate(items) -> MultiViewBatch | Unusable:
    failed = next((it for it in items if isinstance(it, Unusable)), None)
    if failed is not None:
        return failed
    g = torch.stack([it[0] for it in items], dim=1)  # (G, B, 3, S, S)
    f = torch.stack([it[1] for it in items], dim=1)  # (F, B, 3, s, s)
    labels = torch.tensor([it[2] for it in items], dtype=torch.long)
    broken = {j: why for it in items for j, why in it[4].items()}
    return MultiViewBatch(g, f, labels, sum(it[3] for it in items), broken)


class BatchedCollate:
    """collate_fn of decode-only items: the batch's views in one pass (batched_views), seeded by (seed, epoch,
    slot index) like the per-image views, so a batch does not depend on the number of workers or a resume."""

    def __init__(self, recipe: ViewRecipe, seed: int):
        self.recipe, self.seed = recipe, seed

    def __call__(self, items) -> MultiViewBatch | Unusable:
        from .batched_views import batched_views

        failed = next((it for it in items if isinstance(it, Unusable)), None)
        if failed is not None:
            return failed
        epoch = items[0][1][1]
        g, f = batched_views([it[0] for it in items], self.recipe, [it[1][0] for it in items], self.seed, epoch)
        labels = torch.tensor([it[2] for it in items], dtype=torch.long)
        broken = {j: why for it in items for j, why in it[4].items()}
        return MultiViewBatch(g, f, labels, sum(it[3] for it in items), broken)


class ShardedSampler(Sampler[int]):
    """Seeded per-epoch permutation, sliced by rank; `start` skips batches already consumed (resume)."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} not in [0, {world})")
        self.n, self.batch_size, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.epoch, self.start_batch = 0, 0
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1; got {batch_size}")
        self.batches_per_epoch = (n // world) // batch_size
        if self.batches_per_epoch < 1:
            fix = (f"lower data.batch_size to at most {n // world}" if n >= world else "use fewer processes")
            raise DataError(f"{n} images are too few for batch size {batch_size} on {world} process(es): one step "
                            f"needs {batch_size * world}; {fix} or add images")

    def set_position(self, epoch: int, batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, batch

    def indices(self) -> list[int]:
        """This rank's indices for the epoch: global batch j is perm[j·B·W : (j+1)·B·W] and rank r takes its
        r-th slice, so W processes with batch B see exactly the batches of one process with batch W·B."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        b, w = self.batch_size, self.world
        starts = [(j * w + self.rank) * b for j in range(self.batches_per_epoch)]
        return [i for s in starts for i in perm[s:s + b]]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start_batch * self.batch_size:])

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


def _ignore_sigint(worker_id: int) -> None:
    """Workers ignore Ctrl-C (a terminal sends it to the whole process group): the main process decides when to
    stop, finishes its step and saves a checkpoint, which needs the workers alive until then."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class MultiViewLoader:
    """Iterable of MultiViewBatch for one process; `set_position(epoch, batch)` before each epoch.

    `unreadable` (source index -> "PATH: why") holds every broken file met so far by this loader, each warned about
    once, when first met; its size is the run's count. `augment`: "per_image" (views.py, torchvision on each PIL
    image) or "batched" (batched_views.py: the workers decode, then one tensor pass per batch). `cache_mb`: with
    "batched" and num_workers 0, decoded images are kept in up to this much memory (MultiViewDataset).
    """

    def __init__(self, source: Sequence, recipe: ViewRecipe, batch_size: int, *, rank: int = 0, world: int = 1,
                 seed: int = 0, num_workers: int = 2, pin_memory: bool = False, augment: str = "per_image",
                 cache_mb: float = 0.0):
        if augment not in ("per_image", "batched"):
            raise ValueError(f"augment={augment!r}: choose per_image or batched")
        if cache_mb < 0:
            raise ValueError(f"cache_mb={cache_mb}: must be >= 0")
        cache_bytes = int(cache_mb * 2**20) if num_workers == 0 else 0  # workers drop theirs every epoch
        self.dataset = MultiViewDataset(source, recipe, seed, decode_only=augment == "batched", cache_bytes=cache_bytes)
        self.unreadable: dict[int, str] = {}
        self._cache_told = False
        self.dataset.known = self.unreadable  # workers start each epoch with a copy: known files are not re-read
        self.sampler = ShardedSampler(len(source), batch_size, rank, world, seed)
        # A private generator: otherwise every new iterator draws its base seed from the global RNG, which
        # would shift the masks sampled by the trainer and break exact resume.
        self.loader = DataLoader(self.dataset, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
                                 collate_fn=collate if augment == "per_image" else BatchedCollate(recipe, seed),
                                 drop_last=True, pin_memory=pin_memory,
                                 generator=torch.Generator().manual_seed(seed), worker_init_fn=_ignore_sigint)

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def set_position(self, epoch: int, batch: int = 0) -> None:
        self.dataset.epoch = epoch
        self.sampler.set_position(epoch, batch)

    def __iter__(self) -> Iterator[MultiViewBatch]:
        for batch in self.loader:
            if isinstance(batch, Unusable):
                raise DataError(batch.message)
            note_unreadable(self.unreadable, batch.broken)
            yield batch
        cache = self.dataset.cache
        if cache is not None and not self._cache_told:  # once, at the end of the first whole epoch
            self._cache_told = True
            room = (f"full at {cache.max_bytes / 2**20:.0f} MB: the other images are decoded every epoch "
                    f"(--data.cache_mb)" if cache.full else f"of {cache.max_bytes / 2**20:.0f} MB")
            log.info("decoded images kept in memory: %d of %d, %.0f MB %s", len(cache.items), len(self.dataset),
                     cache.bytes / 2**20, room)

    def __len__(self) -> int:
        return len(self.loader)


def build_loader(source: Sequence, recipe: ViewRecipe, batch_size: int, **kwargs) -> MultiViewLoader:
    """The torch fallback loader (see MultiViewLoader for the keyword arguments)."""
    return MultiViewLoader(source, recipe, batch_size, **kwargs)
