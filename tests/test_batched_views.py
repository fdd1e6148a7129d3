"""The batched tensor augmentation (dataloading/batched_views.py) against the per-image torchvision pipeline:
crop geometry and flips on a coordinate image, colour, grey and blur statistics on smooth random images (fixed
seeds), determinism per sample, and the torch loader with `augment="batched"` (workers, resume)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from msn_fast.dataloading import ImageFolder, MultiViewTransform, ViewRecipe, build_loader
from msn_fast.dataloading.batched_views import _views, batched_views
from msn_fast.dataloading.loader import MultiViewDataset
from msn_fast.dataloading.params import view_params
from msn_fast.dataloading.sources import fit_short_side, read_image

H, W, S = 48, 64, 32


def _ramp() -> torch.Tensor:
    """[1, 3, H, W]: channel 0 = x, channel 1 = y, both as fractions of the image (pixel centres)."""
    x = (torch.arange(W, dtype=torch.float64) + 0.5) / W
    y = (torch.arange(H, dtype=torch.float64) + 0.5) / H
    z = torch.full((H, W), 0.5, dtype=torch.float64)
    return torch.stack([x[None].expand(H, W), y[:, None].expand(H, W), z])[None]


def _geometry(views: torch.Tensor) -> dict[str, np.ndarray]:
    """Crop area fraction, log aspect ratio and flip of each view [N, 3, S, S] of the ramp, from its edge pixels."""
    xl, xr = views[:, 0, :, 0].mean(1), views[:, 0, :, -1].mean(1)
    yt, yb = views[:, 1, 0, :].mean(1), views[:, 1, -1, :].mean(1)
    w = (xr - xl).abs() * S / (S - 1)  # centre of the first to centre of the last output pixel: (S-1)/S of the box
    h = (yb - yt) * S / (S - 1)
    return {"area": (w * h).numpy(), "log_aspect": torch.log((w * W) / (h * H)).numpy(), "flip": (xr < xl).numpy()}


def test_crop_geometry_and_flips_follow_torchvision():
    n, recipe = 3000, ViewRecipe(global_size=S, num_focal=0, global_scale=(0.3, 1.0))
    params = view_params(recipe, list(range(n)), np.tile([H, W], (n, 1)), seed=0, epoch=0)
    for p in params:  # geometry only: no jitter, grey or blur
        p[2][:], p[5][:], p[8][:] = False, False, False
    ramp = _ramp()
    # one image, n boxes: index the ramp n times through the batch (the boxes carry the batch index)
    ours = _views(ramp.float().expand(n, -1, -1, -1).contiguous(), [params[0]], range(1), S)[0].double()
    ours = ours * torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64)[None, :, None, None] + \
        torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)[None, :, None, None]  # undo the normalisation
    torch.manual_seed(0)
    tv = v2.Compose([v2.RandomResizedCrop(S, scale=(0.3, 1.0), antialias=True), v2.RandomHorizontalFlip(0.5)])
    ref = torch.stack([tv(ramp[0]) for _ in range(n)])
    a, b = _geometry(ours), _geometry(ref)
    for k in ("area", "log_aspect"):
        se = np.sqrt(a[k].var() / n + b[k].var() / n)
        assert abs(a[k].mean() - b[k].mean()) < 4 * se + 0.01, (k, a[k].mean(), b[k].mean())
        assert abs(a[k].std() - b[k].std()) < 0.1 * b[k].std() + 0.01, (k, a[k].std(), b[k].std())
    assert 0.3 - 0.02 < a["area"].min() and a["area"].max() < 1.02
    assert abs(a["flip"].mean() - 0.5) < 0.04 and abs(b["flip"].mean() - 0.5) < 0.04


def _smooth_images(n: int, seed: int = 0) -> list[Image.Image]:
    """Photograph-like test images of different sizes: colour noise upsampled, smooth (4x4) and detailed (16x16)
    in turn, so that blur has something to remove."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        base = torch.rand(1, 3, *((4, 4) if i % 2 else (16, 16)), generator=g)
        img = F.interpolate(base, size=(40 + 8 * (i % 3), 48), mode="bicubic", align_corners=False)[0].clamp(0, 1)
        out.append(Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)))
    return out


def _stats(g: torch.Tensor) -> dict[str, float]:
    """Statistics of views [N, 3, S, S] (normalised): per-channel means, overall std, grey fraction, sharpness."""
    spread = (g.max(1).values - g.min(1).values).flatten(1).amax(1)
    m = torch.tensor([0.485, 0.456, 0.406])[None, :, None, None]
    s = torch.tensor([0.229, 0.224, 0.225])[None, :, None, None]
    x = g * s + m  # back to [0, 1]
    grey = ((x.max(1).values - x.min(1).values).flatten(1).amax(1) < 0.02).float().mean()
    return {**{f"mean{c}": float(g[:, c].mean()) for c in range(3)}, "std": float(g.std()), "grey": float(grey),
            "grad": float((x[..., 1:] - x[..., :-1]).abs().mean()), "spread": float(spread.mean())}


def test_colour_grey_and_blur_statistics_match_the_per_image_pipeline():
    recipe = ViewRecipe(global_size=24, num_focal=0, global_scale=(0.3, 1.0), color_jitter=0.5, blur_prob=0.5)
    imgs = _smooth_images(60)
    reps = 10
    tf = MultiViewTransform(recipe)
    torch.manual_seed(0)
    ref = torch.cat([torch.stack([tf(im)[0][0] for im in imgs]) for _ in range(reps)])
    px = [torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in imgs]
    ours = torch.cat([batched_views(px, recipe, range(r * 60, (r + 1) * 60), 0, 0)[0][0] for r in range(reps)])
    a, b = _stats(ours), _stats(ref)
    for c in range(3):
        assert abs(a[f"mean{c}"] - b[f"mean{c}"]) < 0.05, (c, a, b)  # measured: 0.034 at most
    assert abs(a["std"] - b["std"]) < 0.06 * b["std"], (a, b)
    assert abs(a["grey"] - 0.2) < 0.05 and abs(b["grey"] - 0.2) < 0.05, (a, b)
    assert abs(a["grad"] - b["grad"]) < 0.15 * b["grad"], (a, b)
    # and each effect is really there: without blur the views are sharper, without jitter less spread in colour
    sharp = ViewRecipe(global_size=24, num_focal=0, global_scale=(0.3, 1.0), color_jitter=0.5, blur_prob=0.0)
    plain = torch.cat([batched_views(px, sharp, range(r * 60, (r + 1) * 60), 0, 0)[0][0] for r in range(reps)])
    assert _stats(plain)["grad"] > 1.2 * a["grad"]


def test_a_sample_depends_on_its_key_only():
    recipe = ViewRecipe(global_size=16, focal_size=8, num_focal=3)
    px = [torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in _smooth_images(5, 1)]
    g, f = batched_views(px, recipe, [10, 11, 12, 13, 14], seed=3, epoch=2)
    assert g.shape == (2, 5, 3, 16, 16) and f.shape == (3, 5, 3, 8, 8) and g.dtype == torch.float32
    g1, f1 = batched_views([px[2]], recipe, [12], seed=3, epoch=2)  # alone, in a batch of other sizes before
    torch.testing.assert_close(g1[:, 0], g[:, 2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f1[:, 0], f[:, 2], rtol=1e-5, atol=1e-5)
    g2, _ = batched_views(px, recipe, [10, 11, 12, 13, 14], seed=3, epoch=2)
    assert torch.equal(g, g2)
    g3, _ = batched_views(px, recipe, [10, 11, 12, 13, 14], seed=3, epoch=3)
    assert not torch.allclose(g, g3)


def _folder(tmp_path, n=12):
    for i, im in enumerate(_smooth_images(n, 2)):
        d = tmp_path / f"c{i % 3}"
        d.mkdir(exist_ok=True)
        im.save(d / f"{i}.png")
    return ImageFolder(tmp_path)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_with_batched_augmentation_resumes_exactly_for_any_workers(tmp_path, workers):
    src = _folder(tmp_path)
    recipe = ViewRecipe(global_size=16, focal_size=8, num_focal=2)
    loader = build_loader(src, recipe, 4, num_workers=workers, seed=1, augment="batched")
    loader.set_position(2, 0)
    full = list(loader)
    assert len(full) == 3 and full[0].globals.shape == (2, 4, 3, 16, 16) and full[0].focals.shape == (2, 4, 3, 8, 8)
    alone = build_loader(src, recipe, 4, num_workers=0, seed=1, augment="batched")
    alone.set_position(2, 1)
    rest = list(alone)
    for a, b in zip(full[1:], rest):  # another worker count, resumed at batch 1: the same batches
        assert torch.equal(a.labels, b.labels)
        torch.testing.assert_close(a.globals, b.globals, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.focals, b.focals, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="augment='gpu'"):
        build_loader(src, recipe, 4, augment="gpu")


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth w x h colour picture (noise upsampled bicubically), like a photograph at a JPEG's scale."""
    base = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(seed))
    img = F.interpolate(base, size=(h, w), mode="bicubic", align_corners=False)[0].clamp(0, 1)
    return Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_then_fit_to_twice_the_largest_view(tmp_path):
    (tmp_path / "c").mkdir()
    _photo(640, 480).save(tmp_path / "c" / "big.jpg", quality=95)
    _photo(200, 150, seed=1).save(tmp_path / "c" / "big.png")
    _photo(40, 30, seed=2).save(tmp_path / "c" / "small.jpg", quality=95)
    big = str(tmp_path / "c" / "big.jpg")
    full, part = read_image(big), read_image(big, min_size=64)
    assert full.size == (640, 480) and part.size == (160, 120)  # DCT scaling 1/4: the largest keeping 64 a side
    ref = np.asarray(full.resize(part.size, Image.BOX), np.float64)
    # the same picture, to JPEG's rounding: mean difference a few levels of 255 (another picture: tens)
    assert np.abs(np.asarray(part, np.float64) - ref).mean() < 4.0
    assert read_image(str(tmp_path / "c" / "big.png"), min_size=64).size == (200, 150)  # not a JPEG: whole

    src = ImageFolder(tmp_path)  # sorted: big.jpg, big.png, small.jpg
    ds = MultiViewDataset(src, ViewRecipe(global_size=32, focal_size=16), decode_only=True)
    shapes = [tuple(ds[i][0].shape) for i in range(3)]
    assert shapes == [(3, 64, 85), (3, 64, 85), (3, 30, 40)]  # short side 2 x 32, aspect kept; small unchanged
    fit = fit_short_side(full, 64)
    assert fit.size == (85, 64) and fit_short_side(part, 200) is part
    ref = np.asarray(fit, np.float64).transpose(2, 0, 1)
    assert np.abs(ds[0][0].numpy().astype(np.float64) - ref).mean() < 4.0


def test_decoding_at_a_reduced_scale_only_for_the_batched_views_and_only_where_the_source_takes_it(tmp_path):
    class Recording:  # a source with `load` and the min_size keyword, recording what it was asked
        def __init__(self, img):
            self.img, self.asked = img, []

        def __len__(self):
            return 4

        def load(self, i, min_size=None):
            self.asked.append(min_size)
            return self.img, 0, None

    class Plain(Recording):  # `load(i)` alone, as a user's source may have it
        def load(self, i):
            return self.img, 0, None

    recipe = ViewRecipe(global_size=16, focal_size=8, num_focal=2)
    img = _photo(120, 90)
    batched, per_image = Recording(img), Recording(img)
    assert MultiViewDataset(batched, recipe, decode_only=True)[0][0].shape == (3, 32, 43)
    MultiViewDataset(per_image, recipe)[0]  # the per-image views crop the whole image
    assert batched.asked == [32] and per_image.asked == [None]
    assert MultiViewDataset(Plain(img), recipe, decode_only=True)[0][0].shape == (3, 32, 43)


class _Counting(ImageFolder):
    """An ImageFolder that counts its decodes by index."""

    def __init__(self, root):
        super().__init__(root)
        self.decoded: dict[int, int] = {}

    def load(self, i, min_size=None):
        self.decoded[i] = self.decoded.get(i, 0) + 1
        return super().load(i, min_size)


def test_the_decoded_cache_decodes_each_image_once_and_changes_no_batch(tmp_path):
    root = _folder(tmp_path)  # 12 images
    for i, (w, h) in enumerate([(90, 70), (33, 61)]):  # larger than twice the views, and of other shapes
        _photo(w, h, seed=10 + i).save(root.root / "c1" / f"odd{i}.jpg", quality=90)
    (root.root / "c0" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    recipe = ViewRecipe(global_size=16, focal_size=8, num_focal=2)
    plain, cached = _Counting(root.root), _Counting(root.root)
    n = len(plain)
    a = build_loader(plain, recipe, 3, num_workers=0, seed=5, augment="batched", cache_mb=0)
    b = build_loader(cached, recipe, 3, num_workers=0, seed=5, augment="batched", cache_mb=64)
    assert a.dataset.cache is None and b.dataset.cache is not None
    for epoch in range(3):
        a.set_position(epoch)
        b.set_position(epoch)
        for x, y in zip(a, b, strict=True):  # exactly the same computation on the same decoded pixels
            assert torch.equal(x.globals, y.globals) and torch.equal(x.focals, y.focals)
            assert torch.equal(x.labels, y.labels) and x.skipped == y.skipped
    broken = next(j for j, (p, _) in enumerate(cached.samples) if p.endswith("broken.jpg"))
    assert cached.decoded == {j: 1 for j in range(n)}  # the broken one too: known after its first try
    assert all(plain.decoded[j] >= 3 for j in range(n) if j != broken)  # without: every epoch (or more: as a
    assert plain.decoded[broken] == 1  # replacement for the broken one, which is known after its first try)
    assert len(b.dataset.cache.items) == n - 1 and set(b.unreadable) == {broken}


def test_the_decoded_cache_stays_within_its_budget_and_workers_keep_none(tmp_path, caplog):
    root = _folder(tmp_path)
    recipe = ViewRecipe(global_size=16, focal_size=8, num_focal=2)
    ds = MultiViewDataset(root, recipe, decode_only=True)
    largest = max(ds[i][0].numel() for i in range(len(root)))  # uint8: bytes
    budget_mb = 4.5 * (largest + 128) / 2**20  # room for 4 of the largest and a half: 4 to 5 images
    src = _Counting(root.root)
    loader = build_loader(src, recipe, 4, num_workers=0, seed=1, augment="batched", cache_mb=budget_mb)
    with caplog.at_level("INFO", logger="msn_fast.dataloading.loader"):
        for epoch in range(2):
            loader.set_position(epoch)
            list(loader)
    cache = loader.dataset.cache
    told = [r.getMessage() for r in caplog.records if "kept in memory" in r.getMessage()]
    assert len(told) == 1 and f": {len(cache.items)} of 12," in told[0] and "full at" in told[0], told
    assert 4 <= len(cache.items) <= 5 and cache.full and cache.bytes <= budget_mb * 2**20
    assert all(src.decoded[j] == (1 if j in cache.items else 2) for j in range(len(src)))  # the rest: each epoch
    assert build_loader(src, recipe, 4, num_workers=2, augment="batched", cache_mb=64).dataset.cache is None
    assert build_loader(src, recipe, 4, num_workers=0, augment="per_image", cache_mb=64).dataset.cache is None
    with pytest.raises(ValueError, match="cache_mb=-1"):
        build_loader(src, recipe, 4, augment="batched", cache_mb=-1)
