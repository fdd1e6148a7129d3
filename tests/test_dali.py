"""The DALI multi-view loader (CPU pipeline, device_id=None) on images the tests generate.

Skipped where nvidia.dali is not installed (`pip install -e .[dali]`), except the lazy-import test.
"""

import ast
import logging
import sys
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from msn_fast.dataloading import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Digits,
    ImageFolder,
    ShardedSampler,
    ViewRecipe,
    build_dali_loader,
    build_loader,
    dali_available,
)
from msn_fast.dataloading.dali import uniforms, view_params

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia.dali is not installed (pip install -e .[dali])")
SMALL = ViewRecipe(global_size=48, focal_size=24, num_focal=3)


def _field(rng, h, w):
    """A smooth random colour field (like a photo, unlike white noise, it survives resizing)."""
    base = rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC))


def _folder(root, n, rng, ext="jpg", classes=2, size=(40, 120)):
    for i in range(n):
        h, w = rng.integers(size[0], size[1], 2)
        d = root / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_field(rng, h, w)).save(d / f"{i:03d}.{ext}")
    return root


def _epoch(loader, epoch=0, start=0):
    loader.set_position(epoch, start)
    return list(loader)


@needs_dali
def test_shapes_dtypes_ranges_views(tmp_path):
    src = ImageFolder(_folder(tmp_path, 10, np.random.default_rng(0)))
    loader = build_dali_loader(src, SMALL, batch_size=4, num_workers=2, pin_memory=False)  # build_loader's keywords
    assert loader.batches_per_epoch == 2 and len(loader) == 2
    batches = _epoch(loader)
    assert len(batches) == 2
    b = batches[0]
    assert b.globals.shape == (2, 4, 3, 48, 48) and b.focals.shape == (3, 4, 3, 24, 24)
    assert b.globals.dtype == b.focals.dtype == torch.float32 and b.labels.dtype == torch.long
    assert b.globals.is_contiguous() and b.skipped == 0
    lo = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    hi = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    for x in (b.globals, b.focals):
        assert torch.isfinite(x).all() and lo - 1e-4 <= x.min() and x.max() <= hi + 1e-4
        assert x.std() > 0.1  # real content, not a constant
    assert set(b.labels.tolist()) <= {0, 1}
    assert not torch.equal(b.globals[0], b.globals[1])  # target and anchor are different views
    gone = weakref.ref(loader)
    del loader  # no reference cycle keeps the pipeline (and its threads) alive until a later gc: see _build
    assert gone() is None


def _pil_view(img: Image.Image, p, size: int) -> np.ndarray:
    """Reference for one view from its parameters: PIL crop/resize/flip/blur, numpy for the colour ops (DALI's
    formulas: contrast about the grey mean, hue and saturation as a rotation and scaling in YIQ space)."""
    (y0, xa), (y1, xb), jit, bright, contrast, colour, hue, sat, blur, sigma = p
    x0, x1 = min(xa, xb), max(xa, xb)
    out = img.crop((int(x0), int(y0), int(x1), int(y1))).resize((size, size), Image.BILINEAR)
    if xa > xb:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    x = np.asarray(out, np.float64)
    yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    if jit:
        m = (x @ yiq[0]).mean()
        x = np.clip(np.round(bright * (m + contrast * (x - m))), 0, 255)
    if colour:
        a = np.deg2rad(-hue)
        rot = np.array([[1, 0, 0], [0, sat * np.cos(a), -sat * np.sin(a)], [0, sat * np.sin(a), sat * np.cos(a)]])
        x = np.clip(np.round(x @ (np.linalg.inv(yiq) @ rot @ yiq).T), 0, 255)
    out = Image.fromarray(x.astype(np.uint8))
    if blur:
        out = out.filter(ImageFilter.GaussianBlur(float(sigma)))
    x = np.asarray(out, np.float32) / 255
    return ((x - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).transpose(2, 0, 1)


@needs_dali
def test_views_follow_their_parameters(tmp_path):
    """Each DALI view equals a PIL/numpy rendering of the same crop box, flip, jitter, grey and blur.

    Non-square images make a swapped x/y, a wrong flip or a wrong hue sign show; PNG keeps decoding exact.
    """
    src = ImageFolder(_folder(tmp_path, 8, np.random.default_rng(1), ext="png", size=(30, 140)))
    recipe = ViewRecipe(global_size=40, focal_size=20, num_focal=4)
    loader = build_dali_loader(src, recipe, batch_size=8, seed=5)
    batch = _epoch(loader, epoch=2)[0]
    sampler = ShardedSampler(len(src), 8, seed=5)
    sampler.set_position(2)
    keys = sampler.indices()
    imgs = [src[k][0] for k in keys]
    params = view_params(recipe, keys, np.array([im.size[::-1] for im in imgs]), 5, 2)
    errs, checked = [], set()
    for v, vp in enumerate(params):
        size = recipe.global_size if v < recipe.num_global else recipe.focal_size
        got = batch.globals[v] if v < recipe.num_global else batch.focals[v - recipe.num_global]
        for b, img in enumerate(imgs):
            p = [q[b] for q in vp]
            checked |= {k for k, on in zip(("jitter", "colour", "blur"), (p[2], p[5], p[8])) if on}
            checked |= {"flip"} if p[0][1] > p[1][1] else set()
            err = np.abs(got[b].numpy() - _pil_view(img, p, size)).mean() * 0.226 * 255  # in 8-bit levels
            errs.append(err)
    assert checked == {"jitter", "colour", "blur", "flip"}
    # resampling, blur borders and rounding differ by a few levels at most; a wrong box or flip costs ~40
    assert np.median(errs) < 2.5 and max(errs) < 8, (np.median(errs), max(errs))


@needs_dali
def test_dali_and_torch_agree_statistically(tmp_path):
    """Per-channel mean and std of the normalised views (official 12-view recipe) over the same 64 images.

    The two loaders draw different random numbers, so their statistics differ by sampling noise: the tolerance is
    4 standard errors of the difference (from the spread of per-view means; measured |diff| was 1.3-1.9 SE),
    plus 0.02 for the known small
    differences (YIQ vs HSV hue, fixed jitter order, PIL's box-approximated blur).
    """
    src = ImageFolder(_folder(tmp_path, 64, np.random.default_rng(2), size=(120, 400)))
    recipe = ViewRecipe()
    stats = {}
    for name, loader in (("dali", build_dali_loader(src, recipe, 32, seed=0)),
                         ("torch", build_loader(src, recipe, 32, seed=0, num_workers=2))):
        per_view_mean, per_view_std = [], []
        for batch in _epoch(loader):
            for views in (batch.globals, batch.focals):
                x = views.flatten(0, 1).flatten(2)  # [V*B, 3, pixels]
                per_view_mean.append(x.mean(-1)), per_view_std.append(x.std(-1))
        stats[name] = torch.cat(per_view_mean).double(), torch.cat(per_view_std).double()
    for i, what in enumerate(("mean", "std")):
        a, b = stats["dali"][i], stats["torch"][i]
        diff = (a.mean(0) - b.mean(0)).abs()
        se = (a.var(0) / len(a) + b.var(0) / len(b)).sqrt()
        assert (diff <= 4 * se + 0.02).all(), (what, diff, se)


@needs_dali
def test_sharding_two_ranks_cover_the_dataset_once_in_the_torch_order(tmp_path):
    rng = np.random.default_rng(3)
    n, bs = 23, 3
    for i in range(n):  # one class per image: the labels name the images
        (tmp_path / f"k{i:02d}").mkdir()
        Image.fromarray(_field(rng, 20, 30)).save(tmp_path / f"k{i:02d}" / "a.jpg")
    src = ImageFolder(tmp_path)
    seen = []
    for rank in range(2):
        dali = build_dali_loader(src, SMALL, bs, rank=rank, world=2, seed=7)
        torch_ = build_loader(src, SMALL, bs, rank=rank, world=2, seed=7, num_workers=0)
        labels = [b.labels for b in _epoch(dali, epoch=3)]
        assert len(labels) == dali.batches_per_epoch == torch_.batches_per_epoch == (n // 2) // bs
        assert torch.equal(torch.cat(labels), torch.cat([b.labels for b in _epoch(torch_, epoch=3)]))
        seen += torch.cat(labels).tolist()
    assert len(seen) == len(set(seen)) == 2 * ((n // 2) // bs) * bs


@needs_dali
def test_deterministic_and_resumable(tmp_path):
    src = ImageFolder(_folder(tmp_path, 12, np.random.default_rng(4)))
    full = _epoch(build_dali_loader(src, SMALL, 4, seed=3, num_threads=2), epoch=1)
    again = _epoch(build_dali_loader(src, SMALL, 4, seed=3, num_threads=1), epoch=1)
    resumed = _epoch(build_dali_loader(src, SMALL, 4, seed=3), epoch=1, start=1)
    assert len(full) == 3 and len(resumed) == 2
    for a, b in zip(full, again):  # same seed: bit-identical, whatever the thread count
        assert torch.equal(a.globals, b.globals) and torch.equal(a.focals, b.focals)
    for a, b in zip(full[1:], resumed):
        assert torch.equal(a.globals, b.globals) and torch.equal(a.focals, b.focals)
        assert torch.equal(a.labels, b.labels)
    other = _epoch(build_dali_loader(src, SMALL, 4, seed=4), epoch=1)[0]
    assert not torch.equal(other.globals, full[0].globals)
    loader = build_dali_loader(src, SMALL, 4, seed=3)
    assert not torch.equal(_epoch(loader, epoch=2)[0].globals, full[0].globals)  # a new epoch, new views
    assert torch.equal(_epoch(loader, epoch=1)[0].globals, full[0].globals)  # same loader, re-iterated


@needs_dali
def test_bad_file_zoo(tmp_path, caplog):
    rng = np.random.default_rng(5)
    good = _field(rng, 30, 40)
    d = tmp_path / "a"
    d.mkdir()
    Image.fromarray(good).save(d / "good.jpg")
    Image.fromarray(good[..., 0]).save(d / "grey.png")
    Image.fromarray(good[..., 0]).save(d / "grey.jpg")
    Image.fromarray(np.dstack([good, good[..., :1]]), "RGBA").save(d / "rgba.png")
    Image.fromarray(good).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray(good[..., 0].astype(np.uint16) * 257).save(d / "deep16.png")
    Image.fromarray(good[:2, :3]).save(d / "tiny.png")
    Image.fromarray(good[:1, :1]).save(d / "pixel.jpg")
    (d / "zero.jpg").write_bytes(b"")
    (d / "notes.txt").write_text("not an image")
    (d / "fake.jpg").write_text("not a jpeg either")
    jpg = (d / "good.jpg").read_bytes()
    (d / "trunc.jpg").write_bytes(jpg[: len(jpg) // 2])
    (d / "badhuff.jpg").write_bytes(_bogus_huffman(jpg))
    Image.fromarray(good).save(d / "still.gif")
    (tmp_path / "empty_class").mkdir()
    src = ImageFolder(tmp_path)
    n = len(src)
    recipe = ViewRecipe(global_size=16, focal_size=8, num_focal=1)
    loader = build_dali_loader(src, recipe, batch_size=n)
    with caplog.at_level(logging.WARNING):
        first = _epoch(loader)
    assert len(first) == 1
    batch = first[0]
    assert batch.globals.shape[1] == n and batch.skipped == 4  # zero, fake, trunc, badhuff: replaced by successors
    assert torch.isfinite(batch.globals).all() and torch.isfinite(batch.focals).all()
    for bad in ("zero.jpg", "fake.jpg", "trunc.jpg", "badhuff.jpg"):
        assert any(bad in r.getMessage() for r in caplog.records), bad
    route = {p.split("/")[-1]: int(loader.route[i]) for i, (p, _) in enumerate(src.samples)}
    assert route["good.jpg"] == route["grey.png"] == route["grey.jpg"] == route["pixel.jpg"] == 0  # DALI decodes
    assert route["cmyk.jpg"] == route["rgba.png"] == route["deep16.png"] == route["still.gif"] == 1  # PIL
    assert route["zero.jpg"] == route["fake.jpg"] == route["trunc.jpg"] == route["badhuff.jpg"] == 2  # skipped
    again = _epoch(loader)[0]  # routes now known up front: the recovered epoch was not perturbed
    assert torch.equal(again.globals, batch.globals) and again.skipped == 4


def _bogus_huffman(jpg: bytes) -> bytes:
    """A JPEG whose header parses (size, mode) but whose Huffman table is garbage: every decoder fails."""
    k = jpg.index(b"\xff\xc4")
    return jpg[:k + 5] + bytes(b ^ 0x5A for b in jpg[k + 5:k + 13]) + jpg[k + 13:]


@needs_dali
def test_recovers_when_dali_decoder_fails_mid_epoch(tmp_path, monkeypatch, caplog):
    """With the header check defeated, broken files and a GIF reach DALI's decoder, which raises: the loader
    finds the culprits, skips or re-routes them, rebuilds and re-runs the batch; nothing else changes."""
    import msn_fast.dataloading.dali as dali_mod

    real = dali_mod._fast_path

    def believe_everything(data):
        try:
            return True, real(data)[1]
        except Exception:
            return True, (8, 8)

    monkeypatch.setattr(dali_mod, "_fast_path", believe_everything)
    rng = np.random.default_rng(8)
    _folder(tmp_path, 9, rng, classes=1)
    good = _field(rng, 30, 40)
    Image.fromarray(good).save(tmp_path / "c0" / "still.gif")
    (tmp_path / "c0" / "zero.jpg").write_bytes(b"")
    jpg = (tmp_path / "c0" / "000.jpg").read_bytes()
    (tmp_path / "c0" / "trunc.jpg").write_bytes(jpg[: len(jpg) // 2])
    (tmp_path / "c0" / "badhuff.jpg").write_bytes(_bogus_huffman(jpg))
    src = ImageFolder(tmp_path)
    loader = build_dali_loader(src, SMALL, batch_size=4, seed=2)
    with caplog.at_level(logging.WARNING):
        first = _epoch(loader)
    assert len(first) == 3 and sum(b.skipped for b in first) >= 1
    route = {p.split("/")[-1]: int(loader.route[i]) for i, (p, _) in enumerate(src.samples)}
    assert route["still.gif"] == 1 and any("still.gif" in r.getMessage() for r in caplog.records)
    visited = {src.samples[i][0].split("/")[-1] for i in loader.sampler.indices()}  # drop_last leaves one out
    for bad in ("zero.jpg", "trunc.jpg", "badhuff.jpg"):
        assert route[bad] == 2 or (route[bad] == -1 and bad not in visited), bad
    second = _epoch(loader)
    for a, b in zip(first, second):
        assert torch.equal(a.globals, b.globals) and torch.equal(a.focals, b.focals) and a.skipped == b.skipped


@needs_dali
def test_odd_modes_come_out_as_the_torch_loader_sees_them(tmp_path):
    """16-bit, alpha and CMYK go through load_image: with crops covering the image the views match PIL's."""
    rng = np.random.default_rng(6)
    good = _field(rng, 32, 32)
    Image.fromarray(good[..., 0].astype(np.uint16) * 257).save(tmp_path / "deep16.png")
    Image.fromarray(np.dstack([good, good[..., :1]]), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(good[..., 0]).save(tmp_path / "grey.png")
    src = ImageFolder(tmp_path)
    recipe = ViewRecipe(global_size=32, focal_size=8, num_focal=0, global_scale=(1.0, 1.0), color_jitter=0.0,
                        blur_prob=0.0)
    batch = _epoch(build_dali_loader(src, recipe, 3, seed=1))[0]
    sampler = ShardedSampler(3, 3, seed=1)
    sampler.set_position(0)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    for b, k in enumerate(sampler.indices()):
        img = src[k][0]  # load_image: what the torch loader sees
        ref, grey = (torch.from_numpy(np.asarray(im.convert("RGB"), np.float32) / 255).permute(2, 0, 1)
                     for im in (img, img.convert("L")))
        got = batch.globals[0, b] * std + mean
        # a whole-image crop, maybe flipped and/or greyed (p 0.2): within one 8-bit level of one of those
        assert any(torch.allclose(got, c, atol=1 / 255 + 1e-4) for c in (ref, ref.flip(-1), grey, grey.flip(-1))), k


@needs_dali
def test_in_memory_digits():
    src = Digits("test", size=16)
    loader = build_dali_loader(src, SMALL, 50, seed=0)
    batches = _epoch(loader)
    assert len(batches) == 10 and batches[0].globals.shape == (2, 50, 3, 48, 48)
    sampler = ShardedSampler(len(src), 50, seed=0)
    sampler.set_position(0)
    assert torch.cat([b.labels for b in batches]).tolist() == [int(src.labels()[i]) for i in sampler.indices()]


def test_importing_dataloading_does_not_need_dali(monkeypatch):
    """No module of the package imports nvidia.dali at import time; without it the DALI loader says what to do."""
    import msn_fast.dataloading as pkg

    for path in Path(pkg.__file__).parent.glob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only: lazy imports inside functions are fine
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith("nvidia") for n in names), (path.name, names)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` fail
    assert not dali_available()
    with pytest.raises(ImportError, match="backend=torch"):
        build_dali_loader([(None, 0)] * 8, ViewRecipe(), 4)


@needs_dali
def test_a_failure_that_is_not_a_file_stops_with_the_batch_named():
    class Flaky(Sequence):  # an in-memory source whose 6th item raises
        def __len__(self):
            return 12

        def __getitem__(self, i):
            if i == 5:
                raise ValueError("sensor offline")
            return Image.fromarray(np.full((10, 10, 3), 20 * i, np.uint8)), i

    loader = build_dali_loader(Flaky(), SMALL, 4, seed=0)
    with pytest.raises(RuntimeError, match=r"DALI pipeline failed at batch \d of epoch 0.*sensor offline"):
        _epoch(loader)


@pytest.mark.parametrize("hw", [(120, 160), (60, 400)])  # the second is wider than 4/3: torchvision's fallback
def test_view_params_follow_torchvision_distributions(hw):
    """The random numbers the DALI graph consumes (pure numpy, no DALI needed): crop boxes distributed like
    torchvision's RandomResizedCrop.get_params, and the official probabilities and ranges of every other choice."""
    from torchvision.transforms import v2

    recipe = ViewRecipe()
    n = 1500
    assert np.array_equal(uniforms(1, 2, [5, 9], 8)[1], uniforms(1, 2, [9], 8)[0])  # per sample, not per batch
    assert not np.array_equal(uniforms(1, 2, [9], 8), uniforms(1, 3, [9], 8))
    params = view_params(recipe, list(range(n)), np.tile(hw, (n, 1)), seed=0, epoch=0)
    h, w = hw
    for v, scale in ((0, recipe.global_scale), (recipe.num_global, recipe.focal_scale)):
        start, end, jit, bright, contrast, colour, hue, sat, blur, sigma = params[v]
        ch, cw = end[:, 0] - start[:, 0], np.abs(end[:, 1] - start[:, 1])
        x0 = np.minimum(start[:, 1], end[:, 1])
        ref = np.array([v2.RandomResizedCrop.get_params(torch.empty(3, h, w), list(scale), [3 / 4, 4 / 3])
                        for _ in range(n)], np.float64)  # (top, left, height, width)
        for ours, theirs in ((ch * cw / (h * w), ref[:, 2] * ref[:, 3] / (h * w)), (np.log(cw / ch),
                             np.log(ref[:, 3] / ref[:, 2])), (start[:, 0] + ch / 2, ref[:, 0] + ref[:, 2] / 2),
                             (x0 + cw / 2, ref[:, 1] + ref[:, 3] / 2)):
            se = np.sqrt(ours.var() / n + theirs.var() / n)
            assert abs(ours.mean() - theirs.mean()) < 4 * se + 1e-5, (hw, v)  # + float32 rounding
        assert (start[:, 0] >= 0).all() and (end[:, 0] <= h).all() and (np.maximum(start[:, 1], end[:, 1]) <= w).all()
        for frac, p in (((start[:, 1] > end[:, 1]).mean(), 0.5), (jit.mean(), 0.8), (blur.mean(), 0.5),
                        ((sat == 0).mean(), 0.2)):  # grey: saturation 0 (jitter factors are >= 0.6)
            assert abs(frac - p) < 4 * np.sqrt(p * (1 - p) / n), (frac, p)
        assert ((0.6 <= bright) & (bright <= 1.4)).all() and ((0.6 <= contrast) & (contrast <= 1.4)).all()
        assert np.abs(hue).max() <= 36 and np.abs(hue[jit]).max() > 30 and (hue[~jit] == 0).all()  # degrees
        assert (colour == (jit | (sat == 0))).all() and (0.1 <= sigma).all() and (sigma <= 2).all()


@needs_dali
def test_data_errors_are_one_data_error_line(tmp_path):
    from msn_fast.dataloading import DataError

    src = ImageFolder(_folder(tmp_path / "few", 5, np.random.default_rng(9)))
    with pytest.raises(DataError, match=r"^5 images are too few for batch size 4 on 2 process\(es\)"):
        build_dali_loader(src, SMALL, 4, world=2)
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(21):
        (bad / f"{i:02d}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(DataError) as e:
        _epoch(build_dali_loader(ImageFolder(bad), SMALL, 4))
    assert type(e.value) is DataError and str(e.value).startswith(f"all 21 images in {bad} are unreadable")
    assert "\n" not in str(e.value)


@needs_dali
def test_broken_files_warned_once_counted_once_replaced_as_the_torch_loader_does(tmp_path, caplog):
    root = _folder(tmp_path, 12, np.random.default_rng(10), classes=3)
    (root / "c0" / "zero.jpg").write_bytes(b"")
    (root / "c1" / "fake.jpg").write_text("not a jpeg")
    src = ImageFolder(root)
    dali, torch_loader = build_dali_loader(src, SMALL, 7, seed=1), build_loader(src, SMALL, 7, seed=1, num_workers=0)
    with caplog.at_level(logging.WARNING):
        for epoch in range(3):  # 14 images, 2 batches of 7: every file in every epoch
            ours, theirs = _epoch(dali, epoch), _epoch(torch_loader, epoch)
            for a, b in zip(ours, theirs):  # the same replacement image (and so label) in each slot
                assert torch.equal(a.labels, b.labels) and a.skipped == b.skipped and a.broken.keys() == b.broken.keys()
            assert sum(b.skipped for b in ours) == 2
    for name in ("zero.jpg", "fake.jpg"):
        named = [r for r in caplog.records if r.name.endswith("dali") and name in r.getMessage()]
        assert len(named) == 1, named
    assert sorted(src.samples[j][0].split("/")[-1] for j in dali.unreadable) == ["fake.jpg", "zero.jpg"]
