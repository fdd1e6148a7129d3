"""Dataset layouts of `msn_fast.eval` and the trainer: train/ + val/ (ImageNet), train/ + test/, lists, and the
official ImageNet subset files (`--subset-file`), on tiny generated images."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from msn_fast.config import Config
from msn_fast.data_sources import build_sources
from msn_fast.dataloading import DataError
from msn_fast.dataloading.sources import find_splits, subset_indices
from msn_fast.eval import main

WNIDS = ["n01440764", "n01443537", "n02102040"]  # ImageNet class folders and file-name prefixes
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 50, 230)]


def _image(path, colour, seed):
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour)[None, None] + rng.normal(0, 25, (12, 12, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _imagenet(root, splits=(("train", 6), ("val", 3))):
    """root/<split>/<wnid>/<wnid>_<split><i>.png, as ImageNet's train/ and its class-sorted val/."""
    for s, n in splits:
        for c, (w, colour) in enumerate(zip(WNIDS, COLOURS)):
            for i in range(n):
                _image(root / s / w / f"{w}_{s}{i}.png", colour, 1000 * len(s) + 100 * c + i)
    return root


@pytest.mark.parametrize("held_out", ["val", "test"])
def test_train_with_val_or_test_folders(tmp_path, held_out):
    root = _imagenet(tmp_path / "d", (("train", 4), (held_out, 2)))
    s = find_splits(root)
    assert s.held_out_name == held_out and len(s.train) == 12 and len(s.held_out) == 6
    assert f"{root}/train + {root}/{held_out}" in s.layout


def test_val_preferred_over_test_unless_asked(tmp_path):
    root = _imagenet(tmp_path / "d", (("train", 4), ("val", 2), ("test", 1)))
    s = find_splits(root)
    assert s.held_out_name == "val" and "val preferred over test" in s.layout
    assert find_splits(root, eval_split="test").held_out_name == "test"
    with pytest.raises(DataError, match="has no test/ to evaluate on"):
        find_splits(_imagenet(tmp_path / "e", (("train", 1), ("val", 1))), eval_split="test")


def test_flat_imagenet_val_is_a_clear_error(tmp_path):
    root = _imagenet(tmp_path / "d", (("train", 2),))
    _image(root / "val" / "ILSVRC2012_val_00000001.png", COLOURS[0], 0)
    with pytest.raises(DataError, match="outside class folders.*sort ImageNet's val/"):
        find_splits(root)


def test_list_layout_with_val_txt(tmp_path):
    root = tmp_path / "lists"
    rows = {"train": [], "val": []}
    for c, w in enumerate(WNIDS):
        for i in range(5):
            rel = f"{w}/img{i}.png"
            _image(root / "images" / rel, COLOURS[c], 10 * c + i)
            rows["train" if i < 3 else "val"].append(rel)
    for s, files in rows.items():
        (root / f"{s}.txt").write_text("\n".join(files) + "\n")
    s = find_splits(root)
    assert s.held_out_name == "val" and len(s.train) == 9 and len(s.held_out) == 6
    assert s.layout == f"lists train.txt + val.txt under {root / 'images'}"


def test_subset_files_match_by_file_name(tmp_path):
    root = _imagenet(tmp_path / "d")
    train = find_splits(root).train
    idx = subset_indices(train, [f"{w}_train1.png" for w in WNIDS], "1imgs_class.txt")
    assert [train.samples[i][0].rsplit("/", 1)[1] for i in idx] == [f"{w}_train1.png" for w in WNIDS]
    assert len(subset_indices(train, [f"{WNIDS[0]}/{WNIDS[0]}_train2.png"], "f")) == 1  # with its folder too
    names = [f"{WNIDS[0]}_train0.png", "n09999999_1.JPEG", "n09999999_2.JPEG"]
    with pytest.raises(DataError, match=r"2 of the 3 images of sub\.txt are not in the train split .*n09999999_1"):
        subset_indices(train, names, "sub.txt")
    with pytest.raises(DataError, match="lists no images"):
        subset_indices(train, [], "empty.txt")


def test_bare_name_in_two_classes_is_ambiguous(tmp_path):
    root = tmp_path / "cifar"
    for c in range(2):
        for s in ("train", "test"):
            _image(root / s / f"c{c}" / "0.png", COLOURS[c], c)
    train = find_splits(root).train
    with pytest.raises(DataError, match="0.png matches 2 images"):
        subset_indices(train, ["0.png"], "f")
    assert len(subset_indices(train, ["c1/0.png"], "f")) == 1


def _eval(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


COMMON = ["--raw-pixels", "--model", "cpu_demo", "--knn-k", "0", "--no-cache", "--no-progress"]


def test_cli_names_the_evaluated_split(tmp_path, capsys):
    root = _imagenet(tmp_path / "d", (("train", 3), ("val", 2), ("test", 1)))
    rc, out, err = _eval(capsys, *COMMON, "--data", root, "--shots", "1", "--fractions", "--draws", "1",
                         "--out", tmp_path / "r.json")
    assert rc == 0, err
    head = out.splitlines()[0]
    assert "9 train / 6 val images, 3 classes; evaluated on val" in head and "val preferred over test" in head
    assert json.loads((tmp_path / "r.json").read_text())["eval_split"] == "val"
    rc, out, err = _eval(capsys, *COMMON, "--data", root, "--shots", "1", "--fractions", "--draws", "1",
                         "--eval-split", "test")
    assert rc == 0, err
    assert "9 train / 3 test images, 3 classes; evaluated on test" in out.splitlines()[0]


def test_cli_subset_files_replace_the_random_draws(tmp_path, capsys):
    root = _imagenet(tmp_path / "d")
    files = []
    for k, split in ((1, 1), (1, 2), (2, 1)):  # two 1-image splits (one setting, 2 draws) and a 2-image split
        f = tmp_path / f"imagenet_subsets{split}" / f"{k}imgs_class.txt"
        f.parent.mkdir(exist_ok=True)
        f.write_text("".join(f"{w}_train{split + j}.png\n" for w in WNIDS for j in range(k)))
        files += ["--subset-file", f]
    rc, out, err = _eval(capsys, *COMMON, "--data", root, *files, "--out", tmp_path / "r.json")
    assert rc == 0, err
    res = json.loads((tmp_path / "r.json").read_text())["results"]
    assert list(res) == ["1-shot subset", "2-shot subset"]  # no random 1/2/5-shot or 1%/10% draws by default
    assert res["1-shot subset"]["num_labelled"] == [3, 3] and len(res["1-shot subset"]["labelled_sets"]) == 2
    assert res["2-shot subset"]["num_labelled"] == [6] and res["2-shot subset"]["mean"] > 0.9
    # asked for too, random draws run beside the subsets
    rc, out, err = _eval(capsys, *COMMON, "--data", root, *files[:2], "--shots", "1", "--fractions", "--draws", "1",
                         "--out", tmp_path / "r2.json")
    assert rc == 0, err
    assert list(json.loads((tmp_path / "r2.json").read_text())["results"]) == ["1-shot subset", "1-shot"]
    # a name not in the train split, or a missing file: one line
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{WNIDS[0]}_train0.png\nn01440764_99999.JPEG\n")
    rc, out, err = _eval(capsys, *COMMON, "--data", root, "--subset-file", bad)
    assert rc == 2 and err == (f"error: 1 of the 2 images of {bad} are not in the train split {root}/train "
                               "(e.g. n01440764_99999.JPEG)\n")
    rc, out, err = _eval(capsys, *COMMON, "--data", root, "--subset-file", tmp_path / "nope.txt")
    assert rc == 2 and "does not exist" in err and err.count("\n") == 1


def test_cli_unreadable_subset_image_is_an_error(tmp_path, capsys):
    root = _imagenet(tmp_path / "d")
    (root / "train" / WNIDS[0] / f"{WNIDS[0]}_train0.png").write_bytes(b"")
    f = tmp_path / "1imgs_class.txt"
    f.write_text("".join(f"{w}_train0.png\n" for w in WNIDS))
    rc, out, err = _eval(capsys, *COMMON, "--data", root, "--subset-file", f)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and errors == [f"error: 1 images of {f} are unreadable (e.g. {root}/train/{WNIDS[0]}/"
                                  f"{WNIDS[0]}_train0.png)"], err


def _trainer_sources(path, caplog, eval_split="auto"):
    cfg = Config()
    cfg.data.path, cfg.data.eval_split = str(path), eval_split
    with caplog.at_level(logging.INFO, logger="msn_fast.train"):
        return build_sources(cfg)


def test_trainer_pretrains_on_train_and_evaluates_on_val(tmp_path, caplog):
    root = _imagenet(tmp_path / "d", (("train", 3), ("val", 2), ("test", 1)))
    source, ev_train, ev_test = _trainer_sources(root, caplog)
    assert len(source) == 9 and ev_train is source and len(ev_test) == 6
    assert str(ev_test.root) == str(root / "val")
    assert any("low-shot evaluation on val (6 images)" in r.getMessage() and "val preferred over test"
               in r.getMessage() for r in caplog.records), caplog.text


def test_trainer_evaluates_the_split_it_is_told(tmp_path, caplog):
    root = _imagenet(tmp_path / "d", (("train", 3), ("val", 2), ("test", 1)))
    _, _, ev_test = _trainer_sources(root, caplog, eval_split="test")
    assert str(ev_test.root) == str(root / "test") and len(ev_test) == 3
    assert "low-shot evaluation on test (3 images)" in caplog.text
    with pytest.raises(DataError, match="has no val/ to evaluate on"):
        _trainer_sources(_imagenet(tmp_path / "e", (("train", 2), ("test", 1))), caplog, eval_split="val")


def test_trainer_without_labels_pretrains_without_evaluation(tmp_path, caplog):
    root = _imagenet(tmp_path / "d", (("train", 2),))
    _image(root / "val" / "flat.png", COLOURS[0], 0)
    source, ev_train, ev_test = _trainer_sources(root, caplog)
    assert len(source) == 6 and ev_train is None and ev_test is None
    assert "no low-shot evaluation" in caplog.text
    plain = tmp_path / "plain"  # no split layout: every image, no evaluation (as before)
    _image(plain / "a" / "0.png", COLOURS[0], 0)
    assert [len(s) if s is not None else None for s in _trainer_sources(plain, caplog)] == [1, None, None]
