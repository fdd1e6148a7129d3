"""WebDataset shards: the writer (tars, labels, DALI index), the torch reader (epochs, ranks, resume, broken and lost
samples, one-line errors) and the trainer on a shard pattern. Shards are written from generated images."""

from __future__ import annotations

import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("webdataset", reason="WebDataset shards need the webdataset package (pip install -e .[dev])")

from msn_fast.dataloading import DataError  # noqa: E402
from msn_fast.dataloading.recipe import ViewRecipe  # noqa: E402
from msn_fast.dataloading.shards import (  # noqa: E402
    ShardLoader,
    ensure_index,
    index_path,
    main,
    open_shards,
    write_shards,
)

RECIPE = ViewRecipe(global_size=16, focal_size=8, num_focal=2)


def _images(root: Path, n: int, seed: int = 0) -> list[Path]:
    """n images, each in a class folder of its own, so a label names its image."""
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        d = root / f"c{i:03d}"
        d.mkdir(parents=True)
        f = d / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, (12 + i % 5, 20, 3), dtype=np.uint8)).save(f)
        files.append(f)
    return files


def _shards(tmp_path, n=14, size=4, broken=()):
    files = _images(tmp_path / "img", n)
    for i in broken:
        files[i].write_bytes(b"not an image at all")
    paths = write_shards(tmp_path / "img", tmp_path / "out", size, progress=False)
    return paths, open_shards(str(tmp_path / "out" / f"shard-{{000000..{len(paths) - 1:06d}}}.tar"))


def _epoch(loader, epoch, start=0):
    loader.set_position(epoch, start)
    return list(loader)


def test_writer_tars_labels_and_dali_index(tmp_path, capsys):
    files = _images(tmp_path / "img", 10)
    assert main([str(tmp_path / "img"), str(tmp_path / "out"), "--shard-size", "4"]) == 0
    out = capsys.readouterr().out
    assert f"--data.path '{tmp_path / 'out' / 'shard-{000000..000002}.tar'}'" in out, out
    tars = sorted((tmp_path / "out").glob("*.tar"))
    assert [t.name for t in tars] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert not list((tmp_path / "out").glob("*.partial"))
    seen = {}
    for t in tars:
        lines = index_path(t).read_text().splitlines()
        version, count = lines[0].split()
        assert version == "v1.2" and int(count) == len(lines) - 1
        raw = t.read_bytes()
        with tarfile.open(t) as tf:
            names = sorted(m.name for m in tf)
        assert names == sorted(f.split()[i + 3] for f in lines[1:] for i in range(0, len(f.split()), 4))
        for line in lines[1:]:  # every component's offset and size address its bytes in the tar (DALI reads so)
            parts = line.split()
            comp = {parts[i]: raw[int(parts[i + 1]):int(parts[i + 1]) + int(parts[i + 2])]
                    for i in range(0, len(parts), 4)}
            key = int(parts[3].split(".")[0])
            seen[key] = comp
    assert sorted(seen) == list(range(10))
    first = sorted(int(n.split(".")[0]) for n in tarfile.open(tars[0]).getnames())
    assert first != [0, 0, 1, 1, 2, 2, 3, 3]  # written in a seeded random order, not class by class
    for i, f in enumerate(files):  # the file's own bytes, and its class index
        assert seen[i]["png"] == f.read_bytes()
        assert int(seen[i]["cls"]) == i
    assert [len(x) for x in [open_shards(str(t)) for t in tars]] == [4, 4, 2]
    # a second write into the same folder is refused, one line
    assert main([str(tmp_path / "img"), str(tmp_path / "out"), "--shard-size", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds shard-*.tar" in err[0], err


def test_an_epoch_sees_each_sample_once_and_ranks_are_disjoint(tmp_path):
    _, shards = _shards(tmp_path, n=16, size=4)
    one = ShardLoader(shards, RECIPE, 4, num_workers=0, seed=3)
    batches = _epoch(one, 0)
    assert one.batches_per_epoch == len(batches) == 4  # shards of a multiple of the batch: nothing dropped
    b = batches[0]
    assert b.globals.shape == (2, 4, 3, 16, 16) and b.focals.shape == (2, 4, 3, 8, 8)
    labels = torch.cat([b.labels for b in batches]).tolist()
    assert sorted(labels) == list(range(16))
    assert torch.cat([b.labels for b in _epoch(one, 1)]).tolist() != labels  # reshuffled each epoch
    ranks = [ShardLoader(shards, RECIPE, 2, rank=r, world=2, num_workers=2, seed=3) for r in (0, 1)]
    got = [torch.cat([b.labels for b in _epoch(rk, 5)]).tolist() for rk in ranks]
    assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch == len(got[0]) // 2 == len(got[1]) // 2
    assert not set(got[0]) & set(got[1])
    assert len(set(got[0])) == len(got[0])


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_resume_at_every_batch_gives_the_rest_of_the_epoch_exactly(tmp_path, workers):
    """Shards of 4, 4, 4, 2 samples (workers run out at different times): the epoch resumed at batch k yields
    exactly batches k.. of the uninterrupted epoch, views included."""
    _, shards = _shards(tmp_path, n=14, size=4)
    loader = ShardLoader(shards, RECIPE, 2, num_workers=workers, seed=1)
    full = _epoch(loader, 3)
    assert len(full) == loader.batches_per_epoch >= 5
    for k in range(1, len(full) + 1):
        rest = _epoch(loader, 3, k)
        assert len(rest) == len(full) - k == len(loader)
        for a, b in zip(full[k:], rest):
            assert torch.equal(a.labels, b.labels), k
            assert torch.equal(a.globals, b.globals) and torch.equal(a.focals, b.focals), k


def test_broken_sample_is_replaced_warned_and_counted_once(tmp_path, caplog):
    _, shards = _shards(tmp_path, n=16, size=4, broken=[5])
    loader = ShardLoader(shards, RECIPE, 4, num_workers=2, seed=0)
    with caplog.at_level(logging.WARNING, logger="msn_fast.dataloading"):
        first = _epoch(loader, 0)
        second = _epoch(loader, 1)
    assert len(first) == len(second) == 4  # every slot filled: the broken one by a readable sample
    assert sum(b.skipped for b in first) == 1
    assert list(loader.unreadable) == [f"{shards.urls[1]}:000000005.png"]
    warned = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warned) == 1 and "000000005.png" in warned[0], warned
    labels = torch.cat([b.labels for b in first]).tolist()
    assert 5 not in labels and len(labels) == 16 and len(set(labels)) == 15


def test_a_damaged_tar_loses_only_its_tail(tmp_path, caplog):
    """A shard cut in the middle: counted from its headers when its index is older, read up to the damage; when
    a stale index still promises its samples, the missing ones are replaced; both reported once."""
    paths, _ = _shards(tmp_path, n=12, size=4)
    victim = paths[1]
    data = victim.read_bytes()
    victim.write_bytes(data[:len(data) // 3])
    pattern = str(tmp_path / "out" / "shard-{000000..000002}.tar")
    with caplog.at_level(logging.WARNING):
        shards = open_shards(pattern)
    assert shards.counts[0] == shards.counts[2] == 4 and shards.counts[1] < 4
    assert f"shard {victim} is damaged after {shards.counts[1]} samples" in caplog.text
    loader = ShardLoader(shards, RECIPE, 2, num_workers=0, seed=0)
    assert len(_epoch(loader, 0)) == loader.batches_per_epoch == (8 + shards.counts[1]) // 2
    st = os.stat(victim)
    os.utime(index_path(victim), (st.st_atime + 10, st.st_mtime + 10))  # the stale index now looks current
    stale = open_shards(pattern)
    assert stale.counts == [4, 4, 4]
    loader = ShardLoader(stale, RECIPE, 2, num_workers=0, seed=0)
    assert len(_epoch(loader, 0)) == loader.batches_per_epoch == 6
    lost = [why for name, why in loader.unreadable.items() if name.startswith("lost:")]
    assert len(lost) == 1 and str(victim) in lost[0] and "fewer than their index says" in lost[0], loader.unreadable
    index_path(victim).unlink()
    with pytest.raises(DataError, match="is damaged"):  # DALI's index is not built from a damaged tar
        ensure_index(victim)


def test_missing_empty_and_unusable_shards_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match=r"2 of the 2 shards of .* do not exist \(e.g. .*x-0.tar\)"):
        open_shards(str(tmp_path / "x-{0..1}.tar"))
    _, shards = _shards(tmp_path / "a", n=6, size=3)
    with pytest.raises(DataError, match="too few for batch size 8"):
        ShardLoader(shards, RECIPE, 8, num_workers=0)
    with pytest.raises(DataError, match="for 3 processes"):
        ShardLoader(shards, RECIPE, 2, rank=0, world=3, num_workers=0)
    _, bad = _shards(tmp_path / "b", n=4, size=4, broken=range(4))
    with pytest.raises(DataError, match="none of the 4 samples .* could be decoded"):
        _epoch(ShardLoader(bad, RECIPE, 2, num_workers=0), 0)


def test_ensure_index_builds_a_missing_index(tmp_path):
    paths, _ = _shards(tmp_path, n=5, size=5)
    idx = index_path(paths[0])
    want = idx.read_text()
    idx.unlink()
    assert ensure_index(paths[0]) == idx and idx.read_text() == want


def test_trainer_runs_and_resumes_on_a_shard_pattern(tmp_path, capfd):
    from msn_fast.train import main as train

    _images(tmp_path / "img", 16)
    write_shards(tmp_path / "img", tmp_path / "out", 4, progress=False)
    tiny = ["--vit.dim", "16", "--vit.depth", "1", "--vit.heads", "2", "--head.hidden_dim", "16", "--head.out_dim",
            "8", "--head.num_prototypes", "8", "--vit.img_size", "16", "--data.global_size", "16",
            "--data.focal_size", "8", "--data.num_focal", "2", "--data.batch_size", "4", "--data.num_workers", "0",
            "--run.eval_lowshot", "false", "--data.path", str(tmp_path / "out" / "shard-{000000..000003}.tar")]
    out = tmp_path / "run"
    assert train([*tiny, "--run.out_dir", str(out), "--run.max_steps", "3", "--run.checkpoint_every", "2"]) == 0
    err = capfd.readouterr().err
    assert "4 WebDataset shard(s)" in err and "16 images" in err, err
    assert train([*tiny, "--run.out_dir", str(out), "--run.max_steps", "6", "--run.resume", "true"]) == 0
    assert "resumed from" in capfd.readouterr().err
    from msn_fast.dataloading import dali_available

    if dali_available():  # DALI's own webdataset reader (tests/test_dali_shards.py tests it in depth)
        assert train([*tiny, "--run.out_dir", str(tmp_path / "d"), "--run.max_steps", "2", "--data.backend",
                      "dali"]) == 0
        assert "4 WebDataset shard(s)" in capfd.readouterr().err
