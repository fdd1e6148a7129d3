import numpy as np
import torch
from PIL import Image

from msn_fast.evaluation import draw_labelled, format_table, lowshot_eval, preprocess


def _blobs(n_per, classes, dim, sep, seed):
    """Gaussian blobs around fixed centres (the same for every seed); `seed` draws the points."""
    centers = np.random.default_rng(1234).normal(size=(classes, dim)) * sep
    rng = np.random.default_rng(seed)
    x = np.concatenate([centers[c] + rng.normal(size=(n_per, dim)) for c in range(classes)])
    y = np.repeat(np.arange(classes), n_per)
    return x.astype(np.float32), y


def test_separable_data_near_perfect():
    xtr, ytr = _blobs(30, 5, 20, 6.0, 0)
    xte, yte = _blobs(20, 5, 20, 6.0, 7)
    res = lowshot_eval(xtr, ytr, xte, yte, shots=(1, 5), draws=3)
    assert res[1].mean > 0.97 and res[0].mean > 0.9


def test_shuffled_labels_at_chance():
    xtr, ytr = _blobs(40, 5, 20, 6.0, 1)
    xte, yte = _blobs(40, 5, 20, 6.0, 2)
    rng = np.random.default_rng(0)
    res = lowshot_eval(xtr, rng.permutation(ytr), xte, yte, shots=(5,), draws=5)
    assert abs(res[0].mean - 0.2) < 0.1


def test_draws_take_k_per_class_from_train_only():
    y = np.repeat(np.arange(4), 10)
    idx = draw_labelled(y, 2, np.random.default_rng(0))
    assert len(idx) == 8 and sorted(np.bincount(y[idx])) == [2, 2, 2, 2]
    assert idx.max() < len(y)


def test_preprocess_rows_centred_unit_norm():
    x = preprocess(np.random.default_rng(0).normal(size=(5, 7)) + 3)
    np.testing.assert_allclose(x.mean(1), 0, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=1e-6)


def test_table_format():
    xtr, ytr = _blobs(5, 2, 4, 5.0, 0)
    res = lowshot_eval(xtr, ytr, xtr, ytr, shots=(1,), draws=2)
    assert "1-shot" in format_table({"a": res})


class _CountingSource:
    """(image | None, label) items that count their reads; item 3 is unreadable."""

    def __init__(self, n, seed=0):
        rng = np.random.default_rng(seed)
        self.images = [Image.fromarray(rng.integers(0, 256, (9 + i % 4, 11, 3), dtype=np.uint8)) for i in range(n)]
        self.reads = [0] * n

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        self.reads[i] += 1
        return (None if i == 3 else self.images[i]), i % 3


def test_feature_sets_in_one_pass_read_each_image_once_and_equal_each_set_alone():
    from msn_fast.dataloading import eval_transform
    from msn_fast.features import extract_feature_sets

    src, tf = _CountingSource(11), eval_transform(8)
    w = torch.randn(3 * 8 * 8, 5, dtype=torch.float64)
    fns = {"pixels": lambda x: x.flatten(1), "linear": lambda x: x.flatten(1).double() @ w}
    feats, y, kept = extract_feature_sets(fns, src, tf, batch_size=4, num_workers=0)
    assert src.reads == [1] * 11  # one decode per image for both sets
    in_workers = extract_feature_sets(fns, src, tf, batch_size=4, num_workers=2)  # decoded in loader processes
    assert all(np.array_equal(in_workers[0][k], feats[k]) for k in fns) and np.array_equal(in_workers[2], kept)
    assert kept.tolist() == [i for i in range(11) if i != 3] and y.tolist() == [i % 3 for i in kept]
    for i, row in zip(kept, range(len(kept))):  # each image alone, outside the batch
        x = tf(src.images[i])[None]
        np.testing.assert_array_equal(feats["pixels"][row], fns["pixels"](x)[0].numpy())
        ref = fns["linear"](x)[0].float().numpy()  # the batched product differs by rounding only
        np.testing.assert_allclose(feats["linear"][row], ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    assert {k: v.shape for k, v in feats.items()} == {"pixels": (10, 192), "linear": (10, 5)}


def test_end_of_run_report_reads_each_image_once():
    from msn_fast.evaluation import lowshot_report
    from msn_fast.model import MSN
    from msn_fast.recipes import get_recipe

    cfg = get_recipe("cpu_demo")
    cfg.vit.dim, cfg.vit.depth, cfg.vit.heads, cfg.head.hidden_dim, cfg.head.out_dim = 16, 1, 2, 16, 8
    cfg.head.num_prototypes, cfg.vit.img_size, cfg.data.global_size, cfg.run.eval_draws = 8, 16, 16, 2

    train, test = _CountingSource(12, 1), _CountingSource(9, 2)
    report = lowshot_report(MSN(cfg), cfg, train, test, torch.device("cpu"), shots=(1,))
    assert train.reads == [1] * 12 and test.reads == [1] * 9
    assert set(report["results"]) == {"msn (target encoder)", "random-init encoder", "raw pixels"}


def test_a_source_is_digested_once_and_a_new_listing_sees_a_changed_file(tmp_path, monkeypatch):
    """The cache key's digest of an image folder (path, size, mtime of every file) is computed once per source
    object; a new listing of the folder (each report lists it anew) sees a changed file."""
    from msn_fast import features
    from msn_fast.dataloading.sources import ImageFolder

    for c in range(2):
        (tmp_path / f"c{c}").mkdir()
        for i in range(3):
            Image.new("RGB", (5, 5), (40 * i, c, 0)).save(tmp_path / f"c{c}" / f"{i}.png")
    stats = []
    real_stat = features.os.stat
    monkeypatch.setattr(features.os, "stat",  # count the image files' stats (listing a folder stats folders)
                        lambda p, *a, **k: (str(p).endswith(".png") and stats.append(p)) or real_stat(p, *a, **k))
    src = ImageFolder(tmp_path)
    first = features._digest_source(src)
    assert len(stats) == 6 and features._digest_source(src) == first and len(stats) == 6
    Image.new("RGB", (6, 5), (1, 2, 3)).save(tmp_path / "c1" / "2.png")
    again, n = ImageFolder(tmp_path), len(stats)
    assert features._digest_source(again) != first and len(stats) == n + 6

    class Slotted:  # takes no weak reference: digested on every call, still right
        __slots__ = ("samples",)

    plain = Slotted()
    plain.samples = again.samples
    assert features._digest_source(plain) == features._digest_source(again) and len(stats) == n + 12


def test_the_pixel_cache_decodes_on_every_core_and_encoders_keep_one_decoder(tmp_path, monkeypatch):
    """Decoding into the pixel cache (no encoder to run) uses a loader process per usable core (up to 8);
    extracting an encoder's features leaves the cores to it, with one decoding process beside it."""
    from msn_fast import features
    from msn_fast.dataloading import eval_transform

    seen = []
    real = features.extract_feature_sets
    monkeypatch.setattr(features, "extract_feature_sets",
                        lambda *a, **k: seen.append(a[6] if len(a) > 6 else k.get("num_workers")) or real(*a, **k))
    monkeypatch.setattr(features, "usable_cores", lambda: 2)
    src, tf = _CountingSource(9), eval_transform(8)
    pix, y, kept, hit = features.cached_features(features.raw_pixels, src, tf, {"kind": "raw-pixels"}, None, "cpu", 4)
    enc = features.cached_features(lambda x: x.flatten(1)[:, :5], src, tf, {"kind": "x"}, None, "cpu", 4)
    assert seen == [2, 1] and not hit
    assert pix.shape == (8, 192) and kept.tolist() == [0, 1, 2, 4, 5, 6, 7, 8]
    np.testing.assert_array_equal(enc[0], pix[:, :5])
