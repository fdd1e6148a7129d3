"""Does the logistic regression's λ limit the low-shot margins? Held-out CIFAR-10 features, cached by the sweep.

    cd /tmp && python /work/main/bench/results/2026-12-07-lowshot-reg-heldout/reg_study.py > reg_study.log

The features are those of the twelfth sweep round (bench/results/2026-12-06-recipe-sweep-cpu/, rows JJ_ps and
JJ_sym: two 60-minute `cpu_photos` runs on the first 4,500 train images a class, one core each), the same ViT with
random weights (seed 0) and raw pixels, on the held-out layout /tmp/c10e (labelled pool: 100 train images a class
of the pre-training part; scored: the last 500 a class of CIFAR-10's train split, never its test split). It reads
them through `msn_fast.eval` with the sweep's feature cache (/tmp/sw12/cache) and scores, over 20 draws:
1 shot at fixed λ from 1e-6 to 1 (the product uses `ONE_SHOT_REG` 1e-3: there is nothing to cross-validate);
2 and 5 shots with λ cross-validated inside each draw on `REG_GRID` (the product) and on that grid extended down
to 1e-6, and at fixed λ.
"""

import numpy as np

import msn_fast.eval as cli
import msn_fast.evaluation as ev

DRAWS = 20
store = {}


def _grab(xtr, ytr, xte, yte, **_):
    store["arrays"] = (xtr, ytr, xte, yte)
    return []


cli.lowshot_eval = _grab  # evaluate() then hands this the feature arrays and scores nothing itself
FEATURES = {"msn_ps": ["--checkpoint", "/tmp/sw12/JJ_ps_60"], "msn_sym": ["--checkpoint", "/tmp/sw12/JJ_sym_60"],
            "random": ["--random-init", "--model", "cpu_photos"], "pixels": ["--raw-pixels", "--model", "cpu_photos"]}
sets = {}
for name, extra in FEATURES.items():
    args = cli.build_parser().parse_args(["--data", "/tmp/c10e", "--shots", "1", "--knn-k", "0", "--cache",
                                          "/tmp/sw12/cache", "--no-progress"] + extra)
    cli.evaluate(args)
    sets[name] = store["arrays"]


def score(name: str, shots: int, reg, grid=ev.REG_GRID) -> tuple[float, float]:
    xtr, ytr, xte, yte = sets[name]
    r = ev.lowshot_eval(xtr, ytr, xte, yte, shots=[shots], draws=DRAWS, seed=0, reg=reg, grid=grid)[0]
    return 100 * float(np.mean(r.accuracy)), float(np.median([x for x in r.reg]))


EXTENDED = (1e-6, 3e-6, 1e-5, 3e-5) + tuple(ev.REG_GRID)
print(f"top-1 % on the held-out 5,000, mean of {DRAWS} draws (the same draws in every row of a feature set)")
for name in sets:
    print(name + ", 1 shot:", "  ".join(f"λ {lam:g} {score(name, 1, lam)[0]:.2f}"
                                       for lam in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)))
    for k in (2, 5):
        cv, lam_cv = score(name, k, "cv")
        ext, lam_ext = score(name, k, "cv", EXTENDED)
        fixed = "  ".join(f"λ {lam:g} {score(name, k, lam)[0]:.2f}" for lam in (1e-6, 1e-4, 1e-3, 1e-2))
        print(f"{name}, {k} shots: cv {cv:.2f} (median λ {lam_cv:g})  cv down to 1e-6 {ext:.2f} "
              f"(median λ {lam_ext:g})  {fixed}", flush=True)
