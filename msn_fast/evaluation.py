"""Low-shot evaluation: logistic regression on frozen features with 1, 2, 5 labelled images per class.

As the official logistic_eval.py: features are the target encoder's CLS token of the last block,
before the final LayerNorm, of one centre crop; each feature row is centred and L2-normalised;
an L2-regularised multinomial logistic regression (scikit-learn here, cyanure there) is fitted on
k images per class, drawn at random several times, and scored on a held-out test split.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)


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


@dataclass
class ShotResult:
    shots: int
    accuracy: list[float]  # one per draw
    class_mean_accuracy: list[float]  # per-class accuracy averaged over classes, one per draw

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracy))

    @property
    def std(self) -> float:
        return float(np.std(self.accuracy))


def lowshot_eval(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 shots: Sequence[int] = (1, 2, 5), draws: int = 5, seed: int = 0,
                 reg: float = 1e-4) -> list[ShotResult]:
    """Logistic regression trained on `shots` images per class of (train_x, train_y), scored on the test set.

    reg: λ of the objective mean(loss) + λ/2·‖W‖² (cyanure's convention), i.e. sklearn C = 1/(n·λ).
    """
    from sklearn.linear_model import LogisticRegression

    train_x, test_x = preprocess(train_x), preprocess(test_x)
    rng = np.random.default_rng(seed)
    classes = np.unique(test_y)
    results = []
    for k in shots:
        accs, cmeans = [], []
        for _ in range(draws):
            idx = draw_labelled(train_y, k, rng)
            clf = LogisticRegression(C=1.0 / (len(idx) * reg), max_iter=1000)
            clf.fit(train_x[idx], train_y[idx])
            pred = clf.predict(test_x)
            accs.append(float((pred == test_y).mean()))
            cmeans.append(float(np.mean([(pred[test_y == c] == c).mean() for c in classes])))
        results.append(ShotResult(k, accs, cmeans))
    return results


def format_table(rows: dict[str, list[ShotResult]]) -> str:
    """Rows of 'name: k-shot mean ± std' as a fixed-width table."""
    shots = [r.shots for r in next(iter(rows.values()))]
    head = f"{'features':<22}" + "".join(f"{f'{k}-shot':>16}" for k in shots)
    lines = [head]
    for name, res in rows.items():
        lines.append(f"{name:<22}" + "".join(f"{100 * r.mean:>9.1f} ± {100 * r.std:<4.1f}" for r in res))
    return "\n".join(lines)
