"""The trainer's data sources from the config: what it pre-trains on and what its end-of-run report scores.

`data.path` decides: None is the embedded digits, a tar or brace pattern of tars is WebDataset shards, a folder
with train/ and val/ or test/ splits pre-trains on train and scores the held-out split, any other folder
pre-trains on all its images. Here rather than in dataloading/ because it reads the Config (dataloading
imports nothing of msn_fast); each source itself is dataloading's.
"""

from __future__ import annotations

import logging
from pathlib import Path

from msn_fast.dataloading import DataError, Digits, ImageFolder
from msn_fast.dataloading.shards import is_shard_pattern, open_shards
from msn_fast.dataloading.sources import find_splits, split_layout

from .config import Config

log = logging.getLogger("msn_fast.train")  # the trainer's lines (the format does not show the name)


def build_sources(cfg: Config):
    """(pre-training source, low-shot train source or None, low-shot held-out source or None).

    A DIR with the splits of `python -m msn_fast.eval` (train/ + val/ or test/ class folders, or train.txt +
    val.txt or test.txt lists; val before test unless data.eval_split says; BACKGROUND_Google left out) pre-trains
    on its train split and scores the end-of-run low-shot evaluation on the held-out one; any other DIR pre-trains
    on all its images; a tar or brace pattern of tars pre-trains on WebDataset shards (no evaluation).
    """
    if cfg.data.path is None:
        size = cfg.data.global_size
        train, test = Digits("train", size), Digits("test", size)
        log.info("data: the embedded digits; pre-training on train (%d images), low-shot evaluation on test "
                 "(%d images)", len(train), len(test))
        return train, Digits("train", size), test
    if is_shard_pattern(cfg.data.path):
        shards = open_shards(cfg.data.path)
        log.info("data: %d WebDataset shard(s) %s (%d samples); no low-shot evaluation (shards hold no held-out "
                 "split: score the run with python -m msn_fast.eval on an image folder)", len(shards.urls),
                 shards.pattern, len(shards))
        return shards, None, None
    root = Path(cfg.data.path)
    layout = split_layout(root, cfg.data.eval_split) if root.is_dir() else None
    if layout is None:
        return ImageFolder(root), None, None
    try:
        splits = find_splits(root, eval_split=cfg.data.eval_split)
    except DataError as e:
        if layout[0] == "lists":
            raise
        train = ImageFolder(root / "train")
        log.warning("data: pre-training on %s (%d images); no low-shot evaluation: %s", train.root, len(train), e)
        return train, None, None
    log.info("data: %s; pre-training on train (%d images), low-shot evaluation on %s (%d images)", splits.layout,
             len(splits.train), splits.held_out_name, len(splits.held_out))
    return splits.train, splits.train, splits.held_out
