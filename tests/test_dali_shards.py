"""The DALI loader of WebDataset shards (CPU pipeline): shapes, labels, sharding, determinism, resume, indexes,
unreadable samples, one-line errors and agreement with the torch ShardLoader. Shards are written from generated
images, one class folder per image, so a label names its image.

Skipped where nvidia.dali is not installed (`pip install -e .[dali]`), except the lazy-import test.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("webdataset", reason="WebDataset shards need the webdataset package (pip install -e .[dev])")

from msn_fast.dataloading import IMAGENET_MEAN, IMAGENET_STD, DataError, ViewRecipe, dali_available  # noqa: E402
from msn_fast.dataloading.dali_shards import build_dali_shard_loader, cache_dir  # noqa: E402
from msn_fast.dataloading.shards import ShardLoader, ShardSet, index_path, open_shards, write_shards  # noqa: E402

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia.dali is not installed (pip install -e .[dali])")
RECIPE = ViewRecipe(global_size=16, focal_size=8, num_focal=2)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Indexes the loader writes to its cache folder (patched ones for unreadable samples) go under tmp_path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _field(rng, h: int, w: int) -> np.ndarray:
    """A smooth random colour field (like a photo, it survives resizing)."""
    base = rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC))


def _shards(tmp_path: Path, n: int = 14, size: int = 4, broken=(), gif=(), ext: str = "png", hw=(12, 24),
            classes: bool = True, seed: int = 0) -> ShardSet:
    """n images (image i in class folder i; `broken`: garbage bytes; `gif`: saved as GIF) in shards of `size`."""
    rng = np.random.default_rng(seed)
    root = tmp_path / "img"
    for i in range(n):
        d = root / f"c{i:03d}" if classes else root
        d.mkdir(parents=True, exist_ok=True)
        h, w = rng.integers(hw[0], hw[1], 2)
        f = d / f"im{i:03d}.{'gif' if i in gif else ext}"
        Image.fromarray(_field(rng, h, w)).save(f)
        if i in broken:
            f.write_bytes(b"not an image at all")
    paths = write_shards(root, tmp_path / "out", size, progress=False)
    return open_shards(str(tmp_path / "out" / f"shard-{{000000..{len(paths) - 1:06d}}}.tar"))


def _epoch(loader, epoch: int = 0, start: int = 0) -> list:
    loader.set_position(epoch, start)
    return list(loader)


def _labels(batches) -> list[int]:
    return torch.cat([b.labels for b in batches]).tolist()


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x.globals, y.globals) and torch.equal(x.focals, y.focals)
                                    and torch.equal(x.labels, y.labels) for x, y in zip(a, b))


@needs_dali
def test_shapes_dtypes_range_and_labels_from_cls(tmp_path):
    shards = _shards(tmp_path, n=14, size=4)
    loader = build_dali_shard_loader(shards, RECIPE, 4, num_workers=2, pin_memory=False)  # build_loader's keywords
    assert loader.batches_per_epoch == len(loader) == 3
    batches = _epoch(loader)
    assert len(batches) == 3
    b = batches[0]
    assert b.globals.shape == (2, 4, 3, 16, 16) and b.focals.shape == (2, 4, 3, 8, 8)
    assert b.globals.dtype == b.focals.dtype == torch.float32 and b.labels.dtype == torch.long
    lo = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    hi = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    for x in (b.globals, b.focals):
        assert torch.isfinite(x).all() and lo - 1e-4 <= x.min() and x.max() <= hi + 1e-4 and x.std() > 0.1
    assert not torch.equal(b.globals[0], b.globals[1])  # target and anchor are different views
    labels = _labels(batches)
    assert len(set(labels)) == 12 and set(labels) <= set(range(14))
    flat = build_dali_shard_loader(_shards(tmp_path / "flat", n=4, size=4, classes=False), RECIPE, 2)
    assert _labels(_epoch(flat)) == [-1] * 4  # no .cls member: unlabelled


@needs_dali
def test_whole_image_views_are_the_image_maybe_flipped_or_grey(tmp_path):
    """No jitter or blur, crops covering the image at its own size: each view is the image, maybe flipped and/or
    greyed (PIL's luma), to within one 8-bit level; no focal views gives an empty focal tensor."""
    shards = _shards(tmp_path, n=8, size=4, hw=(16, 17))
    recipe = ViewRecipe(global_size=16, focal_size=8, num_focal=0, global_scale=(1.0, 1.0), color_jitter=0.0,
                        blur_prob=0.0)
    batches = _epoch(build_dali_shard_loader(shards, recipe, 4, seed=1))
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    kinds = set()
    for batch in batches:
        assert batch.focals.shape == (0, 4, 3, 8, 8)
        for b, label in enumerate(batch.labels.tolist()):
            img = Image.open(tmp_path / "img" / f"c{label:03d}" / f"im{label:03d}.png").convert("RGB")
            ref, grey = (torch.from_numpy(np.asarray(im.convert("RGB"), np.float32) / 255).permute(2, 0, 1)
                         for im in (img, img.convert("L")))
            for v in range(2):
                got = batch.globals[v, b] * std + mean
                match = [k for k, c in enumerate((ref, ref.flip(-1), grey, grey.flip(-1)))
                         if torch.allclose(got, c, atol=1 / 255 + 1e-4)]
                assert match, (label, v)
                kinds.add(match[0])
    assert {0, 1} <= kinds  # flips happen (8 images x 2 views)


@needs_dali
def test_each_sample_at_most_once_and_ranks_disjoint_with_equal_counts(tmp_path):
    shards = _shards(tmp_path, n=23, size=5)
    ranks = [build_dali_shard_loader(shards, RECIPE, 3, rank=r, world=2, seed=7) for r in (0, 1)]
    assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch == 3  # DALI's split: 11 and 12 samples
    for epoch in (0, 1):
        got = [_labels(_epoch(rk, epoch)) for rk in ranks]
        assert len(got[0]) == len(got[1]) == 9
        assert len(set(got[0])) == len(set(got[1])) == 9 and not set(got[0]) & set(got[1])
    assert build_dali_shard_loader(shards, RECIPE, 3, rank=2, world=3).batches_per_epoch == 2  # 7, 8, 8 samples


@needs_dali
def test_same_seed_and_epoch_give_identical_batches_and_epochs_differ(tmp_path):
    shards = _shards(tmp_path, n=14, size=4)
    a = _epoch(build_dali_shard_loader(shards, RECIPE, 2, seed=3, num_threads=1), 4)
    b = _epoch(build_dali_shard_loader(shards, RECIPE, 2, seed=3, num_threads=2), 4)
    assert _same(a, b)  # bit for bit, whatever the thread count
    other = _epoch(build_dali_shard_loader(shards, RECIPE, 2, seed=3), 5)
    assert _labels(other) != _labels(a) and sorted(_labels(other)) == sorted(_labels(a)) == list(range(14))


@needs_dali
def test_resume_at_every_batch_gives_the_rest_of_the_epoch_exactly(tmp_path):
    loader = build_dali_shard_loader(_shards(tmp_path, n=14, size=4), RECIPE, 2, seed=1)
    full = _epoch(loader, 3)
    assert len(full) == loader.batches_per_epoch == 7
    for k in range(1, len(full) + 1):
        rest = _epoch(loader, 3, k)
        assert len(rest) == len(loader) == len(full) - k and _same(full[k:], rest), k


@needs_dali
def test_missing_index_is_built_and_a_read_only_folder_uses_the_cache(tmp_path, monkeypatch):
    shards = _shards(tmp_path, n=8, size=4)
    first = _epoch(build_dali_shard_loader(shards, RECIPE, 2, seed=2))
    for u in shards.urls:
        index_path(u).unlink()
    assert _same(_epoch(build_dali_shard_loader(shards, RECIPE, 2, seed=2)), first)
    assert all(index_path(u).is_file() for u in shards.urls)  # rebuilt beside the tars

    for u in shards.urls:
        index_path(u).unlink()
    folder = Path(shards.urls[0]).parent
    mode = folder.stat().st_mode
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(folder, os.W_OK):  # root ignores the mode bits: refuse the write as the folder would
            def read_only(tar):
                raise PermissionError(13, "Permission denied", str(index_path(tar)))

            monkeypatch.setattr("msn_fast.dataloading.dali_shards.ensure_index", read_only)
        again = _epoch(build_dali_shard_loader(shards, RECIPE, 2, seed=2))
        assert not any(index_path(u).exists() for u in shards.urls)
    finally:
        folder.chmod(mode)
    assert _same(again, first)
    assert cache_dir() == tmp_path / "cache" / "msn_fast" / "wds-index"
    assert len(list(cache_dir().glob("*.idx"))) == len(shards.urls)


@needs_dali
def test_unreadable_members_are_warned_once_counted_and_the_epoch_completes(tmp_path, caplog):
    """Garbage bytes (sample 5) and a GIF, which DALI's decoder does not read (sample 9): each slot holds another
    sample of its tar, the epoch keeps its length, and a run that meets them later (a resume) gets the same."""
    shards = _shards(tmp_path, n=14, size=4, broken=(5,), gif=(9,))
    loader = build_dali_shard_loader(shards, RECIPE, 2, seed=4)
    with caplog.at_level(logging.WARNING):
        first = _epoch(loader, 0)
        second = _epoch(loader, 1)
    for batches in (first, second):
        labels = _labels(batches)
        assert len(batches) == 7 and 5 not in labels and 9 not in labels and len(set(labels)) == 12
        assert {labels.count(x) for x in labels} == {1, 2}  # two readable samples fill the two slots
    names = sorted(n.rsplit(":", 1)[1] for n in loader.unreadable)
    assert names == ["000000005.png", "000000009.gif"]
    assert "DALI's decoder does not read" in next(v for k, v in loader.unreadable.items() if k.endswith(".gif"))
    for name in names:
        assert len([r for r in caplog.records if name in r.getMessage()]) == 1
    fresh = build_dali_shard_loader(shards, RECIPE, 2, seed=4)
    assert _same(_epoch(fresh, 0, 4), first[4:]) and len(fresh.unreadable) == 2


@needs_dali
def test_data_errors_are_one_line(tmp_path):
    few = _shards(tmp_path / "few", n=5, size=3)
    with pytest.raises(DataError, match=r"^5 samples in 2 shard\(s\) are too few for batch size 4 on 2 process\(es\)"):
        build_dali_shard_loader(few, RECIPE, 4, world=2)
    bad = _shards(tmp_path / "bad", n=6, size=3, broken=range(6))
    with pytest.raises(DataError) as e:
        _epoch(build_dali_shard_loader(bad, RECIPE, 2))
    assert type(e.value) is DataError and str(e.value).startswith("all 3 samples of shard ")
    assert "\n" not in str(e.value)


@needs_dali
def test_views_agree_statistically_with_the_torch_shard_loader(tmp_path):
    """Per-channel mean and std of the normalised views over the same 48 JPEGs: within 4 standard errors of the
    difference plus 0.02 for the known small differences (crop rule, hue space, jitter order, blur), as
    tests/test_dali.py::test_dali_and_torch_agree_statistically."""
    shards = _shards(tmp_path, n=48, size=16, ext="jpg", hw=(40, 120), seed=2)
    recipe = ViewRecipe(global_size=32, focal_size=16, num_focal=4)
    stats = {}
    for name, loader in (("dali", build_dali_shard_loader(shards, recipe, 16, seed=0)),
                         ("torch", ShardLoader(shards, recipe, 16, seed=0, num_workers=0))):
        means, stds = [], []
        for batch in _epoch(loader):
            for views in (batch.globals, batch.focals):
                x = views.flatten(0, 1).flatten(2)  # [V*B, 3, pixels]
                means.append(x.mean(-1)), stds.append(x.std(-1))
        stats[name] = torch.cat(means).double(), torch.cat(stds).double()
    for i, what in enumerate(("mean", "std")):
        a, b = stats["dali"][i], stats["torch"][i]
        diff = (a.mean(0) - b.mean(0)).abs()
        se = (a.var(0) / len(a) + b.var(0) / len(b)).sqrt()
        assert (diff <= 4 * se + 0.02).all(), (what, diff, se)


def test_builds_say_what_to_do_without_dali(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` fail
    assert not dali_available()
    with pytest.raises(ImportError, match="backend=torch"):
        build_dali_shard_loader(ShardSet("x.tar", ["x.tar"], [8]), RECIPE, 4)
