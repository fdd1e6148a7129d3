"""Which readout of a 60-minute `cpu_photos` encoder classifies best from 1, 2 and 5 labels? Held-out CIFAR-10.

    cd /tmp && python /work/main/bench/results/2026-12-07-lowshot-readout-heldout/readout_study.py RUN \
        >> readout_study.log

RUN: a run folder of the twelfth sweep round (bench/results/2026-12-06-recipe-sweep-cpu/: JJ_ps_60 and JJ_sym_60,
60-minute `cpu_photos` runs on the first 4,500 train images a class, one core each). Scored on the held-out layout
/tmp/c10e (labelled pool: 100 train images a class of the pre-training part; scored: the last 500 a class of
CIFAR-10's train split, never its test split), through the product's `lowshot_eval` (rows centred and L2-normalised,
λ cross-validated at 2 and 5 shots, 1e-3 at 1), 20 draws, the same draws for every readout. Readouts of the target
encoder: the CLS token before the final LayerNorm (the official feature, what msn_fast.eval uses), after it (the
head's input), after the head's first and second hidden stages (Linear, BatchNorm, GELU), the head's output z, the
softmax over the prototypes (tau of the recipe), and the official feature concatenated with z.
"""

import sys

import numpy as np
import torch
import torch.nn.functional as F

import msn_fast.evaluation as ev
from msn_fast.checkpoint import load_model
from msn_fast.dataloading import eval_transform
from msn_fast.dataloading.sources import find_splits
from msn_fast.features import extract_feature_sets


def readouts(model, cfg) -> dict:
    trunk, head = model.target.trunk, model.target.head
    protos = F.normalize(model.prototypes.detach(), dim=1)
    return {
        "CLS before the final norm (official)": trunk.extract_features,
        "CLS after it (the head's input)": lambda x: trunk(x),
        "head, first hidden stage": lambda x: head.mlp[:3](trunk(x)),
        "head, second hidden stage": lambda x: head.mlp[:6](trunk(x)),
        "head output z": lambda x: head(trunk(x)),
        "prototype softmax": lambda x: F.softmax(F.normalize(head(trunk(x)), dim=1) @ protos.T / cfg.loss.tau, dim=1),
    }


def main() -> None:
    model, cfg = load_model(sys.argv[1], device="cpu")
    model.eval()
    splits = find_splits("/tmp/c10e", None, "auto")
    tf = eval_transform(cfg.data.global_size)
    with torch.no_grad():
        fns = readouts(model, cfg)
        tr, ytr, _ = extract_feature_sets(fns, splits.train, tf, 256, "cpu", "train", 1)
        te, yte, _ = extract_feature_sets(fns, splits.held_out, tf, 256, "cpu", "held-out", 1)
    official, z = "CLS before the final norm (official)", "head output z"
    for d in (tr, te):
        d["official feature and z, concatenated"] = np.concatenate([d[official], d[z]], 1)
    print(f"{sys.argv[1]}: top-1 % on the held-out 5,000, mean of 20 draws at 1 / 2 / 5 shots")
    for name in tr:
        res = ev.lowshot_eval(tr[name], ytr, te[name], yte, shots=[1, 2, 5], draws=20, seed=0, reg="cv")
        accs = " / ".join(f"{100 * np.mean(r.accuracy):.1f}" for r in res)
        print(f"  {name:40s} dim {tr[name].shape[1]:4d}  {accs}", flush=True)


if __name__ == "__main__":
    main()
