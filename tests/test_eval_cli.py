"""`python -m msn_fast.eval` and the evaluations behind it: separable -> ~100%, shuffled -> chance,
no test image ever in a labelled set, both data layouts, the feature cache, one-line errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from msn_fast import evaluation as ev
from msn_fast.dataloading.sources import load_splits
from msn_fast.eval import main
from msn_fast.features import extract_features

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 50, 230)]


def _blobs(n_per, classes, dim, sep, seed):
    centers = np.random.default_rng(1234).normal(size=(classes, dim)) * sep
    rng = np.random.default_rng(seed)
    x = np.concatenate([centers[c] + rng.normal(size=(n_per, dim)) for c in range(classes)])
    return x.astype(np.float32), np.repeat(np.arange(classes), n_per)


def test_all_evaluations_separable_near_perfect():
    xtr, ytr = _blobs(40, 6, 16, 6.0, 0)
    xte, yte = _blobs(30, 6, 16, 6.0, 9)
    res = ev.lowshot_eval(xtr, ytr, xte, yte, shots=(1, 2, 5), draws=3, reg="cv")
    res += ev.fraction_eval(xtr, ytr, xte, yte, fractions=(0.1,), draws=2)
    res.append(ev.knn_eval(xtr, ytr, xte, yte, k=20))
    res.append(ev.knn_eval(xtr, ytr, xte, yte, k=5, temperature=None))
    res.append(ev.linear_probe(xtr, ytr, xte, yte))
    for r in res:
        assert r.mean > 0.95 and r.class_mean > 0.95, r
    assert [r.name for r in res[:4]] == ["1-shot", "2-shot", "5-shot", "10% labels"]
    assert res[3].num_labelled == [24, 24]  # 10% of 40 per class, 6 classes
    assert all(lam in ev.REG_GRID for lam in res[1].reg) and res[0].reg == [ev.ONE_SHOT_REG] * 3


def test_all_evaluations_shuffled_labels_at_chance():
    xtr, ytr = _blobs(60, 5, 16, 6.0, 1)
    xte, yte = _blobs(60, 5, 16, 6.0, 2)
    ytr = np.random.default_rng(0).permutation(ytr)
    res = ev.lowshot_eval(xtr, ytr, xte, yte, shots=(5,), draws=5, reg="cv")
    res += ev.fraction_eval(xtr, ytr, xte, yte, fractions=(0.5,), draws=3)
    res.append(ev.knn_eval(xtr, ytr, xte, yte))
    res.append(ev.linear_probe(xtr, ytr, xte, yte))
    for r in res:
        assert abs(r.mean - 0.2) < 0.1, r


def test_per_class_mean_differs_from_accuracy_on_imbalanced_test():
    pred = np.array([0, 0, 0, 0, 1, 0])
    y = np.array([0, 0, 0, 0, 1, 1])
    assert ev.class_mean_accuracy(pred, y) == pytest.approx(0.75)
    assert (pred == y).mean() == pytest.approx(5 / 6)


def test_labelled_sets_never_contain_test_rows():
    """Every row a classifier is fitted on (CV folds included) is a training row, never a test row."""
    xtr, ytr = _blobs(12, 4, 8, 3.0, 3)
    xte, yte = _blobs(12, 4, 8, 3.0, 4)
    seen = []

    def spy(x, y, lam):
        seen.append(x.copy())
        return ev.fit_logreg(x, y, lam)

    ev.lowshot_eval(xtr, ytr, xte, yte, shots=(1, 2, 5), draws=2, reg="cv", fit=spy)
    ev.fraction_eval(xtr, ytr, xte, yte, fractions=(0.5,), draws=2, fit=spy)
    ev.linear_probe(xtr, ytr, xte, yte, fit=spy)
    train_rows = {r.tobytes() for r in ev.preprocess(xtr)}
    test_rows = {r.tobytes() for r in ev.preprocess(xte)}
    assert len(seen) > 20
    for x in seen:
        rows = {r.tobytes() for r in x}
        assert rows <= train_rows and not rows & test_rows


def test_draws_are_stratified_and_seeded():
    y = np.repeat(np.arange(3), [10, 20, 40])
    idx = ev.draw_fraction(y, 0.1, np.random.default_rng(0))
    assert sorted(np.bincount(y[idx])) == [1, 2, 4]
    assert len(set(idx)) == len(idx)
    a = ev.lowshot_eval(*_blobs(10, 3, 4, 1.0, 0), *_blobs(5, 3, 4, 1.0, 1), shots=(2,), draws=3, seed=5)
    b = ev.lowshot_eval(*_blobs(10, 3, 4, 1.0, 0), *_blobs(5, 3, 4, 1.0, 1), shots=(1, 2), draws=3, seed=5)
    assert a[0].accuracy == b[1].accuracy  # a setting's draws do not depend on the other settings


# --- data layouts -------------------------------------------------------------------------------

def _image(path, colour, seed):
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour)[None, None] + rng.normal(0, 25, (16, 16, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _folder_dataset(root, n_train=6, n_test=4):
    for c, colour in enumerate(COLOURS):
        for i in range(n_train):
            _image(root / "train" / f"c{c}" / f"{i}.png", colour, 100 * c + i)
        for i in range(n_test):
            _image(root / "test" / f"c{c}" / f"{i}.png", colour, 100 * c + 50 + i)
    return root


def _list_dataset(root):
    imgs = root / "101_ObjectCategories"
    train, test = [], []
    for c, name in enumerate(["BACKGROUND_Google", "ant", "bee", "cat"]):
        colour = COLOURS[c % 3] if c else (128, 128, 128)
        for i in range(7):
            rel = f"{name}/image_{i:04d}.jpg"
            _image(imgs / rel, colour, 10 * c + i)
            (train if i < 4 else test).append(rel)
    (root / "train.txt").write_text("\n".join(train) + "\n")
    (root / "test.txt").write_text("\n".join(test) + "\n")
    return root


def test_list_layout_excludes_background_and_never_overlaps(tmp_path):
    root = _list_dataset(tmp_path / "caltech")
    train, test, desc = load_splits(root)
    assert len(train) == 12 and len(test) == 9 and "3 classes" in desc
    names = {train.classes[c] for c in train.labels()} | {test.classes[c] for c in test.labels()}
    assert names == {"ant", "bee", "cat"}
    assert not {p for p, _ in train.samples} & {p for p, _ in test.samples}
    train_all, _, _ = load_splits(root, exclude=[])
    assert len(train_all) == 16
    # a test image listed in train.txt too: refused
    (root / "train.txt").write_text((root / "train.txt").read_text() + "cat/image_0006.jpg\n")
    with pytest.raises(ValueError, match="both train.txt and test.txt"):
        load_splits(root)


def test_folder_layout_and_symlinked_leak(tmp_path):
    root = _folder_dataset(tmp_path / "d")
    train, test, _ = load_splits(root)
    assert len(train) == 18 and len(test) == 12
    assert train.classes == test.classes
    (root / "test" / "c0" / "leak.png").symlink_to(root / "train" / "c0" / "0.png")
    with pytest.raises(ValueError, match="also training images"):
        load_splits(root)


# --- the command --------------------------------------------------------------------------------

def _run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_raw_pixels_and_cache(tmp_path, capsys):
    root = _folder_dataset(tmp_path / "d")
    common = ["--data", root, "--shots", "1", "2", "--fractions", "0.5", "--draws", "2", "--knn-k", "3", "--linear",
              "--cache", tmp_path / "cache", "--model", "cpu_demo"]
    rc, out, err = _run(capsys, "--raw-pixels", *common, "--out", tmp_path / "r.json")
    assert rc == 0, err
    assert "1-shot" in out and "class-mean" in out and "3-NN" in out and "linear" in out
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["features"] == "raw pixels" and rep["feature_dim"] == 3 * 32 * 32 and rep["num_classes"] == 3
    assert rep["features_cached"] == {"train": False, "test": False}
    for name in ("1-shot", "2-shot", "50% labels", "3-NN (T=0.07)", "linear (all labels)"):
        assert rep["results"][name]["mean"] > 0.9 and rep["results"][name]["class_mean"] > 0.9
    rc, out, err = _run(capsys, "--raw-pixels", *common, "--out", tmp_path / "r2.json")
    rep2 = json.loads((tmp_path / "r2.json").read_text())
    assert rep2["features_cached"] == {"train": True, "test": True}
    assert rep2["results"]["1-shot"]["accuracy"] == rep["results"]["1-shot"]["accuracy"]
    # a changed image invalidates the cache
    _image(root / "test" / "c1" / "0.png", COLOURS[2], 7)
    _run(capsys, "--raw-pixels", *common, "--out", tmp_path / "r3.json")
    assert json.loads((tmp_path / "r3.json").read_text())["features_cached"] == {"train": True, "test": False}


def test_cli_official_checkpoint_and_random_init(tmp_path, capsys):
    from msn_fast.config import Config, HeadConfig, ViTConfig
    from msn_fast.interop import to_official_checkpoint
    from msn_fast.model import MSN

    root = _list_dataset(tmp_path / "caltech")
    cfg = Config(vit=ViTConfig(dim=32, depth=1, heads=2, patch_size=8, img_size=16),
                 head=HeadConfig(hidden_dim=16, out_dim=8, num_prototypes=4))
    ckpt = tmp_path / "official.pth.tar"
    torch.save(to_official_checkpoint(MSN(cfg)), ckpt)
    args = ["--data", root, "--shots", "1", "--fractions", "--draws", "1", "--no-cache"]
    rc, out, err = _run(capsys, "--checkpoint", ckpt, "--heads", "2", *args, "--out", tmp_path / "o.json")
    assert rc == 0, err
    rep = json.loads((tmp_path / "o.json").read_text())
    assert rep["feature_dim"] == 32 and rep["img_size"] == 16 and rep["num_classes"] == 3
    assert "official MSN" in rep["features"] and rep["train_images"] == 12
    # through the pixel cache (decoded once, shared by every encoder): the same features, so the same results
    for i in range(2):
        rc, _, err = _run(capsys, "--checkpoint", ckpt, "--heads", "2", *args[:-1], "--cache", tmp_path / "c",
                          "--knn-k", "3", "--out", tmp_path / f"c{i}.json")
        assert rc == 0, err
    via_pixels = json.loads((tmp_path / "c0.json").read_text())
    assert json.loads((tmp_path / "c1.json").read_text())["features_cached"] == {"train": True, "test": True}
    assert via_pixels["results"]["1-shot"]["accuracy"] == rep["results"]["1-shot"]["accuracy"]
    assert len(list((tmp_path / "c").glob("*.npz"))) == 4  # pixels + features, train + test
    rc, out, err = _run(capsys, "--checkpoint", ckpt, "--heads", "2", "--random-init", *args, "--out", tmp_path / "x")
    assert rc == 0, err
    assert json.loads((tmp_path / "x").read_text())["features"].startswith("random-init")


def test_cli_msn_fast_run_directory(tmp_path, capsys):
    from msn_fast.checkpoint import save_checkpoint
    from msn_fast.config import Config, HeadConfig, ViTConfig, to_dict
    from msn_fast.model import MSN, param_groups

    cfg = Config(vit=ViTConfig(dim=32, depth=1, heads=2, patch_size=4, img_size=16),
                 head=HeadConfig(hidden_dim=16, out_dim=8, num_prototypes=4))
    cfg.data.global_size = 16
    model = MSN(cfg)
    opt = torch.optim.AdamW(param_groups(model))
    save_checkpoint(tmp_path / "run", model=model, optimizer=opt, step=1, config=to_dict(cfg))
    root = _folder_dataset(tmp_path / "d", n_train=3, n_test=2)
    rc, out, err = _run(capsys, "--checkpoint", tmp_path / "run", "--data", root, "--shots", "1", "--fractions",
                        "--draws", "1", "--no-cache", "--out", tmp_path / "r.json")
    assert rc == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["feature_dim"] == 32 and rep["img_size"] == 16
    # the same features as the encoder computes directly (CLS before the final norm)
    from msn_fast.dataloading import ImageFolder, eval_transform

    x, _ = extract_features(model.target.trunk.extract_features, ImageFolder(root / "test"), eval_transform(16))
    assert x.shape == (6, 32)


def test_cli_counts_only_the_images_it_read(tmp_path, capsys):
    root = _folder_dataset(tmp_path / "d")  # 18 train / 12 test images, plus 3 broken files
    for rel in ("train/c0/broken.png", "train/c1/empty.jpg", "test/c2/trunc.png"):
        (root / rel).write_bytes(b"" if rel.endswith(".jpg") else b"\x89PNG\r\n\x1a\n broken")
    args = ["--raw-pixels", "--data", root, "--model", "cpu_demo", "--shots", "1", "--fractions", "--draws", "1",
            "--knn-k", "0", "--cache", tmp_path / "cache"]
    for i in range(2):  # extracted, then from the cache (where the broken files are not read at all)
        rc, out, err = _run(capsys, *args, "--out", tmp_path / f"r{i}.json")
        assert rc == 0, err
        assert "18 train / 12 test images (3 unreadable skipped), 3 classes" in out.splitlines()[0], out
        rep = json.loads((tmp_path / f"r{i}.json").read_text())
        assert rep["train_images"] == 18 and rep["test_images"] == 12
        assert rep["unreadable_images"] == {"train": 2, "test": 1}
    for p in (root / "test").rglob("*.png"):
        p.write_bytes(b"")
    rc, out, err = _run(capsys, *args[:-2], "--no-cache")
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # warnings may precede it
    assert rc == 2 and errors == [f"error: all 13 test images of {root} are unreadable"], err
    assert "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--raw-pixels", "--data", "/nonexistent/x"], "does not exist"),
    (["--data", "."], "give --checkpoint"),
    (["--raw-pixels", "--random-init", "--data", "."], "one of"),
    (["--raw-pixels", "--data", ".", "--reg", "lots"], "--reg"),
    (["--raw-pixels", "--data", ".", "--bogus"], "unrecognized arguments"),
    (["--checkpoint", "/nonexistent.pth", "--data", "DATA"], "does not exist"),
    (["--raw-pixels", "--data", "."], "neither train/ + val/ (or test/)"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, args, message):
    if "DATA" in args:
        args = [str(_folder_dataset(tmp_path / "d", 1, 1)) if a == "DATA" else a for a in args]
    rc, out, err = _run(capsys, *args)
    assert rc == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_cli_help_lists_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--checkpoint", "--data", "--shots", "--fractions", "--draws", "--knn-k", "--linear", "--cache",
                 "--random-init", "--raw-pixels", "--exclude-class"):
        assert flag in out


def test_a_class_with_fewer_training_images_than_the_shots_is_named_once(tmp_path, capsys, caplog):
    root = _folder_dataset(tmp_path / "d")  # 6 train images a class
    for p in sorted((root / "train" / "c2").glob("*.png"))[2:]:
        p.unlink()  # c2 keeps 2
    args = ["--raw-pixels", "--baselines", "--data", root, "--model", "cpu_demo", "--draws", "1", "--knn-k", "0",
            "--fractions", "--no-cache"]
    with caplog.at_level("WARNING", logger="msn_fast.eval"):
        rc, out, err = _run(capsys, *args, "--shots", "1", "2")
    assert rc == 0, err
    assert not [r for r in caplog.records if "fewer than" in r.getMessage()]  # 2 shots: every class has enough
    caplog.clear()
    with caplog.at_level("WARNING", logger="msn_fast.eval"):
        rc, out, err = _run(capsys, *args, "--shots", "1", "5", "--out", tmp_path / "r.json")
    assert rc == 0, err
    short = [r.getMessage() for r in caplog.records if "fewer than" in r.getMessage()]
    assert short == ["1 class(es) have fewer than 5 training images; a 5-shot draw takes all they have: c2 (2)"]
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["results"]["5-shot"]["num_labelled"] == [5 + 5 + 2]
