"""Label-efficiency evaluation on frozen features: low-shot and label-fraction logistic regression,
linear probe, k-NN, on feature arrays (numpy/scikit-learn/torch); the features come from msn_fast/features.py,
`msn_fast.eval` is the CLI and `lowshot_report` the trainer's end-of-run report.

As the official logistic_eval.py: features are the target encoder's CLS token of the last block,
before the final LayerNorm, of one centre crop; each feature row is centred and L2-normalised;
an L2-regularised multinomial logistic regression without intercept (scikit-learn here, cyanure
there) is fitted on k images per class, drawn at random several times, and scored on a held-out
test split. Every labelled set is drawn from the TRAIN arrays only; the test arrays are only scored.

Regularisation λ (cyanure's convention: mean(loss) + λ/2·‖W‖², i.e. sklearn C = 1/(n·λ)) is a fixed
number, or `"cv"`: chosen by stratified cross-validation INSIDE the drawn labelled set over
`REG_GRID` (accuracy, ties broken by log-loss, then by the larger λ). With one image per class there
is nothing to cross-validate, so "cv" uses the fixed `ONE_SHOT_REG` there.

k-NN (`knn_eval`): cosine similarity between L2-normalised features, the k = 20 nearest training
images vote with weights exp(sim / T), T = 0.07 (DINO's weighted k-NN); `temperature=None` gives a
plain majority vote (ties to the nearest neighbour's class).

Fixed labelled sets (`subset_eval`, the official ImageNet subset files) replace the random draws: each
file is one "draw". Long loops report progress (msn_fast/progress.py); `plot_results` draws the report.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from msn_fast.dataloading import eval_transform

from .config import Config
from .features import FEATURE_SETS, extract_feature_sets, feature_fn, plain_copy, trio_trunk
from .model import MSN
from .progress import Progress, track

log = logging.getLogger(__name__)

REG_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
"""λ values tried by cross-validation (official values in use range from 2.5e-4 to 0.075)."""
ONE_SHOT_REG = 1e-3
"""λ at one image per class, where nothing can be cross-validated (a fixed, documented default)."""
MAX_FOLDS = 3


def preprocess(x: np.ndarray) -> np.ndarray:
    """Centre each row and L2-normalise it (cyanure.preprocess(centering=True, normalize=True, columns=False))."""
    x = x - x.mean(axis=1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def draw_labelled(labels: np.ndarray, shots: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of `shots` random images per class (fewer if a class has fewer)."""
    idx = [rng.choice(np.flatnonzero(labels == c), size=min(shots, int((labels == c).sum())), replace=False)
           for c in np.unique(labels)]
    return np.concatenate(idx)


def draw_fraction(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of a stratified random `fraction` of the images: round(f·n_c) of each class c, at least 1."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1]; got {fraction}")
    idx = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = min(len(members), max(1, int(round(fraction * len(members)))))
        idx.append(rng.choice(members, size=k, replace=False))
    return np.concatenate(idx)


def class_mean_accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    """Per-class accuracy averaged over the classes present in `y` (balanced accuracy)."""
    return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))


def fit_logreg(x: np.ndarray, y: np.ndarray, reg: float, max_iter: int = 1000):
    """Multinomial L2 logistic regression without intercept on (already preprocessed) rows; λ as cyanure."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    clf = LogisticRegression(C=1.0 / (len(y) * reg), fit_intercept=False, max_iter=max_iter, tol=1e-4)
    # Small problems: one BLAS thread (L-BFGS's many tiny BLAS calls are 10x slower with threads spinning
    # beside torch's OpenMP pool); large ones keep the default.
    with warnings.catch_warnings(), threadpool_limits(1 if x.size < 4_000_000 else None, user_api="blas"):
        warnings.simplefilter("ignore")  # ConvergenceWarning at tiny λ on separable data: the argmax is settled
        clf.fit(x, y)
    return clf


def choose_reg(x: np.ndarray, y: np.ndarray, grid: Sequence[float] = REG_GRID, seed: int = 0,
               fit: Callable = fit_logreg) -> float:
    """λ from `grid` by stratified k-fold CV on (x, y) only (k = min(images of the rarest class, 3)).

    Score: validation accuracy; ties go to the lower validation log-loss, then to the larger λ.
    With fewer than 2 images in some class the folds would drop a class: returns ONE_SHOT_REG.
    """
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(np.unique(y, return_inverse=True)[1])
    folds = min(int(counts.min()), MAX_FOLDS)
    if folds < 2 or len(grid) == 1:
        return float(grid[0]) if len(grid) == 1 else ONE_SHOT_REG
    splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, y))
    best, best_key = None, None
    with Progress(len(grid) * folds, f"λ search ({len(y)} images, {folds} folds)", log, unit="fit") as bar:
        for lam in sorted(grid):
            accs, losses = [], []
            for tr, va in splits:
                clf = fit(x[tr], y[tr], lam)
                accs.append(float((clf.predict(x[va]) == y[va]).mean()))
                proba = clf.predict_proba(x[va])
                col = np.searchsorted(clf.classes_, y[va])
                losses.append(float(-np.log(np.clip(proba[np.arange(len(va)), col], 1e-12, None)).mean()))
                bar.update()
            key = (round(float(np.mean(accs)), 9), -round(float(np.mean(losses)), 9), lam)
            if best_key is None or key >= best_key:
                best, best_key = lam, key
    return float(best)


@dataclass
class EvalResult:
    """One evaluation, repeated over draws: accuracy and per-class mean accuracy per draw, λ per draw."""

    name: str
    accuracy: list[float]
    class_mean_accuracy: list[float]
    reg: list[float | None] = field(default_factory=list)
    num_labelled: list[int] = field(default_factory=list)
    labelled_sets: list[str] = field(default_factory=list)  # the subset files, when not random draws

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracy))

    @property
    def std(self) -> float:
        return float(np.std(self.accuracy))

    @property
    def class_mean(self) -> float:
        return float(np.mean(self.class_mean_accuracy))

    @property
    def class_std(self) -> float:
        return float(np.std(self.class_mean_accuracy))

    def to_dict(self) -> dict:
        out = {"mean": self.mean, "std": self.std, "class_mean": self.class_mean, "class_std": self.class_std,
               "accuracy": self.accuracy, "class_mean_accuracy": self.class_mean_accuracy, "reg": self.reg,
               "num_labelled": self.num_labelled}
        return {**out, "labelled_sets": self.labelled_sets} if self.labelled_sets else out


def _score(clf, test_x, test_y) -> tuple[float, float]:
    pred = clf.predict(test_x)
    return float((pred == test_y).mean()), class_mean_accuracy(pred, test_y)


def _draw_rng(seed: int, tag: int, draw: int) -> np.random.Generator:
    """One generator per (seed, setting, draw): a draw does not depend on which other settings ran."""
    return np.random.default_rng([seed, tag, draw])


def _subset_eval(name, train_x, train_y, test_x, test_y, draw_fn, draws, seed, reg, grid, fit):
    """Fit and score once per labelled set `draw_fn(d)`, d < draws (indices into the train arrays)."""
    accs, cmeans, regs, sizes = [], [], [], []
    for d in track(range(draws), f"{name}: labelled sets", log, unit="set"):
        idx = draw_fn(d)
        x, y = train_x[idx], train_y[idx]
        lam = choose_reg(x, y, grid, seed=seed + d, fit=fit) if reg == "cv" else float(reg)
        acc, cmean = _score(fit(x, y, lam), test_x, test_y)
        accs.append(acc)
        cmeans.append(cmean)
        regs.append(lam)
        sizes.append(len(idx))
    return name, accs, cmeans, regs, sizes


def lowshot_eval(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 shots: Sequence[int] = (1, 2, 5), draws: int = 5, seed: int = 0,
                 reg: float | str = 1e-4, grid: Sequence[float] = REG_GRID,
                 fit: Callable = fit_logreg) -> list[EvalResult]:
    """Logistic regression trained on `shots` images per class of (train_x, train_y), scored on the test set.

    reg: λ of the objective mean(loss) + λ/2·‖W‖² (cyanure's convention), i.e. sklearn C = 1/(n·λ);
    or "cv" to choose it per draw inside the labelled images (see `choose_reg`).
    """
    train_x, test_x = preprocess(train_x), preprocess(test_x)
    out = []
    for k in shots:
        res = _subset_eval(
            f"{k}-shot", train_x, train_y, test_x, test_y,
            lambda d, k=k: draw_labelled(train_y, k, _draw_rng(seed, k, d)), draws, seed, reg, grid, fit)
        out.append(EvalResult(*res))
    return out


def fraction_eval(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                  fractions: Sequence[float] = (0.01, 0.1), draws: int = 5, seed: int = 0,
                  reg: float | str = "cv", grid: Sequence[float] = REG_GRID,
                  fit: Callable = fit_logreg) -> list[EvalResult]:
    """As `lowshot_eval`, with a stratified fraction of the training labels (1%, 10%) per draw."""
    train_x, test_x = preprocess(train_x), preprocess(test_x)
    out = []
    for f in fractions:
        tag = 1_000_000 + int(round(f * 1e6))
        res = _subset_eval(f"{100 * f:g}% labels", train_x, train_y, test_x, test_y,
                           lambda d, f=f, tag=tag: draw_fraction(train_y, f, _draw_rng(seed, tag, d)), draws, seed,
                           reg, grid, fit)
        out.append(EvalResult(*res))
    return out


def subset_name(labels: np.ndarray, num_train: int, num_classes: int) -> str:
    """"k-shot subset" when a labelled set holds k images of each of the classes, else "p% labels subset"."""
    counts = np.bincount(np.unique(labels, return_inverse=True)[1])
    if len(counts) == num_classes and counts.min() == counts.max():
        return f"{int(counts[0])}-shot subset"
    return f"{100 * len(labels) / num_train:.3g}% labels subset"


def subset_eval(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                subsets: dict[str, np.ndarray], seed: int = 0, reg: float | str = "cv",
                grid: Sequence[float] = REG_GRID, fit: Callable = fit_logreg) -> list[EvalResult]:
    """As `lowshot_eval` on fixed labelled sets (file name -> indices into the train arrays) instead of
    random draws. Sets of one kind (`subset_name`: the 1-image files of imagenet_subsets1/2/3) are the
    draws of one result, so mean ± std is over the files, as the paper's over its three splits."""
    train_x, test_x = preprocess(train_x), preprocess(test_x)
    groups: dict[str, list[str]] = {}
    for file, idx in subsets.items():
        groups.setdefault(subset_name(train_y[idx], len(train_y), len(np.unique(train_y))), []).append(file)
    out = []
    for name, files in groups.items():
        res = _subset_eval(name, train_x, train_y, test_x, test_y, lambda d, files=files: subsets[files[d]],
                           len(files), seed, reg, grid, fit)
        out.append(EvalResult(*res, labelled_sets=files))
    return out


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 seed: int = 0, grid: Sequence[float] = REG_GRID, holdout: float = 0.1,
                 fit: Callable = fit_logreg) -> EvalResult:
    """Logistic regression on ALL training labels; λ chosen on a stratified `holdout` of the training set
    (accuracy, ties to the larger λ), then refitted on the whole training set. One result (no draws).

    Not the official SGD linear evaluation (LayerNorm + L2-norm + Linear, 100 epochs, augmentations):
    a convex probe on the same frozen features, which needs no schedule and no GPU.
    """
    from sklearn.model_selection import train_test_split

    train_x, test_x = preprocess(train_x), preprocess(test_x)
    counts = np.bincount(np.unique(train_y, return_inverse=True)[1])
    lam = ONE_SHOT_REG
    if counts.min() >= 2 and len(grid) > 1:
        n_val = max(int(round(holdout * len(train_y))), len(counts))
        tr, va = train_test_split(np.arange(len(train_y)), test_size=n_val, stratify=train_y, random_state=seed)
        scores = [(float((fit(train_x[tr], train_y[tr], g).predict(train_x[va]) == train_y[va]).mean()), g)
                  for g in track(sorted(grid), "linear probe: λ search", log, unit="fit")]
        lam = max(scores)[1]
    elif len(grid) == 1:
        lam = float(grid[0])
    acc, cmean = _score(fit(train_x, train_y, lam), test_x, test_y)
    return EvalResult("linear (all labels)", [acc], [cmean], [lam], [len(train_y)])


@torch.no_grad()
def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, k: int = 20,
                temperature: float | None = 0.07, chunk: int = 1024) -> np.ndarray:
    """Class predictions of the cosine k-NN described in the module docstring ([N_test] labels)."""
    tr = torch.nn.functional.normalize(torch.as_tensor(train_x, dtype=torch.float32), dim=1)
    te = torch.nn.functional.normalize(torch.as_tensor(test_x, dtype=torch.float32), dim=1)
    classes, y = np.unique(train_y, return_inverse=True)
    y = torch.as_tensor(y)
    k = min(k, len(tr))
    preds = []
    for s in range(0, len(te), chunk):
        sim, nn_idx = (te[s:s + chunk] @ tr.T).topk(k, dim=1)  # (b, k), sorted by similarity
        weight = (sim / temperature).exp() if temperature else torch.ones_like(sim)
        if not temperature:  # plain majority: ties go to the nearest neighbour's class
            weight = weight + 1e-6 * torch.linspace(1, 0, k).expand_as(sim)
        votes = torch.zeros(len(sim), len(classes), dtype=torch.float64)
        votes.scatter_add_(1, y[nn_idx], weight.double())
        preds.append(votes.argmax(1))
    return classes[torch.cat(preds).numpy()] if preds else np.zeros(0, train_y.dtype)


def knn_eval(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, k: int = 20,
             temperature: float | None = 0.07) -> EvalResult:
    """k-NN accuracy on the test set, with every training image as a neighbour candidate."""
    pred = knn_predict(train_x, train_y, test_x, k, temperature)
    vote = f"T={temperature:g}" if temperature else "majority"
    return EvalResult(f"{k}-NN ({vote})", [float((pred == test_y).mean())], [class_mean_accuracy(pred, test_y)],
                      [None], [len(train_y)])


def format_table(rows: dict[str, list[EvalResult]]) -> str:
    """Rows of 'name: k-shot mean ± std' as a fixed-width table."""
    shots = [r.name for r in next(iter(rows.values()))]
    head = f"{'features':<22}" + "".join(f"{k:>16}" for k in shots)
    lines = [head]
    for name, res in rows.items():
        lines.append(f"{name:<22}" + "".join(f"{100 * r.mean:>9.1f} ± {100 * r.std:<4.1f}" for r in res))
    return "\n".join(lines)


def format_results(results: Sequence[EvalResult]) -> str:
    """One line per evaluation: accuracy and per-class mean accuracy (%, mean ± std over draws), λ, labels."""
    lines = [f"{'evaluation':<20}{'draws':>6}{'labelled':>10}{'top-1 %':>16}{'class-mean %':>16}  λ (per draw)"]
    for r in results:
        lam = ", ".join("-" if v is None else f"{v:.0e}" for v in r.reg)
        n = int(np.mean(r.num_labelled)) if r.num_labelled else 0
        lines.append(f"{r.name:<20}{len(r.accuracy):>6}{n:>10}{100 * r.mean:>9.1f} ± {100 * r.std:<4.1f}"
                     f"{100 * r.class_mean:>9.1f} ± {100 * r.class_std:<4.1f}  {lam}")
    return "\n".join(lines)


REPORT_NAMES = {"target": "msn (target encoder)", "random_init": "random-init encoder", "raw_pixels": "raw pixels"}
"""The end-of-run report's name of each feature set (keys of lowshot.json's "results")."""


def lowshot_report(model: MSN, cfg: Config, train_source, test_source, device, shots=(1, 2, 5)) -> dict:
    """The trainer's end-of-run report: low-shot accuracy (mean ± std over cfg.run.eval_draws draws, λ by "cv")
    of the trio of msn_fast/features.py; logs a table and returns what lowshot.json holds."""
    tf = eval_transform(cfg.data.global_size)
    model = plain_copy(model, cfg, device)  # unsharded, unwrapped weights (the run may use FSDP/AC/compile)
    model.eval()
    extractors = {REPORT_NAMES[kind]: feature_fn(trio_trunk(kind, model.target.trunk, cfg, cfg.run.seed + 12345,
                                                            device)) for kind in FEATURE_SETS}
    rows, report = {}, {"shots": list(shots), "draws": cfg.run.eval_draws, "results": {}}
    n = len(extractors)  # one pass per split: each image decoded once for all feature sets
    xtr, ytr, _ = extract_feature_sets(extractors, train_source, tf, device=device, desc=f"train images ({n} sets)")
    xte, yte, _ = extract_feature_sets(extractors, test_source, tf, device=device, desc=f"test images ({n} sets)")
    for name in track(extractors, "low-shot report: feature sets", log, unit="set"):
        res = lowshot_eval(xtr[name], ytr, xte[name], yte, shots=shots, draws=cfg.run.eval_draws, seed=cfg.run.seed,
                           reg="cv")
        rows[name] = res
        report["results"][name] = {r.name: r.to_dict() for r in res}
    log.info("low-shot top-1 accuracy (%%, mean ± std over %d draws; %d test images):\n%s", cfg.run.eval_draws,
             len(test_source), format_table(rows))
    return report


def _plotted(name: str) -> bool:
    """The label-efficiency results (k-shot, % labels, their subset forms); not k-NN or the linear probe."""
    return name.endswith(("-shot", "% labels", " subset"))


def plot_results(reports: Sequence[dict], png) -> object:
    """Top-1 accuracy against labelled images per class (log x), error bars = std over the draws; one series per
    feature set (and per kind of labelled set: random draws, subset files). Writes `png`, returns the Figure.

    `reports`: msn_fast.eval reports ("features", "num_classes", "chance", "data", "results" as to_dict()).
    Raises ImportError without matplotlib (the `bench` extra)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot()
    ticks: dict[float, str] = {}
    for i, rep in enumerate(reports):
        for subset in (False, True):
            pts = sorted((float(np.mean(r["num_labelled"])) / rep["num_classes"], 100 * r["mean"], 100 * r["std"],
                          name.removesuffix(" subset")) for name, r in rep["results"].items()
                         if _plotted(name) and name.endswith(" subset") == subset)
            if not pts:
                continue
            xs, ys, errs, names = zip(*pts)
            ticks.update({round(x, 3): n for x, n in zip(xs, names)})
            ax.errorbar(xs, ys, yerr=errs, color=f"C{i}", marker="s" if subset else "o", linestyle="--" if subset
                        else "-", capsize=3, label=rep["features"] + (" (subset files)" if subset else ""))
    if reports:
        ax.axhline(100 * reports[0]["chance"], color="gray", linestyle=":", label="chance")
    ax.set_xscale("log")
    ax.set_xticks(list(ticks), labels=[f"{x:.3g}\n{n}" for x, n in ticks.items()])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="labelled images per class (log scale)", ylabel="top-1 accuracy (%)",
           title="Label efficiency: logistic regression on frozen features (mean ± std over draws)")
    ax.title.set_fontsize(10)
    if reports:
        fig.text(0.01, 0.01, reports[0]["data"], fontsize=7, color="dimgray")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(png, dpi=120)
    return fig
