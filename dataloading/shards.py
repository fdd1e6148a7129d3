"""WebDataset tar shards: written from an image folder, read as MSN multi-view batches by the torch loader.

Writing (`python -m msn_fast.dataloading.shards DIR OUT --shard-size N`): OUT/shard-000000.tar, ... hold, per
image, `KEY.EXT` (the file's own bytes, not re-encoded) and `KEY.cls` (its class index as text, when DIR has class
folders), written by webdataset's TarWriter; beside each tar its DALI index `shard-000000.idx` (format v1.2, as
DALI's wds2idx writes it), whose first line gives the sample count without reading the tar.

Reading (`--data.path 'OUT/shard-{000000..000127}.tar'`, `ShardLoader`): each epoch the shards are permuted from
(seed, epoch); process r takes every world-th shard from the r-th, and its loader worker w every num_workers-th of
those; webdataset reads the tars (`tarfile_to_samples`) and shuffles their samples with a seeded buffer. Each
sample is a slot: an unreadable image, a sample without one, or a sample lost to a damaged tar is replaced by a
seeded draw from the worker's last REPLACEMENT_POOL samples, and warned about and counted once per run. So every
worker yields a known number of batches and every process takes the same number of steps (`batches_per_epoch`, a
bound that holds for any permutation; the rest of an epoch's stream is dropped, like drop_last).

Resume is exact: a position (epoch, batch) is reached by reading, not decoding, the samples the workers had
consumed. DataLoader interleaves workers round-robin over those with batches left, so each worker's share of the
first `batch` batches follows from the shard sizes. Exact for the same number of processes and workers; the replay
costs reading the tar bytes up to that point (no decoding).
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import random
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .loader import MultiViewBatch, Unusable, _ignore_sigint, collate, note_unreadable
from .recipe import ViewRecipe
from .sources import IMAGE_EXTENSIONS, DataError, ImageFolder, read_image
from .views import MultiViewTransform

log = logging.getLogger(__name__)

IMAGE_EXTS = frozenset(e.lstrip(".") for e in IMAGE_EXTENSIONS)
REPLACEMENT_POOL = 64
"""Samples a worker keeps (undecoded) to draw the replacement of an unreadable one from."""
SHUFFLE_BUFFER = 1000
"""Samples in webdataset's shuffle buffer (per worker)."""
INDEX_VERSION = "v1.2"


def is_shard_pattern(path: str | os.PathLike) -> bool:
    """True for a tar file or a brace pattern of them (`shards/train-{000000..000127}.tar`)."""
    return str(path).endswith(".tar")


# --- shard files and their DALI index -------------------------------------------------------------------------

def _split_name(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member, split at the first dot of its base name (webdataset's and wds2idx's rule)."""
    base = name.rsplit("/", 1)[-1]
    dot = base.find(".")
    if dot <= 0:
        return None
    return name[:len(name) - len(base) + dot], base[dot + 1:]


def index_path(tar: str | os.PathLike) -> Path:
    return Path(str(tar)[:-len(".tar")] + ".idx")


def scan_tar(tar: str | os.PathLike) -> tuple[list[list[tuple[str, int, int, str]]], str | None]:
    """(samples, error) of a tar: per sample its members (ext, data offset, size, name), grouped by key in order;
    `error` says why reading stopped early (a damaged tar), else None. Reads headers only."""
    samples: list[list[tuple[str, int, int, str]]] = []
    last = None
    try:
        end = os.path.getsize(tar)
        with tarfile.open(tar, mode="r:") as tf:
            for m in tf:
                split = _split_name(m.name) if m.isreg() else None
                if split is None:
                    continue
                if m.offset_data + m.size > end:  # its header is there, its data cut off: the sample is lost
                    if split[0] == last:
                        samples.pop()
                    return samples, f"{m.name} is cut short ({end - m.offset_data} of {m.size} bytes)"
                if split[0] != last:
                    samples.append([])
                    last = split[0]
                samples[-1].append((split[1], m.offset_data, m.size, m.name))
            at = tf.offset  # tarfile ends quietly at a cut between members: a whole tar ends with two zero blocks
            with open(tar, "rb") as f:
                f.seek(at)
                if f.read(1024) != bytes(1024):  # the last sample may be missing members: not counted
                    return samples[:-1], f"no end-of-archive marker at byte {at} (cut short?)"
    except (tarfile.TarError, OSError, EOFError) as e:
        return samples, f"{type(e).__name__}: {e}"
    return samples, None


def write_index(tar: str | os.PathLike, samples: list[list[tuple[str, int, int, str]]]) -> Path:
    """Write the DALI index (v1.2) of `tar` beside it, atomically; returns its path."""
    path = index_path(tar)
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in s) for s in samples]
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def _indexed_count(tar: str) -> int | None:
    """The sample count in the index beside `tar`, if it exists, is not older than the tar and parses."""
    idx = index_path(tar)
    try:
        if idx.stat().st_mtime < os.stat(tar).st_mtime:
            return None
        with open(idx) as f:
            version, count = f.readline().split()
        return int(count) if version.startswith("v1.") and int(count) >= 0 else None
    except (OSError, ValueError):
        return None


def ensure_index(tar: str | os.PathLike) -> Path:
    """The DALI index of `tar`, built from its headers when missing or older than the tar."""
    if _indexed_count(str(tar)) is None:
        samples, error = scan_tar(tar)
        if error is not None:
            raise DataError(f"shard {tar} is damaged ({error}): rewrite it")
        write_index(tar, samples)
    return index_path(tar)


@dataclass
class ShardSet:
    """The shards of a pattern and their sample counts (the index's first line, else counted from the headers)."""

    pattern: str
    urls: list[str]
    counts: list[int]

    def __len__(self) -> int:
        return sum(self.counts)


def _webdataset():
    try:
        import webdataset
    except ImportError:
        raise DataError("WebDataset shards need the webdataset package: pip install 'msn-fast[shards]'") from None
    return webdataset


def open_shards(pattern: str | os.PathLike) -> ShardSet:
    """The ShardSet of a tar path or brace pattern; DataError naming the missing shards or an empty set."""
    _webdataset()
    from braceexpand import braceexpand  # webdataset's own dependency

    pattern = str(pattern)
    urls = list(braceexpand(pattern))
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        raise DataError(f"{len(missing)} of the {len(urls)} shards of {pattern} do not exist (e.g. {missing[0]})")
    counts = []
    for u in urls:
        n = _indexed_count(u)
        if n is None:
            samples, error = scan_tar(u)
            if error is not None:
                log.warning("shard %s is damaged after %d samples (%s): only those are read", u, len(samples), error)
            n = len(samples)
        counts.append(n)
    if sum(counts) == 0:
        raise DataError(f"the {len(urls)} shards of {pattern} hold no samples")
    return ShardSet(pattern, urls, counts)


# --- reading -----------------------------------------------------------------------------------------------------

def _decode(sample: dict, known: dict[str, str]) -> tuple[object, int, str | None, str]:
    """(PIL image | None, label, None | why unreadable, name) of a webdataset sample."""
    url = sample.get("__url__", "?")
    ext = next((k for k in sample if k in IMAGE_EXTS), None)
    name = f"{url}:{sample.get('__key__', '?')}" + (f".{ext}" if ext else "")
    label = -1
    if "cls" in sample:
        try:
            label = int(bytes(sample["cls"]).decode().strip())
        except ValueError:
            label = -1
    if name in known:
        return None, label, known[name], name
    if ext is None:
        has = ", ".join(k for k in sample if not k.startswith("_"))
        return None, label, f"{name}: no image member (has {has})", name
    try:
        return read_image(bytes(sample[ext])), label, None, name
    except Exception as e:  # PIL raises many types
        return None, label, f"{name}: {e}", name


class ShardStream(IterableDataset):
    """One process's multi-view batches from a ShardSet (see the module docstring); set `epoch` and `start` (the
    batch to begin at) before iterating. Yields MultiViewBatch, or an Unusable marker when nothing is readable."""

    def __init__(self, shards: ShardSet, recipe: ViewRecipe, batch_size: int, rank: int, world: int, seed: int,
                 num_workers: int, shuffle_buffer: int = SHUFFLE_BUFFER):
        self.shards, self.batch_size, self.rank, self.world, self.seed = shards, batch_size, rank, world, seed
        self.workers, self.shuffle_buffer = max(1, num_workers), shuffle_buffer
        self.transform = MultiViewTransform(recipe)
        self.epoch, self.start = 0, 0
        self.known: dict[str, str] = {}

    def assignment(self, epoch: int) -> list[list[int]]:
        """Shard indices of each of this process's workers in `epoch`."""
        perm = np.random.default_rng([self.seed, epoch, 0x5A4D]).permutation(len(self.shards.urls))
        mine = perm[self.rank::self.world]
        return [[int(s) for s in mine[w::self.workers]] for w in range(self.workers)]

    def worker_batches(self, epoch: int) -> list[int]:
        return [sum(self.shards.counts[s] for s in a) // self.batch_size for a in self.assignment(epoch)]

    def consumed(self, epoch: int, start: int) -> tuple[list[int], int]:
        """(batches each worker yielded among the first `start` of the epoch, the worker whose turn is next).

        DataLoader asks its workers in turn, 0, 1, ..., and passes over one that has nothing left. A resumed epoch
        maps DataLoader's worker i to worker (i + next) % workers: the cycle of turns is the same, only started
        where the interrupted epoch stopped."""
        left, done, k, turn = self.worker_batches(epoch), [0] * self.workers, 0, 0
        while k < start and any(d < n for d, n in zip(done, left)):
            if done[turn] < left[turn]:
                done[turn] += 1
                k += 1
            turn = (turn + 1) % self.workers
        return done, turn

    def _raw(self, shard_ids: list[int], epoch: int, worker: int, errors: dict[str, str]) -> Iterator[dict]:
        wds = _webdataset()

        def handler(e: Exception) -> bool:  # a damaged tar: note it, go on with the next shard
            url = next((a for a in reversed(e.args) if isinstance(a, str) and a.endswith(".tar")), "a shard")
            errors.setdefault(url, f"{type(e).__name__}: {e.args[0] if e.args else e}")
            return True

        urls = [{"url": self.shards.urls[s]} for s in shard_ids]
        samples = wds.tarfile_to_samples(handler=handler)(iter(urls))
        rng = random.Random(int(np.random.default_rng([self.seed, epoch, self.rank, worker]).integers(2**62)))
        return wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)

    def _views(self, img, epoch: int, worker: int, slot: int):
        with torch.random.fork_rng(devices=[]):  # each slot's views are seeded by the slot, whatever fills it
            key = np.random.default_rng([self.seed, epoch, self.rank, worker, slot]).integers(2**62)
            torch.manual_seed(int(key))
            return self.transform(img)

    def __iter__(self) -> Iterator[MultiViewBatch | Unusable]:
        info = get_worker_info()
        if info is None:  # no worker processes: the one stream
            yield from self._worker(0)
        else:
            yield from self._worker((info.id + self.consumed(self.epoch, self.start)[1]) % self.workers)

    def _worker(self, w: int) -> Iterator[MultiViewBatch | Unusable]:
        epoch, b = self.epoch, self.batch_size
        shard_ids = self.assignment(epoch)[w]
        limit = self.worker_batches(epoch)[w] * b
        skip = self.consumed(epoch, self.start)[0][w] * b
        if limit == 0 or skip >= limit:
            return
        errors: dict[str, str] = {}
        stream = self._raw(shard_ids, epoch, w, errors)
        pool: collections.deque = collections.deque(maxlen=REPLACEMENT_POOL)
        items, pending, slot, reported = [], [], 0, set()
        for sample in _padded(stream, limit):
            if slot < skip:  # replay: read, do not decode
                if sample is not None:
                    pool.append(sample)
                slot += 1
                continue
            broken: dict[str, str] = {}
            for url in errors.keys() - reported:  # a damaged tar, once: the rest of it is not read
                broken[url] = f"{url}: damaged ({errors[url]}); its samples from there on are not read"
                reported.add(url)
            img, label, why, name = _decode(sample, self.known) if sample is not None else (None, -1, None, "")
            if sample is None:  # the stream fell short of the counts: replaced like unreadable samples
                urls = ", ".join(self.shards.urls[s] for s in shard_ids)
                broken[f"lost:{urls}"] = f"{limit - slot} sample(s) of {urls} missing: fewer than their index says"
            elif why is not None:
                broken[name] = why
            replaced = img is None
            if img is None:
                img, label = self._replacement(pool, broken, epoch, w, slot)
            if sample is not None:
                pool.append(sample)
            if img is None:  # nothing readable yet: filled by the next readable image
                pending.append((slot, broken))
            else:
                for s, br in pending:
                    items.append(self._item(img, label, True, br, epoch, w, s))
                pending = []
                items.append(self._item(img, label, replaced, broken, epoch, w, slot))
            slot += 1
            while len(items) >= b:
                yield collate(items[:b])
                items = items[b:]
        if pending:
            urls = ", ".join(self.shards.urls[s] for s in shard_ids)
            yield Unusable(f"none of the {limit} samples of shard(s) {urls} read by one loader worker could be "
                           f"decoded (e.g. {next(iter(pending[0][1].values()))})")

    def _replacement(self, pool, broken: dict[str, str], epoch: int, w: int, slot: int):
        rng = np.random.default_rng([self.seed, epoch, self.rank, w, slot, 1])
        for j in rng.permutation(len(pool)):
            img, label, why, name = _decode(pool[j], self.known)
            if img is not None:
                return img, label
            broken[name] = why
        return None, -1

    def _item(self, img, label, replaced, broken, epoch, w, slot):
        g, f = self._views(img, epoch, w, slot)
        return g, f, label, replaced, broken


def _padded(stream: Iterator[dict], limit: int) -> Iterator[dict | None]:
    """The first `limit` samples of `stream`, then None for each one it fell short by."""
    n = 0
    for sample in stream:
        if n == limit:
            return
        yield sample
        n += 1
    for _ in range(limit - n):
        yield None


class ShardLoader:
    """Iterable of MultiViewBatch from WebDataset shards for one process, with MultiViewLoader's interface:
    `batches_per_epoch`, `set_position(epoch, batch)`, `unreadable` (name -> why, the run's broken samples)."""

    def __init__(self, shards: ShardSet, recipe: ViewRecipe, batch_size: int, *, rank: int = 0, world: int = 1,
                 seed: int = 0, num_workers: int = 2, pin_memory: bool = False,
                 shuffle_buffer: int = SHUFFLE_BUFFER):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1; got {batch_size}")
        if len(shards.urls) < world:
            raise DataError(f"{len(shards.urls)} shard(s) of {shards.pattern} for {world} processes: each process "
                            "needs at least one (write smaller shards)")
        self.stream = ShardStream(shards, recipe, batch_size, rank, world, seed, num_workers, shuffle_buffer)
        self.unreadable: dict[str, str] = {}
        self.stream.known = self.unreadable  # workers start each epoch with a copy: known samples are not decoded
        self.batches_per_epoch = self._bound(shards, batch_size, world, max(1, num_workers))
        if self.batches_per_epoch < 1:
            raise DataError(f"{len(shards)} samples in {len(shards.urls)} shard(s) are too few for batch size "
                            f"{batch_size} on {world} process(es) with {max(1, num_workers)} loader worker(s) "
                            "each: lower data.batch_size or data.num_workers, or write more samples")
        self.loader = DataLoader(self.stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                 generator=torch.Generator().manual_seed(seed), worker_init_fn=_ignore_sigint)

    @staticmethod
    def _bound(shards: ShardSet, b: int, world: int, workers: int) -> int:
        """Batches every process yields in any epoch: a process gets at least floor(S/world) shards (at worst the
        smallest), and each of its workers (at most min(workers, ceil(S/world)) with shards) drops < b samples,
        or, shard by shard, each drops < b (exact for shards of a multiple of b samples)."""
        least = sorted(shards.counts)[:len(shards.urls) // world]
        busy = min(workers, -(-len(shards.urls) // world))
        whole = sum(c // b for c in least)  # floor is superadditive: a worker's batches >= its shards' own
        return max(whole, (sum(least) - busy * (b - 1)) // b)

    def set_position(self, epoch: int, batch: int = 0) -> None:
        self.stream.epoch, self.stream.start = epoch, batch

    def __iter__(self) -> Iterator[MultiViewBatch]:
        left = self.batches_per_epoch - self.stream.start
        if left <= 0:
            return
        for batch in self.loader:
            if isinstance(batch, Unusable):
                raise DataError(batch.message)
            note_unreadable(self.unreadable, batch.broken)
            yield batch
            left -= 1
            if left == 0:
                return

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.stream.start)


def build_shard_loader(shards: ShardSet, recipe: ViewRecipe, batch_size: int, **kwargs) -> ShardLoader:
    """The torch loader of WebDataset shards (see ShardLoader for the keyword arguments)."""
    return ShardLoader(shards, recipe, batch_size, **kwargs)


# --- writing -----------------------------------------------------------------------------------------------------

def write_shards(src: str | os.PathLike, out: str | os.PathLike, shard_size: int, prefix: str = "shard",
                 progress: bool | None = None, shuffle: bool = True, seed: int = 0) -> list[Path]:
    """Write the images of folder `src` (ImageFolder's labels) into OUT/PREFIX-NNNNNN.tar shards of `shard_size`
    samples each, with their DALI indexes. `shuffle` (default) writes them in a seeded random order: readers only
    mix shards and a buffer, so a class-sorted folder would give batches of one or two classes. The key of image
    i of ImageFolder's sorted list is `i` (9 digits), wherever it lands. Each tar is written to a .partial name and
    renamed when complete. Returns the tar paths."""
    wds = _webdataset()

    if shard_size < 1:
        raise DataError(f"shard size {shard_size} must be >= 1")
    folder = ImageFolder(src)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob(f"{prefix}-*.tar")):
        raise DataError(f"{out} already holds {prefix}-*.tar shards: choose another folder or --prefix")
    show = sys.stderr.isatty() if progress is None else progress
    bar = None
    if show:
        from tqdm import tqdm
        bar = tqdm(total=len(folder), desc=f"writing shards to {out}", unit="img")
    n_shards = -(-len(folder) // shard_size)
    order = np.random.default_rng(seed).permutation(len(folder)) if shuffle else np.arange(len(folder))
    paths = []
    for s in range(n_shards):
        path = out / f"{prefix}-{s:06d}.tar"
        tmp = path.with_name(path.name + ".partial")
        with open(tmp, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as writer:
            for i in order[s * shard_size:(s + 1) * shard_size].tolist():
                file, label = folder.samples[i]
                sample = {"__key__": f"{i:09d}", Path(file).suffix.lower().lstrip("."): Path(file).read_bytes()}
                if label >= 0:
                    sample["cls"] = str(label).encode()
                writer.write(sample)
                if bar is not None:
                    bar.update(1)
        samples, error = scan_tar(tmp)
        assert error is None, error  # we just wrote it
        os.replace(tmp, path)
        write_index(path, samples)
        paths.append(path)
        if bar is None:
            log.info("wrote %s (%d samples)", path, len(samples))
    if bar is not None:
        bar.close()
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m msn_fast.dataloading.shards",
                                description="Write an image folder as WebDataset tar shards with DALI indexes.")
    p.add_argument("src", help="image folder (DIR/<class>/*.jpg or DIR/*.jpg)")
    p.add_argument("out", help="folder for the shards")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--prefix", default="shard", help="shard file names: PREFIX-000000.tar, ... (default shard)")
    p.add_argument("--seed", type=int, default=0, help="seed of the order the images are written in (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the folder's sorted order (class by class)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        paths = write_shards(args.src, args.out, args.shard_size, args.prefix, shuffle=not args.no_shuffle,
                             seed=args.seed)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    last = len(paths) - 1
    pattern = Path(args.out) / (f"{args.prefix}-{{000000..{last:06d}}}.tar" if last else f"{args.prefix}-000000.tar")
    print(f"wrote {len(paths)} shard(s) of at most {args.shard_size} samples: --data.path '{pattern}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
