"""The end-of-run low-shot report: the trained target encoder against a random-init encoder and raw pixels."""

from __future__ import annotations

import logging

import torch

from msn_fast.dataloading import eval_transform

from .config import Config
from .evaluation import extract_features, format_table, lowshot_eval
from .model import MSN

log = logging.getLogger(__name__)


def run_lowshot(model: MSN, cfg: Config, train_source, test_source, device, shots=(1, 2, 5)) -> dict:
    """Low-shot accuracy (mean ± std over cfg.run.eval_draws draws) of three feature sets; logs a table."""
    tf = eval_transform(cfg.data.global_size)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed + 12345)
        random_trunk = MSN(cfg).student.trunk.to(device).eval()
    extractors = {
        "msn (target encoder)": model.target.trunk.extract_features,
        "random-init encoder": random_trunk.extract_features,
        "raw pixels": lambda x: x.flatten(1),
    }
    rows, report = {}, {"shots": list(shots), "draws": cfg.run.eval_draws, "results": {}}
    for name, fn in extractors.items():
        xtr, ytr = extract_features(fn, train_source, tf, device=device)
        xte, yte = extract_features(fn, test_source, tf, device=device)
        res = lowshot_eval(xtr, ytr, xte, yte, shots=shots, draws=cfg.run.eval_draws, seed=cfg.run.seed)
        rows[name] = res
        report["results"][name] = {
            f"{r.shots}-shot": {"mean": r.mean, "std": r.std, "accuracy": r.accuracy,
                                "class_mean_accuracy": r.class_mean_accuracy} for r in res
        }
    model.train(was_training)
    log.info("low-shot top-1 accuracy (%%, mean ± std over %d draws; %d test images):\n%s", cfg.run.eval_draws,
             len(test_source), format_table(rows))
    return report
