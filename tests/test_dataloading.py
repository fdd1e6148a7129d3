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
