"""Data sources and the torch multi-view loader, on images the tests generate."""

import numpy as np
import pytest
import torch
from PIL import Image

from msn_fast.dataloading import DataError, Digits, ImageFolder, ShardedSampler, ViewRecipe, build_loader, load_image

RECIPE = ViewRecipe(global_size=32, focal_size=16, num_focal=3)


def _write(path, arr, mode=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path, **kw)


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        for i in range(6):
            _write(tmp_path / c / f"{i}.jpg", rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8))
    return tmp_path


def test_loader_shapes_dtypes_ranges(folder):
    loader = build_loader(ImageFolder(folder), RECIPE, batch_size=4, num_workers=0)
    batch = next(iter(loader))
    assert batch.globals.shape == (2, 4, 3, 32, 32) and batch.focals.shape == (3, 4, 3, 16, 16)
    assert batch.globals.dtype == torch.float32 and batch.labels.tolist() != [-1] * 4
    # normalised with ImageNet statistics: values within (0 - 0.485)/0.229 .. (1 - 0.406)/0.225
    assert batch.globals.min() >= -2.2 and batch.globals.max() <= 2.7
    assert len(loader) == 3  # 12 images // 4


def test_seeded_and_independent_of_workers_and_resume(folder):
    src = ImageFolder(folder)
    a = build_loader(src, RECIPE, 4, num_workers=0, seed=3)
    b = build_loader(src, RECIPE, 4, num_workers=2, seed=3)
    a.set_position(1)
    b.set_position(1, batch=1)  # resumed part-way through epoch 1
    batches_a, batches_b = list(a), list(b)
    assert len(batches_b) == 2
    torch.testing.assert_close(batches_a[1].globals, batches_b[0].globals)
    torch.testing.assert_close(batches_a[2].focals, batches_b[1].focals)
    c = build_loader(src, RECIPE, 4, num_workers=0, seed=4)
    c.set_position(1)
    assert not torch.equal(next(iter(c)).globals, batches_a[0].globals)


def test_sharding_covers_each_image_once():
    n, world, bs = 103, 2, 5
    seen = []
    for rank in range(world):
        s = ShardedSampler(n, bs, rank, world, seed=1)
        s.set_position(2)
        seen += list(s)
    assert len(seen) == len(set(seen)) == world * ((n // world) // bs) * bs


def test_bad_file_zoo(tmp_path, caplog):
    rng = np.random.default_rng(1)
    good = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
    d = tmp_path / "a"
    _write(d / "good.jpg", good)
    _write(d / "grey.png", good[..., 0], mode="L")
    _write(d / "rgba.png", np.dstack([good, good[..., :1]]), mode="RGBA")
    Image.fromarray(good).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray((good[..., 0].astype(np.uint16) * 257)).save(d / "deep16.png")
    _write(d / "tiny.png", good[:2, :3])
    (d / "zero.jpg").write_bytes(b"")
    (d / "notes.txt").write_text("not an image")
    (d / "fake.jpg").write_text("not a jpeg either")
    _write(d / "trunc_src.jpg", good)
    data = (d / "trunc_src.jpg").read_bytes()
    (d / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty_class").mkdir()
    src = ImageFolder(tmp_path)
    names = {p.split("/")[-1]: i for i, (p, _) in enumerate(src.samples)}
    assert "notes.txt" not in names
    for ok in ("good.jpg", "grey.png", "rgba.png", "cmyk.jpg", "deep16.png", "tiny.png"):
        img, _ = src[names[ok]]
        assert img is not None and img.mode == "RGB", ok
    deep = np.asarray(src[names["deep16.png"]][0])
    assert deep.max() > 200  # 16-bit scaled to 8-bit, not clipped to white or black
    for bad in ("zero.jpg", "fake.jpg", "trunc.jpg"):
        assert src[names[bad]][0] is None, bad
    assert any("trunc.jpg" in r.message for r in caplog.records)
    loader = build_loader(src, ViewRecipe(global_size=8, focal_size=4, num_focal=1), batch_size=len(src),
                          num_workers=0)
    batch = next(iter(loader))
    assert batch.globals.shape[1] == len(src) and batch.skipped == 3
    assert torch.isfinite(batch.globals).all()


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "missing")
    with pytest.raises(DataError, match="no images found"):
        ImageFolder(tmp_path)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="no images found"):
        ImageFolder(tmp_path)


def test_unlabelled_flat_folder(tmp_path):
    _write(tmp_path / "a.png", np.zeros((9, 9, 3), np.uint8))
    src = ImageFolder(tmp_path)
    assert len(src) == 1 and src[0][1] == -1 and not src.labelled


def test_digits_split_is_disjoint_and_stratified():
    tr, te = Digits("train", 16), Digits("test", 16)
    assert len(tr) + len(te) == 1797 and len(te) == 500
    assert set(np.unique(te.labels())) == set(range(10))
    img, label = tr[0]
    assert img.size == (16, 16) and img.mode == "RGB" and 0 <= label < 10
    tr_hash = {im.tobytes() for im in tr.images}
    overlap = sum(im.tobytes() in tr_hash for im in te.images)
    assert overlap <= 5  # a few duplicated 8x8 digits exist in the original data


def test_load_image_missing_file_returns_none(tmp_path):
    assert load_image(str(tmp_path / "nope.jpg")) is None


# --- data errors are one DataError line; broken files are warned about and counted once ---------------------

def test_too_few_images_for_the_batch_is_one_line_data_error(folder):
    with pytest.raises(DataError) as e:
        ShardedSampler(5, 4, rank=0, world=2)
    msg = str(e.value)
    assert "\n" not in msg and "5 images" in msg and "batch size 4" in msg and "2 process" in msg
    assert "at most 2" in msg  # what to do
    with pytest.raises(DataError, match="12 images are too few for batch size 16 on 1 process"):
        build_loader(ImageFolder(folder), RECIPE, batch_size=16, num_workers=0)


def _broken_folder(root, n):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"{i:03d}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


@pytest.mark.parametrize("num_workers", [0, 2])
def test_folder_of_only_broken_files_is_one_data_error(tmp_path, num_workers):
    d = _broken_folder(tmp_path / "bad", 21)
    loader = build_loader(ImageFolder(d), RECIPE, batch_size=4, num_workers=num_workers)
    with pytest.raises(DataError) as e:
        next(iter(loader))
    assert type(e.value) is DataError  # not a worker's wrapped traceback
    msg = str(e.value)
    assert msg.startswith(f"all 21 images in {d} are unreadable") and "\n" not in msg, msg


def test_mostly_broken_large_folder_is_one_data_error(tmp_path):
    d = _broken_folder(tmp_path / "bad", 80)  # more files than replacement tries: checked lazily
    with pytest.raises(DataError) as e:
        next(iter(build_loader(ImageFolder(d), RECIPE, batch_size=4, num_workers=0)))
    msg = str(e.value)
    assert "all 64 images drawn at random to replace it are unreadable" in msg and "\n" not in msg, msg


def _mixed_folder(root, n_good, n_bad):
    rng = np.random.default_rng(2)
    for i in range(n_good):
        _write(root / "c" / f"{i:02d}.png", rng.integers(0, 255, (12, 12, 3), dtype=np.uint8))
    for i in range(n_bad):
        (root / "c" / f"{i:02d}_broken.jpg").write_bytes(b"")
    return root


@pytest.mark.parametrize("num_workers", [0, 2])
def test_broken_file_is_warned_once_and_counted_once_per_run(tmp_path, caplog, num_workers):
    src = ImageFolder(_mixed_folder(tmp_path / "d", 8, 2))
    loader = build_loader(src, RECIPE, batch_size=5, num_workers=num_workers)  # every file, every epoch
    skipped = 0
    with caplog.at_level("WARNING"):
        for epoch in range(3):
            loader.set_position(epoch)
            skipped += sum(b.skipped for b in loader)
    assert skipped == 6  # each batch still counts the slots it had to fill: 2 per epoch
    broken = [p for p, _ in src.samples if p.endswith("_broken.jpg")]
    for p in broken:
        named = [r for r in caplog.records if p in r.getMessage()]
        assert len(named) == 1 and "skipping unreadable image" in named[0].getMessage(), named
    assert sorted(src.samples[j][0] for j in loader.unreadable) == sorted(broken)  # the run's count: 2


class _Numbered(torch.utils.data.Dataset):
    """In-memory source: image j is a flat grey j, label j; the indices in `broken` give no image."""

    def __init__(self, n, broken):
        self.n, self.broken = n, set(broken)

    def __len__(self):
        return self.n

    def __getitem__(self, j):
        img = None if j in self.broken else Image.fromarray(np.full((8, 8, 3), j, np.uint8))
        return img, j


def test_replacement_is_drawn_at_random_and_the_same_for_any_worker_count():
    from msn_fast.dataloading.loader import replacements

    n, bad = 30, 7
    src = _Numbered(n, [bad])
    recipe = ViewRecipe(global_size=8, focal_size=4, num_focal=1)
    a = build_loader(src, recipe, batch_size=10, num_workers=0, seed=5)
    b = build_loader(src, recipe, batch_size=10, num_workers=2, seed=5)
    used = []
    for epoch in range(4):
        a.set_position(epoch)
        b.set_position(epoch)
        batches_a, batches_b = list(a), list(b)
        for x, y in zip(batches_a, batches_b):
            assert torch.equal(x.labels, y.labels) and torch.equal(x.globals, y.globals)
        order = a.sampler.indices()
        labels = torch.cat([x.labels for x in batches_a]).tolist()
        if bad in order:
            used.append(labels[order.index(bad)])
            assert used[-1] == replacements(n, bad, 5, epoch)[0]  # seeded by (seed, epoch, index)
    assert used and bad + 1 not in used  # not the alphabetical neighbour
    draws = [(i, replacements(n, i, 0, e)[0]) for i in range(n) for e in range(20)]
    assert sum(j == (i + 1) % n for i, j in draws) < 0.1 * len(draws)  # uniform over the others: about 1/29
    assert len(replacements(n, 3, 0, 0)) == n - 1 and 3 not in replacements(n, 3, 0, 0)
    assert len(replacements(10**6, 3, 0, 0)) == 64
