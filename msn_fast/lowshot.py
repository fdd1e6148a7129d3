"""The end-of-run low-shot report: the trained target encoder against a random-init encoder and raw pixels.

Same protocol as `python -m msn_fast.eval` (msn_fast/evaluation.py): λ cross-validated inside each
labelled draw (1e-3 at one image per class); accuracy and per-class mean accuracy per draw. Progress of the
extraction, draws and λ search: msn_fast/progress.py (a bar on a terminal, log lines in train.log).
"""

from __future__ import annotations

import logging

import torch

from msn_fast.dataloading import eval_transform

from .config import Config
from .evaluation import extract_feature_sets, format_table, lowshot_eval
from .model import MSN
from .progress import track

log = logging.getLogger(__name__)


def plain_copy(model: MSN, cfg: Config, device) -> MSN:
    """A plain single-process MSN holding `model`'s full weights (gathers FSDP shards; drops AC/compile wrappers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    plain = MSN(cfg).to(device)
    plain.load_state_dict(state)
    return plain


def run_lowshot(model: MSN, cfg: Config, train_source, test_source, device, shots=(1, 2, 5)) -> dict:
    """Low-shot accuracy (mean ± std over cfg.run.eval_draws draws) of three feature sets; logs a table."""
    tf = eval_transform(cfg.data.global_size)
    model = plain_copy(model, cfg, device)  # unsharded, unwrapped weights (the run may use FSDP/AC/compile)
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
