import numpy as np

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
