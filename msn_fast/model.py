"""The MSN model: student encoder (ViT + head), EMA target encoder, prototypes; and the loss of one batch.

Forward of one step (official semantics, msn_spec.md §1-3):
  1. target view  -> target encoder (no grad; BN in train mode, as the official code never calls eval())
  2. anchor view  -> student with a random token mask (kept patch indices sampled on-device)
  3. focal views  -> student, unmasked, as one batch (their own BN statistics)
  4. MSN objective over [anchor; focal_1; ...; focal_F] rows against the target rows.
With loss.symmetric (not official) each global view is also the other's target (`MSN.loss`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .config import Config
from .heads import Encoder, ProjectionHead, init_prototypes
from .loss import LossStats, msn_loss
from .masking import sample_keep_indices
from .vit import VisionTransformer, ViTArch


class MSN(nn.Module):
    def __init__(self, cfg: Config, device=None):
        super().__init__()
        v, h = cfg.vit, cfg.head
        arch = ViTArch(dim=v.dim, depth=v.depth, heads=v.heads, patch_size=v.patch_size, mlp_ratio=v.mlp_ratio)
        trunk = VisionTransformer(arch, img_size=v.img_size, attn_impl=v.attn_impl, embed_impl=v.embed_impl,
                                  stem=v.stem, hide_dropped=v.stem_hides_dropped, device=device)
        head = ProjectionHead(v.dim, h.hidden_dim, h.out_dim, h.use_bn, device=device)
        self.student = Encoder(trunk, head)
        self.target = copy.deepcopy(self.student)
        self.target.requires_grad_(False)
        self.prototypes = init_prototypes(h.num_prototypes, h.out_dim, device=device)
        self.cfg = cfg

    def loss(self, globals_: torch.Tensor, focals: torch.Tensor,
             process_group=None) -> tuple[torch.Tensor, LossStats]:
        """globals_: [G>=2, B, 3, S, S] (0 target, 1 anchor); focals: [F, B, 3, s, s] -> (loss, stats).

        With loss.symmetric the two global views also swap roles: the loss sees 2B targets [view 0; view 1] and
        anchors [view 1 masked; view 0 masked] then, per focal pair v < F/2, [focal v; focal F/2 + v]: row
        j of every anchor view predicts target row j.
        """
        cfg = self.cfg
        if cfg.loss.symmetric:
            half = focals.shape[0] // 2
            targets_in, anchors_in = torch.cat([globals_[0], globals_[1]]), torch.cat([globals_[1], globals_[0]])
            focals = torch.stack([focals[:half], focals[half:2 * half]], dim=1).flatten(1, 2)  # (F/2, 2B, 3, s, s)
        else:
            targets_in, anchors_in = globals_[0], globals_[1]
        with torch.no_grad():
            target = self.target(targets_in)  # (B or 2B, d)
        grid = globals_.shape[-1] // cfg.vit.patch_size
        keep = sample_keep_indices(anchors_in.shape[0], grid * grid, cfg.mask.ratio, cfg.mask.mode,
                                   device=globals_.device)
        anchors = [self.student(anchors_in, keep)]  # (B or 2B, d)
        if focals.shape[0]:
            anchors.append(self.student(focals.flatten(0, 1)))  # view-major
        anchor = torch.cat(anchors)
        num_views = 1 + focals.shape[0]
        lc = cfg.loss
        return msn_loss(anchor, target, self.prototypes, num_views=num_views, tau=lc.tau, sharpen=lc.sharpen,
                        me_max_weight=lc.me_max_weight, sinkhorn_iters=lc.sinkhorn_iters,
                        process_group=process_group, backend=lc.backend)


def param_groups(model: MSN) -> list[dict]:
    """Official AdamW groups: weight decay on every student tensor with ndim > 1 that is not a bias
    (this includes pos_embed, cls_token, the patch conv and every linear); none on biases, norms and
    the prototypes. `apply_wd` marks the groups the weight-decay schedule drives."""
    decay, no_decay = [], []
    for name, p in model.student.named_parameters():
        (decay if p.ndim > 1 and not name.endswith("bias") else no_decay).append(p)
    return [
        {"params": decay, "apply_wd": True},
        {"params": no_decay, "weight_decay": 0.0, "apply_wd": False},
        {"params": [model.prototypes], "weight_decay": 0.0, "apply_wd": False},
    ]
