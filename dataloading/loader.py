"""Torch data loader of MSN multi-view batches: sharded, seeded, resumable, robust to bad files.

Every process (rank) sees a disjoint slice of each global batch of one seeded permutation per epoch
(drop_last, like DistributedSampler), so each image is seen at most once per epoch across ranks. Each sample's
augmentation is seeded from (seed, epoch, index), so batches are identical whatever the number of
workers and whether the epoch was resumed part-way. A broken image is
replaced by the next readable one in the source, counted in `MultiViewBatch.skipped` and warned
about by name, so a bad file never stops a run or changes the batch size.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .views import MultiViewTransform, ViewRecipe


@dataclass
class MultiViewBatch:
    """Views grouped by size. globals: [G, B, 3, S, S] (0 = target, 1 = anchor); focals: [F, B, 3, s, s]."""

    globals: torch.Tensor
    focals: torch.Tensor
    labels: torch.Tensor  # [B], -1 where unlabelled
    skipped: int = 0  # broken images replaced in this batch

    def to(self, device, non_blocking: bool = True) -> "MultiViewBatch":
        return MultiViewBatch(self.globals.to(device, non_blocking=non_blocking),
                              self.focals.to(device, non_blocking=non_blocking), self.labels.to(device),
                              self.skipped)

    def pin_memory(self) -> "MultiViewBatch":
        return MultiViewBatch(self.globals.pin_memory(), self.focals.pin_memory(), self.labels, self.skipped)


class MultiViewDataset(Dataset):
    """source[i] -> (globals [G,3,S,S], focals [F,3,s,s], label, skipped)."""

    MAX_REPLACEMENTS = 64

    def __init__(self, source: Sequence, recipe: ViewRecipe, seed: int = 0):
        self.source, self.transform, self.seed, self.epoch = source, MultiViewTransform(recipe), seed, 0

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        for skipped in range(self.MAX_REPLACEMENTS):
            img, label = self.source[(i + skipped) % len(self.source)]
            if img is not None:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed((self.seed * 1_000_003 + self.epoch * 100_000_007 + i) % (2**63))
                    g, f = self.transform(img)
                return g, f, label, skipped
        raise RuntimeError(f"{self.MAX_REPLACEMENTS} consecutive unreadable images from index {i}: check the data")


def collate(items) -> MultiViewBatch:
    g = torch.stack([it[0] for it in items], dim=1)  # (G, B, 3, S, S)
    f = torch.stack([it[1] for it in items], dim=1)  # (F, B, 3, s, s)
    labels = torch.tensor([it[2] for it in items], dtype=torch.long)
    return MultiViewBatch(g, f, labels, sum(it[3] for it in items))


class ShardedSampler(Sampler[int]):
    """Seeded per-epoch permutation, sliced by rank; `start` skips batches already consumed (resume)."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} not in [0, {world})")
        self.n, self.batch_size, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.epoch, self.start_batch = 0, 0
        self.batches_per_epoch = (n // world) // batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"{n} images are too few for batch size {batch_size} on {world} process(es); lower data.batch_size"
            )

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
    """Iterable of MultiViewBatch for one process; `set_position(epoch, batch)` before each epoch."""

    def __init__(self, source: Sequence, recipe: ViewRecipe, batch_size: int, *, rank: int = 0, world: int = 1,
                 seed: int = 0, num_workers: int = 2, pin_memory: bool = False):
        self.dataset = MultiViewDataset(source, recipe, seed)
        self.sampler = ShardedSampler(len(source), batch_size, rank, world, seed)
        # A private generator: otherwise every new iterator draws its base seed from the global RNG, which
        # would shift the masks sampled by the trainer and break exact resume.
        self.loader = DataLoader(self.dataset, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
                                 collate_fn=collate, drop_last=True, pin_memory=pin_memory,
                                 generator=torch.Generator().manual_seed(seed), worker_init_fn=_ignore_sigint)

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def set_position(self, epoch: int, batch: int = 0) -> None:
        self.dataset.epoch = epoch
        self.sampler.set_position(epoch, batch)

    def __iter__(self) -> Iterator[MultiViewBatch]:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def build_loader(source: Sequence, recipe: ViewRecipe, batch_size: int, **kwargs) -> MultiViewLoader:
    """The torch fallback loader (see MultiViewLoader for the keyword arguments)."""
    return MultiViewLoader(source, recipe, batch_size, **kwargs)
