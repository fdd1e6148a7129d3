"""Which frozen feature of a pre-trained encoder classifies best from 1/2/5 labels (the run of features.log).

    python feature_choice.py RUN_DIR HELDOUT_DIR

RUN_DIR: an msn-fast run; HELDOUT_DIR: an image folder with train/ (labelled images are drawn from it) and val/
(scored). Each feature of the target encoder, of a random-init encoder of the same architecture and raw pixels
is scored with the evaluation's logistic regression (λ cross-validated per draw, 10 draws): the CLS token before
and after the final LayerNorm, the mean patch token before and after it, three concatenations; each also with the
mean over the horizontal flip, and with the train features' column mean subtracted (row centring and L2
normalisation always follow, as in msn_fast.evaluation.preprocess).
"""

import sys

import numpy as np
import torch

from msn_fast.checkpoint import load_model
from msn_fast.dataloading import eval_transform
from msn_fast.dataloading.sources import find_splits
from msn_fast.evaluation import lowshot_eval
from msn_fast.features import extract_feature_sets, trio_trunk

VARIANTS = {"cls_pre": [0], "cls_post": [1], "patch_pre": [2], "patch_post": [3], "cls_pre+patch_pre": [0, 2],
            "cls_post+patch_post": [1, 3], "cls_pre+cls_prev_block": [0, 4]}


def all_features(trunk):
    """images [B,3,S,S] -> [B, 5·D]: CLS pre-norm, CLS post-norm, mean patch pre/post-norm, the previous block's CLS."""
    def f(x):
        t, outs = trunk.embed(x), []
        for blk in trunk.blocks:
            t = blk(t)
            outs.append(t)
        n = trunk.norm(t)
        return torch.cat([t[:, 0], n[:, 0], t[:, 1:].mean(1), n[:, 1:].mean(1), outs[-2][:, 0]], 1)
    return f


def main(run_dir: str, data: str) -> None:
    model, cfg = load_model(run_dir, device="cpu")
    d = cfg.vit.dim
    fns = {"msn": all_features(model.target.trunk.eval()),
           "random_init": all_features(trio_trunk("random_init", None, cfg, 0, "cpu")),
           "raw_pixels": lambda x: x.flatten(1)}
    for name in list(fns):
        fns[name + "_flip"] = (lambda fn: lambda x: fn(torch.flip(x, dims=[3])))(fns[name])
    splits, tf = find_splits(data, [], "auto"), eval_transform(cfg.data.global_size)
    with torch.no_grad():
        ftr, ytr, _ = extract_feature_sets(fns, splits.train, tf)
        fte, yte, _ = extract_feature_sets(fns, splits.held_out, tf)
    ytr, yte = np.asarray(ytr), np.asarray(yte)
    for name in ("raw_pixels", "random_init", "msn"):
        variants = {"pixels": None} if name == "raw_pixels" else VARIANTS
        for variant, blocks in variants.items():
            cols = slice(None) if blocks is None else np.concatenate([np.arange(b * d, (b + 1) * d) for b in blocks])
            a, b = ftr[name][:, cols], fte[name][:, cols]
            af, bf = ftr[name + "_flip"][:, cols], fte[name + "_flip"][:, cols]
            for flip in (False, True):
                xa, xb = ((a + af) / 2, (b + bf) / 2) if flip else (a, b)
                for centre in (False, True):
                    mu = xa.mean(0, keepdims=True) if centre else 0.0
                    res = lowshot_eval(xa - mu, ytr, xb - mu, yte, shots=(1, 2, 5), draws=10, seed=0, reg="cv")
                    print(name, variant, "flip" if flip else "-", "column-centred" if centre else "-",
                          " ".join(f"{100 * r.mean:.1f}" for r in res), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
