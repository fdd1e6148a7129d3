import pytest
import torch

from msn_fast.masking import num_kept, sample_keep_indices


@pytest.mark.parametrize("n,r,k", [(196, 0.15, 166), (196, 0.3, 137), (1024, 0.7, 307), (3136, 0.7, 940),
                                   (784, 0.3, 548), (196, 0.5, 98), (196, 0.0, 196)])
def test_official_keep_counts(n, r, k):
    assert num_kept(n, r) == k


def test_shared_mode_unique_in_range():
    idx = sample_keep_indices(8, 196, 0.15, "shared")
    assert idx.shape == (166,)
    assert idx.unique().numel() == 166 and idx.min() >= 0 and idx.max() < 196


def test_per_sample_mode_unique_per_row_and_differs_between_rows():
    idx = sample_keep_indices(4, 1024, 0.7, "per_sample")
    assert idx.shape == (4, 307)
    for row in idx:
        assert row.unique().numel() == 307 and row.min() >= 0 and row.max() < 1024
    assert not torch.equal(idx[0].sort().values, idx[1].sort().values)


def test_ratio_zero_keeps_everything():
    assert sample_keep_indices(2, 49, 0.0) is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        sample_keep_indices(2, 10, 0.5, "blockwise")
    with pytest.raises(ValueError, match="ratio"):
        num_kept(10, 1.0)


def test_model_keeps_cls_and_drops_after_pos_embed():
    from msn_fast.vit import VisionTransformer, ViTArch

    vit = VisionTransformer(ViTArch(dim=16, depth=1, heads=2, patch_size=4), img_size=16)
    x = torch.randn(2, 3, 16, 16)
    idx = sample_keep_indices(2, 16, 0.5, "shared")
    tokens = vit.embed(x, idx)
    full = vit.embed(x)
    assert tokens.shape == (2, 1 + 8, 16)
    torch.testing.assert_close(tokens[:, 0], full[:, 0])  # CLS kept, first
    torch.testing.assert_close(tokens[:, 1:], full[:, 1 + idx])  # the same tokens, pos-embed included
    per = sample_keep_indices(2, 16, 0.5, "per_sample")
    tok2 = vit.embed(x, per)
    for b in range(2):
        torch.testing.assert_close(tok2[b, 1:], full[b, 1 + per[b]])
