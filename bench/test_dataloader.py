"""Benchmark: the DALI multi-view loader vs the torch fallback, source images per second, full 12-view recipe.

Official MSN recipe (1 target + 1 anchor at 224 px, 10 focal views at 96 px, all augmentations), batch 32, one
epoch per round, both on the same cores: DALI with num_threads=2 (CPU pipeline, device_id=None, or `mixed`
decoding on GPU 0 when CUDA and DALI are there) and the torch loader with num_workers=2. Data: MSN_BENCH_IMAGES
(default 192) files of ../shared/data/caltech101/train.txt, evenly spaced through it (so over the classes:
variable-size real JPEGs), or as many generated JPEGs of similar sizes when that folder is absent. Each epoch
includes what it costs in a run: the torch loader starts its workers, DALI reuses its pipeline (the first round
builds it). The two run interleaved epochs (bench/conftest.py `Timer.paired`) so that both see the same load;
extra_info and the end-of-run table have images/s, crops/s and the DALI/torch ratio (goal: >= 1.5 on CPU).
Run: pytest bench/test_dataloader.py --benchmark-only
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from msn_fast.dataloading import ImageFolder, ViewRecipe, build_dali_loader, build_loader, dali_available

CALTECH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "caltech101"
N_IMAGES = int(os.environ.get("MSN_BENCH_IMAGES", "192"))
BATCH, CORES = 32, 2
RECIPE = ViewRecipe()  # 2 x 224 + 10 x 96


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    if (CALTECH / "train.txt").is_file():
        lines = (CALTECH / "train.txt").read_text().split()
        files = lines[:: max(1, len(lines) // N_IMAGES)][:N_IMAGES]
        return ImageFolder(CALTECH / "101_ObjectCategories", files=files), "caltech101 train.txt (real JPEGs)"
    root, rng = tmp_path_factory.mktemp("jpegs"), np.random.default_rng(0)
    for i in range(N_IMAGES):  # smooth colour fields, 200-500 px a side (Caltech-101 is ~300 x 250 on average)
        h, w = rng.integers(200, 500, 2)
        base = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3), dtype=np.uint8)
        (root / f"c{i % 4}").mkdir(exist_ok=True)
        Image.fromarray(base).resize((w, h), Image.BICUBIC).save(root / f"c{i % 4}" / f"{i}.jpg", quality=90)
    return ImageFolder(root), "generated JPEGs (../shared/data/caltech101 absent)"


def _loader(backend, src):
    if backend == "dali":
        device = 0 if torch.cuda.is_available() else None
        return build_dali_loader(src, RECIPE, BATCH, seed=0, num_threads=CORES, device_id=device)
    return build_loader(src, RECIPE, BATCH, seed=0, num_workers=CORES, pin_memory=torch.cuda.is_available())


def _epoch_fn(loader):
    epochs = iter(range(10_000))

    def run_epoch() -> int:
        loader.set_position(next(epochs))
        n = sum(batch.globals.shape[1] for batch in loader)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return n

    return run_epoch


@pytest.mark.benchmark(group="dataloader-12-views")
def test_dali_vs_torch_images_per_second(benchmark, source, timer, bench_report):
    if not dali_available():
        pytest.skip("nvidia.dali is not installed (pip install -e .[dali])")
    src, what = source
    for backend in ("dali", "torch"):  # correctness once, before timing, on separate loaders
        check = next(iter(_loader(backend, src)))
        assert check.globals.shape == (2, BATCH, 3, 224, 224) and check.focals.shape == (10, BATCH, 3, 96, 96)
        assert check.globals.dtype == torch.float32 and torch.isfinite(check.focals).all()
    dali, torch_ = _epoch_fn(_loader("dali", src)), _epoch_fn(_loader("torch", src))
    n = (len(src) // BATCH) * BATCH
    # interleaved epochs (ABBA), so that both loaders see the same load of a shared machine; DALI's first
    # epoch builds its pipeline (about 0.5 s here), which the median leaves out
    paired = timer.paired(dali, torch_, rounds=3, warmup=0)
    benchmark.pedantic(dali, rounds=1, warmup_rounds=0, iterations=1)  # pytest-benchmark's record of one epoch
    rate_dali, rate_torch = n / paired["a_median_s"], n / paired["b_median_s"]
    info = {"data": what, "images": len(src), "batch": BATCH, "views": "2x224 + 10x96", "threads_or_workers": CORES,
            "dali_device": "cuda:0 (mixed decode)" if torch.cuda.is_available() else "cpu",
            "dali_images_per_s": round(rate_dali, 2), "torch_images_per_s": round(rate_torch, 2),
            "dali_crops_per_s": round(12 * rate_dali, 1), "dali_over_torch": round(1 / paired["ratio"], 2),
            "dali_over_torch_pairs": round(1 / paired["ratio_pairs"], 2)}
    benchmark.extra_info.update(info)
    bench_report.add_row("data loader: source images/s, 12 views, DALI vs torch", info)


CIFAR = CALTECH.parent / "cifar10"


@pytest.mark.benchmark(group="dataloader-batched-augmentation")
@pytest.mark.parametrize("recipe_name", ["cpu_demo", "official"])
def test_batched_vs_per_image_augmentation(benchmark, source, timer, bench_report, tmp_path_factory, recipe_name):
    """The torch loader with augment="batched" (workers decode, one tensor pass per batch) against "per_image"
    (torchvision on each image), both with num_workers=2, interleaved epochs. `cpu_demo`: the CPU recipe's views
    (2 x 32 + 4 x 16) on CIFAR-10 test images (or generated 32 px ones); `official`: 2 x 224 + 10 x 96 on the
    Caltech-101 / generated source above."""
    from msn_fast.recipes import get_recipe

    if recipe_name == "cpu_demo":
        recipe = get_recipe("cpu_demo").data  # a DataConfig is a ViewRecipe
        if (CIFAR / "test").is_dir():
            files = sorted(str(p.relative_to(CIFAR / "test")) for p in (CIFAR / "test").rglob("*.jpg"))[::10]
            src, what = ImageFolder(CIFAR / "test", files=files), "cifar10 test (every 10th image)"
        else:
            root, rng = tmp_path_factory.mktemp("cifar_like"), np.random.default_rng(0)
            for i in range(1000):
                (root / f"c{i % 10}").mkdir(exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"c{i % 10}/{i}.jpg")
            src, what = ImageFolder(root), "generated 32 px JPEGs (../shared/data/cifar10 absent)"
        batch = 64
    else:
        (src, what), recipe, batch = source, RECIPE, BATCH
    loaders = {a: build_loader(src, recipe, batch, seed=0, num_workers=CORES, augment=a)
               for a in ("batched", "per_image")}
    for a, loader in loaders.items():
        b = next(iter(loader))
        assert b.globals.shape[:2] == (2, batch) and torch.isfinite(b.globals).all(), a
    fast, slow = _epoch_fn(loaders["batched"]), _epoch_fn(loaders["per_image"])
    n = (len(src) // batch) * batch
    paired = timer.paired(fast, slow, rounds=3, warmup=0)
    benchmark.pedantic(fast, rounds=1, warmup_rounds=0, iterations=1)
    info = {"data": what, "images": len(src), "batch": batch, "recipe": recipe_name, "workers": CORES,
            "views": f"{recipe.num_global}x{recipe.global_size} + {recipe.num_focal}x{recipe.focal_size}",
            "batched_images_per_s": round(n / paired["a_median_s"], 1),
            "per_image_images_per_s": round(n / paired["b_median_s"], 1),
            "batched_over_per_image": round(1 / paired["ratio"], 2),
            "batched_over_per_image_pairs": round(1 / paired["ratio_pairs"], 2)}
    benchmark.extra_info.update(info)
    bench_report.add_row(f"data loader: batched vs per-image augmentation ({recipe_name})", info)
