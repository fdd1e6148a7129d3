"""Paired comparison of sweep runs scored on the same labelled draws (same `--draws` and seed in msn_fast.eval).

    python paired.py CONTROL.json RUN.json ...

For each file: top-1 % mean ± std over the draws at 1, 2 and 5 shots, and the paired difference from CONTROL
(RUN minus CONTROL, draw by draw), mean ± standard error of the mean; a second line for the per-class mean
accuracy where it differs from top-1 (an imbalanced evaluation split: Caltech-101). Reads only the JSON reports.
"""

import json
import sys

import numpy as np


def main(paths: list[str]) -> None:
    ctl = json.load(open(paths[0]))["results"]
    shots = ("1-shot", "2-shot", "5-shot")
    for path in paths:
        res = json.load(open(path))["results"]
        for metric in ("accuracy", "class_mean_accuracy"):
            if metric not in res["1-shot"] or metric not in ctl["1-shot"]:
                continue
            if metric != "accuracy" and all(np.allclose(res[s][metric], res[s]["accuracy"]) for s in shots):
                continue  # a balanced split: the same numbers
            cells = []
            for shot in shots:
                a = 100 * np.array(res[shot][metric])
                d = a - 100 * np.array(ctl[shot][metric])
                se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0
                cells.append(f"{shot} {a.mean():.1f} ± {a.std():.1f} (paired {d.mean():+.1f} ± {se:.1f})")
            label = "" if metric == "accuracy" else " per class"
            print(path.rsplit("/", 1)[-1] + label, " | ".join(cells))


if __name__ == "__main__":
    main(sys.argv[1:])
