"""Label-efficiency evaluation of a checkpoint: `python -m msn_fast.eval --checkpoint RUN --data DIR`.

Low-shot logistic regression (1, 2, 5 images per class) and label fractions (1%, 10%), each over
seeded draws (mean ± std), λ chosen inside each labelled draw (`--reg cv`, see msn_fast/evaluation.py);
k-NN (cosine, k 20, DINO's exp(sim/0.07) votes); a linear probe on all labels (`--linear`).
Accuracy and per-class mean accuracy side by side. Features: the target encoder's CLS token of the
last block before the final LayerNorm, one centre crop at the pre-training size (official eval);
extracted once and cached (`--cache`), keyed by weights + image list + transform.

DIR is either `DIR/train/<class>/*` + `DIR/val/<class>/*` or `DIR/test/<class>/*` (ImageNet, CIFAR-10
layouts) or a list layout: `DIR/train.txt` + `DIR/val.txt` or `DIR/test.txt` with image paths relative to DIR
or to one sub-folder of it (Caltech-101: `101_ObjectCategories/`); a path's first folder is its class. With
both val and test, val is scored (`--eval-split test` for the other). `--exclude-class` (default
BACKGROUND_Google) drops a class from both splits. A file in both splits is an error. `--subset-file`
(the official imagenet_subsets files, one train file name per line) replaces the random labelled draws.

Features (msn_fast/features.py): `--checkpoint` (an msn-fast run/step directory, an official MSN .pth.tar, or
a timm-layout ViT state dict), `--random-init` (same architecture as --checkpoint, or the --model recipe's,
random weights) or `--raw-pixels` (the normalised centre crop, flattened). This module is the command line;
the protocol is msn_fast/evaluation.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from msn_fast.dataloading import DataError, ImageFolder, eval_transform
from msn_fast.dataloading.sources import Splits, data_summary, find_splits, read_list, subset_indices

from .checkpoint import CheckpointError
from .cli import UsageError
from .config import Config
from .evaluation import (
    REG_GRID,
    format_results,
    fraction_eval,
    knn_eval,
    linear_probe,
    lowshot_eval,
    plot_results,
    subset_eval,
)
from .features import cache_spec, feature_fn, features_via_pixels, trio_trunk
from .interop import InteropError
from .progress import set_enabled

log = logging.getLogger("msn_fast.eval")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2 through main(), no usage dump
        raise UsageError(message)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # a None default is explained in the help text, not shown
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m msn_fast.eval", description=__doc__.split("\n\n")[0], formatter_class=_Formatter)
    src = p.add_argument_group("features (one of)")
    src.add_argument("--checkpoint", help="msn-fast run or step directory, official MSN checkpoint file, "
                     "or timm-layout ViT state dict (.pth)")
    src.add_argument("--random-init", action="store_true", help="random weights: the checkpoint's architecture, "
                     "or --model's")
    src.add_argument("--raw-pixels", action="store_true", help="flattened normalised pixels of the centre crop")
    src.add_argument("--model", default="cpu_demo", help="recipe for --random-init / --raw-pixels without "
                     "--checkpoint (image size and architecture)")
    src.add_argument("--heads", type=int, help="attention heads of a checkpoint whose width is not an official model's")
    p.add_argument("--data", required=True, help="DIR with train/ and val/ or test/ class folders, or train.txt and "
                   "val.txt or test.txt")
    p.add_argument("--eval-split", choices=("auto", "val", "test"), default="auto",
                   help="held-out split scored; auto: val when DIR has one, else test")
    p.add_argument("--exclude-class", action="append", default=None, metavar="NAME",
                   help="class folder left out of both splits (repeatable; default: BACKGROUND_Google)")
    p.add_argument("--img-size", type=int, help="evaluation crop size (default: the pre-training global view size)")
    ev = p.add_argument_group("evaluations")
    ev.add_argument("--shots", type=int, nargs="*", help="labelled images per class, random draws (default 1 2 5; "
                    "none with --subset-file)")
    ev.add_argument("--fractions", type=float, nargs="*", help="fractions of the train labels, random draws "
                    "(default 0.01 0.1; none with --subset-file)")
    ev.add_argument("--draws", type=int, default=5, help="random labelled sets per setting")
    ev.add_argument("--subset-file", action="append", metavar="FILE", help="fixed labelled set: one train image "
                    "file name per line (imagenet_subsets*/1imgs_class.txt, 1percent.txt); repeatable: files of one "
                    "kind (e.g. the three 1-image splits) give mean ± std over the files, in place of random draws")
    ev.add_argument("--reg", default="cv", help="λ of the logistic regression: 'cv' (cross-validated inside each "
                    "labelled set; 1e-3 at one image per class) or a number")
    ev.add_argument("--knn-k", type=int, default=20, help="k of the k-NN (0: no k-NN)")
    ev.add_argument("--knn-temperature", type=float, default=0.07, help="k-NN vote weight exp(sim/T); 0: majority")
    ev.add_argument("--linear", action="store_true", help="also a linear probe on all training labels")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (and of --random-init weights)")
    p.add_argument("--cache", default=os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                                   "msn_fast", "features"), help="feature cache folder")
    p.add_argument("--no-cache", action="store_true", help="always extract features, write no cache")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--name", help="label of this feature set in the report")
    p.add_argument("--baselines", action="store_true", help="also evaluate random-init weights and raw pixels "
                   "on the same splits")
    p.add_argument("--out", help="also write the report as JSON here")
    p.add_argument("--plot", metavar="PNG", help="draw accuracy against labelled images per class (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines "
                   "(also: MSN_FAST_PROGRESS=0)")
    return p


# --- data -----------------------------------------------------------------------------------------------

def labelled_subsets(files: list[str], train: ImageFolder) -> dict[str, np.ndarray]:
    """Subset file -> indices into `train.samples` of the images it lists (DataError for a name not found)."""
    out = {}
    for f in files:
        if not Path(f).is_file():
            raise UsageError(f"--subset-file {f} does not exist")
        out[f] = subset_indices(train, read_list(Path(f)), f)
    return out


def _rows(samples: np.ndarray, kept: np.ndarray, src: ImageFolder, what: str) -> np.ndarray:
    """Feature rows of the sample indices `samples`, given the sample index of each row (`kept`)."""
    pos = np.minimum(np.searchsorted(kept, samples), max(len(kept) - 1, 0))
    bad = samples[kept[pos] != samples] if len(kept) else samples
    if len(bad):
        raise DataError(f"{len(bad)} images of {what} are unreadable (e.g. {src.samples[bad[0]][0]})")
    return pos


# --- the encoder ----------------------------------------------------------------------------------------

def load_encoder(args, device) -> tuple[Config, torch.nn.Module | None, str]:
    """(config, trunk or None for raw pixels, human-readable feature name): the feature set of the flags, one of
    msn_fast/features.py's trio (the checkpoint's target encoder, random-init weights, raw pixels)."""
    from .checkpoint import load_model
    from .interop import from_timm_state_dict, load_official, trunk_from_state_dict
    from .recipes import get_recipe

    trunk, name, cfg = None, None, None
    if args.checkpoint:
        path = Path(args.checkpoint)
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist")
        if path.is_dir():
            model, cfg = load_model(path, device="cpu")
            trunk, name = model.target.trunk, f"msn target encoder ({path})"
        else:
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise CheckpointError(f"{path} is not a readable torch checkpoint: {e}") from None
            if isinstance(ckpt, dict) and "target_encoder" in ckpt:
                model, cfg = load_official(ckpt, heads=args.heads)
                trunk, name = model.target.trunk, f"official MSN target encoder ({path.name})"
            elif isinstance(ckpt, dict) and "pos_embed" in ckpt:
                trunk = trunk_from_state_dict(from_timm_state_dict(ckpt), heads=args.heads)
                cfg = Config()
                cfg.vit.dim, cfg.vit.depth, cfg.vit.heads = trunk.arch.dim, trunk.arch.depth, trunk.arch.heads
                cfg.vit.mlp_ratio = trunk.arch.mlp_ratio
                cfg.vit.patch_size, cfg.vit.img_size, cfg.data.global_size = (trunk.patch_size, trunk.img_size,
                                                                              trunk.img_size)
                name = f"ViT state dict ({path.name})"
            else:
                raise CheckpointError(f"{path}: neither an official MSN checkpoint (target_encoder) nor a ViT "
                                      "state dict (pos_embed); msn-fast runs are directories")
    else:
        try:
            cfg = get_recipe(args.model)
        except ValueError as e:
            raise UsageError(str(e)) from None
    kind = "random_init" if args.random_init else "raw_pixels" if args.raw_pixels else "target"
    trunk = trio_trunk(kind, trunk, cfg, args.seed, device)
    name = {"target": name, "random_init": f"random-init {cfg.model} (seed {args.seed})",
            "raw_pixels": "raw pixels"}[kind]
    cfg.vit.attn_impl = "auto"
    if trunk is not None:
        trunk.set_attn_impl("auto")
    return cfg, trunk, name


# --- main -----------------------------------------------------------------------------------------------

def _check_args(args) -> None:
    if args.raw_pixels and args.random_init:
        raise UsageError("choose one of --random-init and --raw-pixels")
    if not (args.checkpoint or args.random_init or args.raw_pixels):
        raise UsageError("give --checkpoint PATH, --random-init or --raw-pixels")
    if args.reg != "cv":
        try:
            args.reg = float(args.reg)
        except ValueError:
            raise UsageError(f"--reg expects 'cv' or a number; got {args.reg!r}") from None
        if args.reg <= 0:
            raise UsageError(f"--reg must be positive; got {args.reg}")
    # random draws by default; a subset file replaces them unless they are asked for too
    if args.shots is None:
        args.shots = [] if args.subset_file else [1, 2, 5]
    if args.fractions is None:
        args.fractions = [] if args.subset_file else [0.01, 0.1]
    if args.draws < 1 or any(k < 1 for k in args.shots) or any(not 0 < f <= 1 for f in args.fractions):
        raise UsageError("--draws and --shots must be >= 1 and --fractions in (0, 1]")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError('--plot needs matplotlib: pip install "msn-fast[bench]"') from None


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} but no CUDA device is available")
    return device


def evaluate(args, splits: Splits | None = None) -> dict:
    """The report of one feature set (see main); `splits` saves reading DIR again for --baselines."""
    t0 = time.perf_counter()
    _check_args(args)
    device = _device(args.device)
    splits = splits or find_splits(args.data, args.exclude_class, args.eval_split)
    train, test, held_out = splits.train, splits.held_out, splits.held_out_name
    subsets = labelled_subsets(args.subset_file or [], train)
    cfg, trunk, name = load_encoder(args, device)
    name = args.name or name
    size = args.img_size or cfg.data.global_size
    if trunk is not None and size < trunk.patch_size:
        raise UsageError(f"--img-size {size} is smaller than the patch size {trunk.patch_size}")
    tf = eval_transform(size)
    fn, spec = feature_fn(trunk), cache_spec(trunk)
    cache = None if args.no_cache else Path(args.cache)
    feats, cached, unreadable = {}, {}, {}
    for split, src in (("train", train), (held_out, test)):
        x, y, kept, cached[split] = features_via_pixels(fn, spec, src, tf, size, split, cache, device,
                                                        args.batch_size)
        feats[split], unreadable[split] = (x, y, kept), len(src) - len(y)  # extraction leaves unreadable files out
        if not len(y):
            raise DataError(f"all {len(src)} {split} images of {args.data} are unreadable")
    t_feat = time.perf_counter() - t0
    (xtr, ytr, kept), (xte, yte, _) = feats["train"], feats[held_out]
    data_desc = data_summary(splits.layout, len(ytr), len(yte), len(np.unique(ytr)), sum(unreadable.values()),
                             held_out)
    if any(unreadable.values()):
        log.warning("%d train and %d %s images are unreadable: left out", unreadable["train"], unreadable[held_out],
                    held_out)
    log.info("features %s: train %s, %s %s (%s; %.0f s)", name, xtr.shape, held_out, xte.shape,
             "from the cache" if all(cached.values()) else "extracted", t_feat)

    results = []
    if subsets:
        rows = {f: _rows(idx, kept, train, f) for f, idx in subsets.items()}
        results += subset_eval(xtr, ytr, xte, yte, rows, seed=args.seed, reg=args.reg)
    if args.shots:
        results += lowshot_eval(xtr, ytr, xte, yte, shots=args.shots, draws=args.draws, seed=args.seed, reg=args.reg)
    if args.fractions:
        results += fraction_eval(xtr, ytr, xte, yte, fractions=args.fractions, draws=args.draws, seed=args.seed,
                                 reg=args.reg)
    if args.knn_k > 0:
        results.append(knn_eval(xtr, ytr, xte, yte, k=args.knn_k, temperature=args.knn_temperature or None))
    if args.linear:
        grid = REG_GRID if args.reg == "cv" else [args.reg]
        results.append(linear_probe(xtr, ytr, xte, yte, seed=args.seed, grid=grid))
    elapsed = time.perf_counter() - t0
    return {
        "features": name, "data": data_desc, "eval_split": held_out, "img_size": size,
        "feature_dim": int(xtr.shape[1]), "num_classes": int(len(np.unique(ytr))),
        "chance": float(1.0 / len(np.unique(ytr))), "train_images": int(len(ytr)), "test_images": int(len(yte)),
        "unreadable_images": unreadable, "draws": args.draws, "seed": args.seed, "reg": args.reg,
        "features_cached": cached, "seconds": {"features": round(t_feat, 1), "total": round(elapsed, 1)},
        "results": {r.name: r.to_dict() for r in results}, "_results": results,
    }


def warn_short_classes(labels: np.ndarray, classes: list[str], shots: list[int]) -> None:
    """Warn, once for the largest shot count, when some classes have fewer training images than it: a k-shot
    draw takes all of theirs (fewer than k labelled images). labels: [N] class indices into `classes`."""
    if not shots or not len(labels):
        return
    k, counts = max(shots), np.bincount(labels, minlength=len(classes))
    short = [(classes[c], int(n)) for c, n in enumerate(counts) if 0 < n < k]
    if short:
        named = ", ".join(f"{c} ({n})" for c, n in short[:5])
        named += f" and {len(short) - 5} more" if len(short) > 5 else ""
        log.warning("%d class(es) have fewer than %d training images; a %d-shot draw takes all they have: %s",
                    len(short), k, k, named)


def evaluate_all(args) -> list[dict]:
    """This feature set's report, then (--baselines) random-init weights' and raw pixels' on the same splits."""
    _check_args(args)
    splits = find_splits(args.data, args.exclude_class, args.eval_split)
    warn_short_classes(splits.train.labels(), splits.train.classes, args.shots or [])
    reports = [evaluate(args, splits)]
    if args.baselines:
        for kind in ("random_init", "raw_pixels"):
            if not getattr(args, kind):
                base = argparse.Namespace(**{**vars(args), "random_init": False, "raw_pixels": False, kind: True,
                                             "name": None})
                reports.append(evaluate(base, splits))
    return reports


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        args = build_parser().parse_args(argv)
        set_enabled(False if args.no_progress else None)
        reports = evaluate_all(args)
    except (UsageError, DataError, CheckpointError, InteropError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        set_enabled(None)
    for report in reports:
        results = report.pop("_results")
        print(f"{report['features']} | {report['data']} | {report['img_size']} px, {report['feature_dim']}-d "
              f"features | chance {100 * report['chance']:.1f}% | {report['seconds']['total']:.0f} s")
        print(format_results(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({**reports[0], "baselines": reports[1:]} if args.baselines
                                             else reports[0], indent=2))
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot_results(reports, args.plot)
        log.info("plot written to %s", args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
