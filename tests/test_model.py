"""MSN.loss wiring: which encoder sees which view, what is masked, and the row order of the anchors."""

import torch
from conftest import assert_rounding_close

import msn_fast.model as msn_model
from msn_fast.config import Config, HeadConfig, LossConfig, MaskConfig, ViTConfig
from msn_fast.loss import msn_loss
from msn_fast.masking import num_kept


def _differs(a, b):
    """Far apart relative to their size (the loss normalises embeddings, so only direction counts)."""
    return ((a - b).abs().max() > 0.05 * b.abs().max()).item()


def _model(loss: LossConfig):
    """A tiny MSN in eval mode whose target differs from its student, so swapping the encoders shows."""
    cfg = Config(vit=ViTConfig(dim=32, depth=1, heads=2, patch_size=4, img_size=16, attn_impl="torch",
                               embed_impl="torch"),
                 head=HeadConfig(hidden_dim=16, out_dim=8, num_prototypes=6), mask=MaskConfig(ratio=0.5), loss=loss)
    model = msn_model.MSN(cfg)
    with torch.no_grad():
        for p in model.target.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return cfg, model.eval()


def _spied_loss(monkeypatch, model, globals_, focals):
    """model.loss with its sample_keep_indices and msn_loss spied on: (loss, seen), where seen holds the keep's
    arguments and result and what reached msn_loss (anchor, target, prototypes, grad mode, keyword arguments)."""
    seen = {}
    real_keep, real_loss = msn_model.sample_keep_indices, msn_model.msn_loss

    def keep_spy(*args, **kw):
        seen["keep_args"] = args
        seen["keep"] = real_keep(*args, **kw)
        return seen["keep"]

    def loss_spy(anchor, target, protos, **kw):
        seen.update(anchor=anchor, target=target, protos=protos, grad_enabled=torch.is_grad_enabled(), **kw)
        return real_loss(anchor, target, protos, **kw)

    monkeypatch.setattr(msn_model, "sample_keep_indices", keep_spy)
    monkeypatch.setattr(msn_model, "msn_loss", loss_spy)
    loss, _ = model.loss(globals_, focals)
    return loss, seen


def _check_loss_and_grads(cfg, model, loss, seen, want_anchor, want_target, num_views, n):
    """The loss is msn_loss of the expected rows with the config's hyper-parameters, and its gradients reach the
    student and the prototypes, never the target."""
    lc = cfg.loss
    hyper = dict(tau=lc.tau, sharpen=lc.sharpen, me_max_weight=lc.me_max_weight, sinkhorn_iters=lc.sinkhorn_iters)
    assert {k: seen[k] for k in hyper} == hyper
    want_loss, _ = msn_loss(want_anchor, want_target, model.prototypes, num_views=num_views, **hyper)
    assert_rounding_close(loss.detach(), want_loss, torch.float32, n * 6, "loss")

    loss.backward()
    assert all(p.grad is None for p in model.target.parameters())
    assert model.prototypes.grad is not None
    assert all(p.grad is not None for p in model.student.parameters())


def test_views_encoders_masks_and_row_order(monkeypatch):
    """View 0 is the target (EMA encoder, unmasked, no grad); view 1 the anchor (student, masked);
    focal views unmasked (student); anchors view-major (row v·B + b is view v of sample b), matching
    the targets repeated per view inside the loss. In eval mode every row is independent of the
    others, so each expected row is computed alone and compared with what reached the loss."""
    cfg, model = _model(LossConfig())
    B, F = 3, 2
    globals_, focals = torch.randn(2, B, 3, 16, 16), torch.randn(F, B, 3, 8, 8)
    loss, seen = _spied_loss(monkeypatch, model, globals_, focals)

    keep = seen["keep"]
    assert keep.shape == (num_kept(16, 0.5),)
    assert seen["num_views"] == 1 + F and seen["protos"] is model.prototypes
    n = 17 * 32  # sums over tokens x width: rows computed alone vs in a batch differ by rounding only
    with torch.no_grad():
        want_target = torch.cat([model.target(globals_[0, b:b + 1]) for b in range(B)])
        want_anchor = torch.cat([model.student(globals_[1, b:b + 1], keep) for b in range(B)] +
                                [model.student(focals[f, b:b + 1]) for f in range(F) for b in range(B)])
        assert _differs(want_target, model.student(globals_[0]))  # the encoders differ
        assert _differs(want_anchor[:B], model.student(globals_[1]))  # masking matters
        assert _differs(want_anchor[:B], model.student(globals_[0], keep))  # the two global views differ
    assert not seen["target"].requires_grad and seen["anchor"].requires_grad
    assert_rounding_close(seen["target"], want_target, torch.float32, n, "target rows (view 0, EMA, unmasked)")
    assert_rounding_close(seen["anchor"], want_anchor, torch.float32, n,
                          "anchor rows (view 1 masked, then focal views, view-major)")
    _check_loss_and_grads(cfg, model, loss, seen, want_anchor, want_target, 1 + F, n)


def test_symmetric_views_swap_roles(monkeypatch):
    """loss.symmetric: targets [view 0; view 1] (EMA, unmasked), anchors [view 1 masked; view 0 masked] with one
    keep over the 2B rows, then focal pairs [focal v; focal F/2 + v]: anchor row j of every view goes with target
    row j. Eval mode, each expected row computed alone, as above."""
    cfg, model = _model(LossConfig(symmetric=True))
    B, F = 3, 4
    globals_, focals = torch.randn(2, B, 3, 16, 16), torch.randn(F, B, 3, 8, 8)
    loss, seen = _spied_loss(monkeypatch, model, globals_, focals)
    assert torch.isfinite(loss)

    keep = seen["keep"]
    assert seen["keep_args"][0] == 2 * B and seen["num_views"] == 1 + F // 2
    n = 17 * 32
    with torch.no_grad():
        want_target = torch.cat([model.target(globals_[v, b:b + 1]) for v in (0, 1) for b in range(B)])
        want_anchor = torch.cat([model.student(globals_[v, b:b + 1], keep) for v in (1, 0) for b in range(B)] +
                                [model.student(focals[f, b:b + 1]) for v in range(F // 2)
                                 for f in (v, F // 2 + v) for b in range(B)])
        assert _differs(want_target[:B], want_target[B:])  # the two global views differ
        assert _differs(want_anchor[2 * B:3 * B], want_anchor[3 * B:4 * B])  # so do the focal views of a pair
    assert seen["target"].shape == (2 * B, 8) and seen["anchor"].shape == ((1 + F // 2) * 2 * B, 8)
    assert not seen["target"].requires_grad and seen["anchor"].requires_grad
    assert_rounding_close(seen["target"], want_target, torch.float32, n, "targets [view 0; view 1]")
    assert_rounding_close(seen["anchor"], want_anchor, torch.float32, n, "anchors [view 1; view 0; focal pairs]")
    _check_loss_and_grads(cfg, model, loss, seen, want_anchor, want_target, 1 + F // 2, n)
