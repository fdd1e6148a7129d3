"""Image sources: an image folder (with or without class sub-folders), the embedded digits, and the split layouts.

A source is a sequence of (PIL RGB image | None, label) pairs; None means the file could not be
decoded, and the loader replaces it, names it once and counts it once. `ImageFolder.load(i)` says why,
without a warning (the loaders warn from the main process, once per file per run). Odd modes (greyscale,
palette, CMYK, 16-bit, alpha) are converted to 8-bit RGB here, so every view pipeline sees the same input.
`find_splits` reads a dataset folder with a train split and a held-out split (folders or lists, below;
`load_splits` adds a one-line description), and `subset_indices` matches an official MSN/SimCLR subset file
(one file name per line) to the train split.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
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


def read_image(path: str | bytes, min_size: int | None = None) -> Image.Image:
    """Decode `path` (or an encoded image's bytes, e.g. a shard member) to 8-bit RGB; raises (an OSError, a PIL
    error, ...) if the image is broken.

    min_size: the caller needs no more than this many pixels on the short side. A JPEG larger than that is then
    decoded at a reduced scale (its DCT scaling, 1/2, 1/4 or 1/8, chosen so that both sides stay at least
    `min_size`): on Caltech-101's photos (about 300 x 200) at 64 px that decodes in about 60% of the time. Other
    formats decode whole."""
    if (len(path) if isinstance(path, bytes) else os.path.getsize(path)) == 0:
        raise OSError("empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as img:
            if min_size is not None:
                img.draft(None, (min_size, min_size))  # a no-op but for JPEG
            img.load()  # a truncated file fails here, not later in a worker's transform
            out = to_rgb(img)
    if min(out.size) < 1:
        raise OSError(f"degenerate size {out.size}")
    return out


def fit_short_side(img: Image.Image, size: int) -> Image.Image:
    """`img` scaled down so that its short side is `size` (box filter, aspect kept); a smaller one unchanged."""
    w, h = img.size
    short = min(w, h)
    if short <= size:
        return img
    return img.resize((round(w * size / short), round(h * size / short)), Image.BOX)  # the short side: exactly size


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

    def load(self, i: int, min_size: int | None = None) -> tuple[Image.Image | None, int, str | None]:
        """(image, label, None), or (None, label, "PATH: why it is unreadable") with no warning; `min_size` as
        read_image's."""
        path, label = self.samples[i]
        try:
            return read_image(path, min_size), label, None
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


# --- split layouts --------------------------------------------------------------------------------------

DEFAULT_EXCLUDE = ("BACKGROUND_Google",)
"""Classes left out of both splits unless told otherwise (Caltech-101's clutter class)."""
HELD_OUT_SPLITS = ("val", "test")
"""Held-out split names in order of preference: ImageNet's test/ has no labels, so val/ is scored first."""


@dataclass
class Splits:
    """A labelled train split and the held-out split that is scored (`held_out_name`: "val" or "test")."""

    train: ImageFolder
    held_out: ImageFolder
    held_out_name: str
    layout: str  # how the splits were found, for the logs


def split_layout(root: Path, eval_split: str = "auto") -> tuple[str, str, list[str]] | None:
    """("lists" | "folders", held-out split, the other held-out splits present) of DIR, or None without a layout.

    Lists (train.txt + val.txt / test.txt) come before folders (train/ + val/ / test/); `eval_split` "auto"
    takes val before test."""
    if eval_split not in ("auto", *HELD_OUT_SPLITS):
        raise DataError(f"eval split {eval_split!r}: choose auto, {' or '.join(HELD_OUT_SPLITS)}")
    for kind, has in (("lists", lambda s: (root / f"{s}.txt").is_file()), ("folders", lambda s: (root / s).is_dir())):
        present = [s for s in HELD_OUT_SPLITS if has(s)] if has("train") else []
        if not present:
            continue
        if eval_split != "auto" and eval_split not in present:
            what = f"{eval_split}.txt" if kind == "lists" else f"{eval_split}/"
            raise DataError(f"{root} has no {what} to evaluate on (it has {', '.join(present)})")
        name = present[0] if eval_split == "auto" else eval_split
        return kind, name, [s for s in present if s != name]
    return None


def read_list(path: Path) -> list[str]:
    """Non-empty lines of a list file, without `#` comments."""
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _list_splits(root: Path, names: tuple[str, str], exclude: set[str]) -> tuple[dict, Path]:
    lists = {s: [f for f in read_list(root / f"{s}.txt") if Path(f).parts[0] not in exclude] for s in names}
    for s, files in lists.items():
        if not files:
            raise DataError(f"{root}/{s}.txt lists no images (after excluding {sorted(exclude)})")
    tr, ho = names
    both = set(lists[tr]) & set(lists[ho])
    if both:
        raise DataError(f"{len(both)} images are listed in both {tr}.txt and {ho}.txt (e.g. {sorted(both)[0]}): "
                        f"the {ho} split would leak into the labelled set")
    first = lists[tr][0]
    candidates = [root] + sorted(d for d in root.iterdir() if d.is_dir())
    image_root = next((d for d in candidates if (d / first).is_file()), None)
    if image_root is None:
        raise DataError(f"{first} (first line of {root}/{tr}.txt) is neither under {root} nor one of its folders")
    splits = {}
    for s, files in lists.items():
        src = ImageFolder(image_root, files=files)
        if len(src) != len(set(files)):
            found = {os.path.relpath(p, image_root) for p, _ in src.samples}
            missing = sorted(set(files) - found)
            raise DataError(f"{len(missing)} images of {root}/{s}.txt are missing or not images "
                            f"(e.g. {image_root / missing[0]})")
        if not src.labelled:
            raise DataError(f"{root}/{s}.txt lists images outside class folders")
        splits[s] = src
    return splits, image_root


def _folder_splits(root: Path, names: tuple[str, str], exclude: set[str]) -> dict:
    splits = {s: ImageFolder(root / s) for s in names}
    tr, ho = names
    for s, src in splits.items():
        if not src.labelled:
            hint = " (sort ImageNet's val/ into its class folders first)" if s == "val" else ""
            raise DataError(f"{root}/{s} has images outside class folders: labels are needed for evaluation{hint}")
    if splits[tr].classes != splits[ho].classes:
        extra = sorted(set(splits[ho].classes) ^ set(splits[tr].classes))
        raise DataError(f"{root}/{tr} and {root}/{ho} have different class folders (e.g. {extra[0]})")
    for s, src in splits.items():
        keep = [x for x in src.samples if src.classes[x[1]] not in exclude]
        if not keep:
            raise DataError(f"no images left in {src.root} after excluding {sorted(exclude)}")
        src.samples = keep
    return splits


def find_splits(data: str | os.PathLike, exclude: Sequence[str] | None = None, eval_split: str = "auto") -> Splits:
    """The labelled train split and the held-out split of DIR (see `split_layout`); raises DataError on a leak.

    `exclude` (default DEFAULT_EXCLUDE) drops class folders from both splits."""
    root = Path(data)
    exclude_set = set(DEFAULT_EXCLUDE if exclude is None else exclude)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    found = split_layout(root, eval_split)
    if found is None:
        raise DataError(f"{root} has neither train/ + val/ (or test/) class folders nor train.txt + val.txt "
                        "(or test.txt) lists")
    kind, held_out, others = found
    names = ("train", held_out)
    if kind == "lists":
        splits, image_root = _list_splits(root, names, exclude_set)
        layout = f"lists train.txt + {held_out}.txt under {image_root}"
    else:
        splits = _folder_splits(root, names, exclude_set)
        layout = f"folders {root}/train + {root}/{held_out}"
    if others:
        layout += f" ({held_out} preferred over {', '.join(others)})" if eval_split == "auto" else ""
    train, test = splits["train"], splits[held_out]
    real = {os.path.realpath(p) for p, _ in train.samples}
    leaked = [p for p, _ in test.samples if os.path.realpath(p) in real]
    if leaked:
        raise DataError(f"{len(leaked)} {held_out} images are also training images (e.g. {leaked[0]})")
    missing = sorted({train.classes[c] for c in set(test.labels()) - set(train.labels())})
    if missing:
        log.warning("%s classes with no training image (never predicted): %s", held_out, ", ".join(missing[:5]))
    return Splits(train, test, held_out, layout)


def load_splits(data: str | os.PathLike, exclude: Sequence[str] | None = None,
                eval_split: str = "auto") -> tuple[ImageFolder, ImageFolder, str]:
    """(train source, held-out source, description) of DIR in either layout; raises DataError on leaks.

    The description counts the image files listed; the evaluation reports those actually read (`data_summary`)."""
    s = find_splits(data, exclude, eval_split)
    return s.train, s.held_out, data_summary(s.layout, len(s.train), len(s.held_out), len(set(s.train.labels())),
                                             held_out=s.held_out_name)


def data_summary(layout: str, n_train: int, n_test: int, n_classes: int, unreadable: int = 0,
                 held_out: str = "test") -> str:
    """One line on the splits: layout, image counts (and unreadable ones skipped), classes, the split scored."""
    skipped = f" ({unreadable} unreadable skipped)" if unreadable else ""
    return (f"{layout}: {n_train} train / {n_test} {held_out} images{skipped}, {n_classes} classes; "
            f"evaluated on {held_out}")


def subset_indices(src: ImageFolder, names: Sequence[str], what: str) -> np.ndarray:
    """Sorted indices into `src.samples` of the images `names` lists (`what` names the list in errors).

    A name with a folder (`n01440764/n01440764_10026.JPEG`) is matched against the path under `src.root`;
    a bare file name (the official ImageNet subsets: `n01440764_10026.JPEG`) against the file name, which must
    then be unique in `src`. Raises DataError naming the first name not found and how many are missing."""
    if not names:
        raise DataError(f"{what} lists no images")
    by_rel, by_name = {}, {}
    for i, (path, _) in enumerate(src.samples):
        rel = os.path.relpath(path, src.root)
        by_rel[rel] = i
        by_name.setdefault(os.path.basename(rel), []).append(i)
    idx, missing = [], []
    for n in names:
        if n in by_rel:
            hits = [by_rel[n]]
        else:
            hits = [] if "/" in n else by_name.get(n, [])
        if len(hits) > 1:
            raise DataError(f"{what}: {n} matches {len(hits)} images of {src.root} (give its folder too, e.g. "
                            f"{os.path.relpath(src.samples[hits[0]][0], src.root)})")
        if hits:
            idx.extend(hits)
        else:
            missing.append(n)
    if missing:
        raise DataError(f"{len(missing)} of the {len(names)} images of {what} are not in the train split "
                        f"{src.root} (e.g. {missing[0]})")
    out = np.unique(np.asarray(idx, dtype=np.int64))
    if len(out) != len(names):
        log.warning("%s lists %d images more than once", what, len(names) - len(out))
    return out
