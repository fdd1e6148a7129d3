"""Image sources: an image folder (with or without class sub-folders) and the embedded digits.

A source is a sequence of (PIL RGB image | None, label) pairs; None means the file could not be
decoded, and the loader replaces it, names it once and counts it once. `ImageFolder.load(i)` says why,
without a warning (the loaders warn from the main process, once per file per run). Odd modes (greyscale,
palette, CMYK, 16-bit, alpha) are converted to 8-bit RGB here, so every view pipeline sees the same input.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")


class DataError(ValueError):
    """A data source cannot be used (missing, empty, no readable images, too few for a batch). One line; names the
    path or the counts and says what to do."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha composited on black, 16-bit scaled to 8-bit)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        img = Image.fromarray(((arr - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def read_image(path: str) -> Image.Image:
    """Decode `path` to 8-bit RGB; raises (an OSError, a PIL error, ...) if the file is broken."""
    if os.path.getsize(path) == 0:
        raise OSError("empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img.load()  # a truncated file fails here, not later in a worker's transform
            out = to_rgb(img)
    if min(out.size) < 1:
        raise OSError(f"degenerate size {out.size}")
    return out


def load_image(path: str) -> Image.Image | None:
    """Decode `path` to RGB, or return None (with a warning naming the file) if it is broken."""
    try:
        return read_image(path)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        log.warning("skipping unreadable image %s: %s", path, e)
        return None


class ImageFolder(Sequence):
    """DIR/<class>/*.ext (labels = sorted class index) or DIR/*.ext (labels -1); recursive below a class.

    Files are listed once, sorted, so every process sees the same order.
    """

    def __init__(self, root: str | os.PathLike, files: list[str] | None = None):
        root = Path(root)
        if not root.exists():
            raise DataError(f"data folder {root} does not exist")
        if not root.is_dir():
            raise DataError(f"data path {root} is not a folder")
        self.root = root
        subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        self.classes = [d.name for d in subdirs]
        samples: list[tuple[str, int]] = []
        for f in sorted(p for p in root.iterdir() if p.is_file()):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                samples.append((str(f), -1))
        for idx, d in enumerate(subdirs):
            for dirpath, _, names in sorted(os.walk(d)):
                for n in sorted(names):
                    if Path(n).suffix.lower() in IMAGE_EXTENSIONS and not n.startswith("."):
                        samples.append((os.path.join(dirpath, n), idx))
        if files is not None:
            keep = set(files)
            samples = [s for s in samples if os.path.relpath(s[0], root) in keep]
        if not samples:
            raise DataError(
                f"no images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)} in it and in its sub-folders)"
            )
        self.samples = samples
        self.labelled = all(label >= 0 for _, label in samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image | None, int]:
        img, label, why = self.load(i)
        if why is not None:
            log.warning("skipping unreadable image %s", why)
        return img, label

    def load(self, i: int) -> tuple[Image.Image | None, int, str | None]:
        """(image, label, None), or (None, label, "PATH: why it is unreadable") with no warning."""
        path, label = self.samples[i]
        try:
            return read_image(path), label, None
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
            return None, label, f"{path}: {e}"

    def labels(self) -> np.ndarray:
        return np.array([label for _, label in self.samples])


class Digits(Sequence):
    """scikit-learn's 1,797 handwritten digits (8x8 scans, UCI), upsampled to `size` px RGB.

    Shipped inside scikit-learn, so the default run needs no download. `split` is "train" (1,297
    images) or "test" (500), a fixed stratified split (seed 0); "all" is every image.
    """

    NUM_TEST = 500

    def __init__(self, split: str = "train", size: int = 32):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        images = (d.images / 16.0 * 255.0).round().astype(np.uint8)  # (1797, 8, 8)
        idx = np.arange(len(images))
        if split != "all":
            tr, te = train_test_split(idx, test_size=self.NUM_TEST, random_state=0, stratify=d.target)
            if split not in ("train", "test"):
                raise ValueError(f"Digits split must be train, test or all; got {split!r}")
            idx = np.sort(tr if split == "train" else te)
        self.images, self._labels, self.size = images[idx], d.target[idx].astype(np.int64), size
        self.classes = [str(c) for c in range(10)]
        self.labelled = True

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        img = Image.fromarray(self.images[i], mode="L").resize((self.size, self.size), Image.BICUBIC)
        return img.convert("RGB"), int(self._labels[i])

    def labels(self) -> np.ndarray:
        return self._labels.copy()
