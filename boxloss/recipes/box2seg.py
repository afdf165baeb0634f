r"""Box2Seg's total loss (Kulharia et al., "Box2Seg: Attention Weighted Loss and
Discriminative Feature Learning for Weakly Supervised Segmentation", ECCV 2020,
Eq. 11) with the paper's weights, over the losses of :mod:`boxloss.losses.box2seg`.
"""

from __future__ import annotations

import torch
from torch import nn

from boxloss import _checks
from boxloss.losses.box2seg import (
    affinity_loss,
    attention_box_regulariser,
    attention_weighted_loss,
    fill_rate_hinge_loss,
    pseudo_label_ce_loss,
)

ALPHA_REGULARISERS = ("fill-rate", "box")


class Box2SegLoss(nn.Module):
    r"""Box2Seg's objective (Eq. 11): :math:`L = L_{GC} + \lambda_{AW} L_{AW} + \lambda_\alpha L_\alpha
    + \lambda_A L_A` with lambda_AW 10, lambda_alpha 1, lambda_A 1, ``L_alpha`` the fill-rate hinge
    (gamma 0.7; ``alpha_regulariser="box"`` for Eq. 6) and ``L_A`` the exact affinity loss.

    forward(probs (B, L+1, H, W), attention (B, L, H, W), embeddings (B, d, H, W),
    box_masks, pseudo_labels, valid_mask=None, *, return_terms=False): the scalar loss, or with
    ``return_terms=True`` the pair ``(loss, terms)``, ``terms`` the dict of the unweighted
    ``"gc"``, ``"aw"``, ``"alpha"`` and ``"affinity"`` losses.
    """

    def __init__(
        self,
        *,
        lambda_aw=10.0,
        lambda_alpha=1.0,
        lambda_a=1.0,
        gamma=0.7,
        alpha_regulariser="fill-rate",
        affinity_mode="exact",
        sample_fraction=0.1,
        eps=1e-8,
    ):
        super().__init__()
        _checks.check_choice("Box2SegLoss", "alpha_regulariser", alpha_regulariser, ALPHA_REGULARISERS)
        _checks.check_choice("Box2SegLoss", "affinity_mode", affinity_mode, ("exact", "sampled"))
        self.lambda_aw, self.lambda_alpha, self.lambda_a = float(lambda_aw), float(lambda_alpha), float(lambda_a)
        self.gamma, self.alpha_regulariser, self.affinity_mode = float(gamma), alpha_regulariser, affinity_mode
        self.sample_fraction, self.eps = float(sample_fraction), float(eps)

    def forward(self, probs, attention, embeddings, box_masks, pseudo_labels, valid_mask=None, *, return_terms=False):
        if all(isinstance(t, torch.Tensor) and t.numel() > 0 for t in (probs, attention, embeddings)):
            # The terms check their own arguments too; this names the loss the caller called.
            _checks.check_values(
                "Box2SegLoss",
                probs=(probs, _checks.PROBABILITIES),
                attention=(attention, _checks.PROBABILITIES),
                embeddings=(embeddings, _checks.FINITE),
            )
        terms = {
            "gc": pseudo_label_ce_loss(probs, pseudo_labels, eps=self.eps),
            "aw": attention_weighted_loss(probs, attention, box_masks, eps=self.eps),
            "alpha": (
                fill_rate_hinge_loss(attention, pseudo_labels, box_masks, gamma=self.gamma)
                if self.alpha_regulariser == "fill-rate"
                else attention_box_regulariser(attention, box_masks)
            ),
            "affinity": affinity_loss(
                embeddings, probs, mode=self.affinity_mode, sample_fraction=self.sample_fraction, valid_mask=valid_mask
            ),
        }
        total = (
            terms["gc"]
            + self.lambda_aw * terms["aw"]
            + self.lambda_alpha * terms["alpha"]
            + self.lambda_a * terms["affinity"]
        )
        return (total, terms) if return_terms else total
