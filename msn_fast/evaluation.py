"""Label-efficiency evaluation on frozen features: low-shot and label-fraction logistic regression,
linear probe, k-NN. Pure numpy/scikit-learn/torch on feature arrays; `msn_fast.eval` is the CLI.

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
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

log = logging.getLogger(__name__)

REG_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
"""λ values tried by cross-validation (official values in use range from 2.5e-4 to 0.075)."""
ONE_SHOT_REG = 1e-3
"""λ at one image per class, where nothing can be cross-validated (a fixed, documented default)."""
MAX_FOLDS = 3


@torch.no_grad()
def extract_features(fn: Callable[[torch.Tensor], torch.Tensor], source: Sequence, transform,
                     batch_size: int = 256, device="cpu") -> tuple[np.ndarray, np.ndarray]:
    """Apply `fn` (images [B,3,S,S] -> features [B,D]) to every readable image of `source`.

    Returns (features [N, D] float32, labels [N]); unreadable images are left out.
    """
    feats, labels, batch, batch_labels = [], [], [], []

    def flush():
        if batch:
            x = torch.stack(batch).to(device)
            feats.append(fn(x).float().cpu())
            labels.extend(batch_labels)
            batch.clear()
            batch_labels.clear()

    for i in range(len(source)):
        img, label = source[i]
        if img is None:
            continue
        batch.append(transform(img))
        batch_labels.append(label)
        if len(batch) == batch_size:
            flush()
    flush()
    if not feats:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return torch.cat(feats).numpy(), np.asarray(labels)


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
    for lam in sorted(grid):
        accs, losses = [], []
        for tr, va in splits:
            clf = fit(x[tr], y[tr], lam)
            accs.append(float((clf.predict(x[va]) == y[va]).mean()))
            proba = clf.predict_proba(x[va])
            col = np.searchsorted(clf.classes_, y[va])
            losses.append(float(-np.log(np.clip(proba[np.arange(len(va)), col], 1e-12, None)).mean()))
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
        return {"mean": self.mean, "std": self.std, "class_mean": self.class_mean, "class_std": self.class_std,
                "accuracy": self.accuracy, "class_mean_accuracy": self.class_mean_accuracy, "reg": self.reg,
                "num_labelled": self.num_labelled}


class ShotResult(EvalResult):
    """k images per class; `ShotResult(k, accuracy, class_mean_accuracy)` as before, named "k-shot"."""

    def __init__(self, shots: int, accuracy: list[float], class_mean_accuracy: list[float],
                 reg: list | None = None, num_labelled: list | None = None):
        super().__init__(f"{shots}-shot", accuracy, class_mean_accuracy, reg or [], num_labelled or [])
        self.shots = shots


def _score(clf, test_x, test_y) -> tuple[float, float]:
    pred = clf.predict(test_x)
    return float((pred == test_y).mean()), class_mean_accuracy(pred, test_y)


def _draw_rng(seed: int, tag: int, draw: int) -> np.random.Generator:
    """One generator per (seed, setting, draw): a draw does not depend on which other settings ran."""
    return np.random.default_rng([seed, tag, draw])


def _subset_eval(name, train_x, train_y, test_x, test_y, draw_fn, tag, draws, seed, reg, grid, fit):
    accs, cmeans, regs, sizes = [], [], [], []
    for d in range(draws):
        idx = draw_fn(train_y, _draw_rng(seed, tag, d))
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
                 fit: Callable = fit_logreg) -> list[ShotResult]:
    """Logistic regression trained on `shots` images per class of (train_x, train_y), scored on the test set.

    reg: λ of the objective mean(loss) + λ/2·‖W‖² (cyanure's convention), i.e. sklearn C = 1/(n·λ);
    or "cv" to choose it per draw inside the labelled images (see `choose_reg`).
    """
    train_x, test_x = preprocess(train_x), preprocess(test_x)
    out = []
    for k in shots:
        _, accs, cmeans, regs, sizes = _subset_eval(
            f"{k}-shot", train_x, train_y, test_x, test_y, lambda y, rng, k=k: draw_labelled(y, k, rng), k, draws,
            seed, reg, grid, fit)
        out.append(ShotResult(k, accs, cmeans, regs, sizes))
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
                           lambda y, rng, f=f: draw_fraction(y, f, rng), tag, draws, seed, reg, grid, fit)
        out.append(EvalResult(*res))
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
                  for g in sorted(grid)]
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


def format_table(rows: dict[str, list[ShotResult]]) -> str:
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
