"""One convention for every loss of boxloss: a function and a module return a Tensor (a scalar, or the per-image,
per-box or per-pixel values with ``reduction="none"``); the losses made of parts return ``(loss, terms)`` with
``return_terms=True``, ``terms`` a dict of tensors.  Every loss in ``boxloss.__all__`` must have a case here."""

from __future__ import annotations

import pytest
import torch

import boxloss

B, C, H, W, D, K = 2, 3, 12, 12, 4, 2


def _inputs():
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).softmax(1).requires_grad_()
    fg = torch.rand(B, H, W, generator=g, dtype=torch.float64).requires_grad_()
    image = torch.rand(B, 3, H, W, generator=g, dtype=torch.float64)
    boxes = torch.tensor([[1.0, 1.0, 8.0, 9.0], [2.0, 3.0, 11.0, 11.0]], dtype=torch.float64)
    box_batch, box_labels = torch.tensor([0, 1]), torch.tensor([1, 2])
    box_masks = boxloss.boxes_to_masks(boxes, box_batch, box_labels, (B, H, W), C - 1, form="labels")
    attention = torch.rand(B, C - 1, H, W, generator=g, dtype=torch.float64).requires_grad_()
    embeddings = torch.randn(B, D, H, W, generator=g, dtype=torch.float64).requires_grad_()
    pseudo = torch.randint(0, C, (B, H, W), generator=g)
    features = torch.randn(B, D, H, W, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(C, D, generator=g, dtype=torch.float64).requires_grad_()
    mu = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).requires_grad_()
    log_var = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).requires_grad_()
    return dict(
        probs=probs,
        fg=fg,
        image=image,
        boxes=boxes,
        box_batch=box_batch,
        box_labels=box_labels,
        box_masks=box_masks,
        attention=attention,
        embeddings=embeddings,
        pseudo=pseudo,
        features=features,
        weight=weight,
        mu=mu,
        log_var=log_var,
        target=torch.randint(0, C, (B, H, W), generator=g),
        binary_target=(torch.rand(B, H, W, generator=g) > 0.5).double(),
        border=boxloss.image_border_mask(H, W),
        box_mask=torch.rand(B, H, W, generator=g) > 0.3,
        pooled=torch.randn(K, D, 1, 1, generator=g, dtype=torch.float64).requires_grad_(),
        queries=torch.randn(B, 16, D, generator=g, dtype=torch.float64),
        valid=torch.ones(B, 16, dtype=torch.bool),
    )


X = _inputs()
BOX_ARGS = lambda: (X["boxes"], X["box_batch"], X["box_labels"])  # noqa: E731

# name -> (call(**options), shape with reduction="none" or None when the loss has no reduction)
CASES = {
    "sparse_crf_loss": (lambda **o: boxloss.sparse_crf_loss(X["probs"], X["image"], **o), (B,)),
    "SparseCRFLoss": (lambda **o: boxloss.SparseCRFLoss(**o)(X["probs"], X["image"]), (B,)),
    "dense_crf_loss": (lambda **o: boxloss.dense_crf_loss(X["probs"], X["image"] * 255, sigma_xy=5.0, **o), (B,)),
    "DenseCRFLoss": (lambda **o: boxloss.DenseCRFLoss(sigma_xy=5.0, **o)(X["probs"], X["image"] * 255), (B,)),
    "tight_box_loss": (lambda **o: boxloss.tight_box_loss(X["probs"], *BOX_ARGS(), **o), (K,)),
    "TightBoxLoss": (lambda **o: boxloss.TightBoxLoss(**o)(X["probs"], *BOX_ARGS()), (K,)),
    "mil_box_loss": (lambda **o: boxloss.mil_box_loss(X["probs"], *BOX_ARGS(), **o), (B,)),
    "MILBoxLoss": (lambda **o: boxloss.MILBoxLoss(**o)(X["probs"], *BOX_ARGS()), (B,)),
    "projection_loss": (lambda **o: boxloss.projection_loss(X["probs"], *BOX_ARGS(), **o), (B,)),
    "ProjectionLoss": (lambda **o: boxloss.ProjectionLoss(**o)(X["probs"], *BOX_ARGS()), (B,)),
    "border_background_loss": (lambda **o: boxloss.border_background_loss(X["fg"], X["border"], **o), (B,)),
    "BorderBackgroundLoss": (lambda **o: boxloss.BorderBackgroundLoss(**o)(X["fg"], X["border"]), (B,)),
    "volumetric_loss": (lambda **o: boxloss.volumetric_loss(X["fg"], **o), None),
    "VolumetricLoss": (lambda **o: boxloss.VolumetricLoss(**o)(X["fg"]), None),
    "positional_loss": (lambda **o: boxloss.positional_loss(X["fg"], **o), (B,)),
    "PositionalLoss": (lambda **o: boxloss.PositionalLoss(**o)(X["fg"]), (B,)),
    "negative_loss": (lambda **o: boxloss.negative_loss(X["fg"], **o), (B,)),
    "NegativeLoss": (lambda **o: boxloss.NegativeLoss(**o)(X["fg"]), (B,)),
    "box_ce_loss": (lambda **o: boxloss.box_ce_loss(X["probs"], X["box_masks"], **o), (B,)),
    "BoxCELoss": (lambda **o: boxloss.BoxCELoss(**o)(X["probs"], X["box_masks"]), (B,)),
    "pseudo_label_ce_loss": (lambda **o: boxloss.pseudo_label_ce_loss(X["probs"], X["pseudo"], **o), (B,)),
    "PseudoLabelCELoss": (lambda **o: boxloss.PseudoLabelCELoss(**o)(X["probs"], X["pseudo"]), (B,)),
    "attention_foreground_loss": (
        lambda **o: boxloss.attention_foreground_loss(X["probs"], X["attention"], X["box_masks"], **o),
        (B,),
    ),
    "attention_background_loss": (lambda **o: boxloss.attention_background_loss(X["probs"], X["box_masks"], **o), (B,)),
    "attention_weighted_loss": (
        lambda **o: boxloss.attention_weighted_loss(X["probs"], X["attention"], X["box_masks"], **o),
        (B,),
    ),
    "AttentionWeightedLoss": (
        lambda **o: boxloss.AttentionWeightedLoss(**o)(X["probs"], X["attention"], X["box_masks"]),
        (B,),
    ),
    "attention_box_regulariser": (
        lambda **o: boxloss.attention_box_regulariser(X["attention"], X["box_masks"], **o),
        (B,),
    ),
    "AttentionBoxRegulariser": (lambda **o: boxloss.AttentionBoxRegulariser(**o)(X["attention"], X["box_masks"]), (B,)),
    "fill_rate_hinge_loss": (
        lambda **o: boxloss.fill_rate_hinge_loss(X["attention"], X["pseudo"], X["box_masks"], **o),
        (B,),
    ),
    "FillRateHingeLoss": (
        lambda **o: boxloss.FillRateHingeLoss(**o)(X["attention"], X["pseudo"], X["box_masks"]),
        (B,),
    ),
    "affinity_loss": (lambda **o: boxloss.affinity_loss(X["embeddings"], X["probs"], **o), (B,)),
    "AffinityLoss": (lambda **o: boxloss.AffinityLoss(**o)(X["embeddings"], X["probs"]), (B,)),
    "bap_classification_loss": (
        lambda **o: boxloss.bap_classification_loss(
            X["pooled"], X["box_labels"], X["queries"], X["valid"], X["weight"], **o
        ),
        None,
    ),
    "noise_aware_loss": (
        lambda **o: boxloss.noise_aware_loss(X["features"], X["weight"], X["pseudo"], X["target"], **o),
        None,
    ),
    "NoiseAwareLoss": (
        lambda **o: boxloss.NoiseAwareLoss()(X["features"], X["weight"], X["pseudo"], X["target"], **o),
        None,
    ),
    "NoiseAwareCELoss": (
        lambda **o: boxloss.NoiseAwareCELoss()(X["features"], X["weight"], X["pseudo"], X["target"], **o),
        None,
    ),
    "uncertainty_bce_loss": (
        lambda **o: boxloss.uncertainty_bce_loss(
            X["mu"][:, 0], X["log_var"][:, 0], X["binary_target"], X["box_mask"], **o
        ),
        (B, H, W),
    ),
    "UncertaintyBCELoss": (
        lambda **o: boxloss.UncertaintyBCELoss(**o)(
            X["mu"][:, 0], X["log_var"][:, 0], X["binary_target"], X["box_mask"]
        ),
        (B, H, W),
    ),
    "uncertainty_l2_loss": (
        lambda **o: boxloss.uncertainty_l2_loss(X["mu"][:, 0], X["log_var"][:, 0], X["binary_target"], **o),
        (B, H, W),
    ),
    "UncertaintyL2Loss": (
        lambda **o: boxloss.UncertaintyL2Loss(**o)(X["mu"][:, 0], X["log_var"][:, 0], X["binary_target"]),
        (B, H, W),
    ),
    "uncertainty_ce_loss": (
        lambda **o: boxloss.uncertainty_ce_loss(X["mu"], X["log_var"], X["target"], samples=3, seed=0, **o),
        (B, H, W),
    ),
    "UncertaintyCELoss": (
        lambda **o: boxloss.UncertaintyCELoss(samples=3, **o)(X["mu"], X["log_var"], X["target"], seed=0),
        (B, H, W),
    ),
    "Box2SegLoss": (
        lambda **o: boxloss.Box2SegLoss()(
            X["probs"], X["attention"], X["embeddings"], X["box_masks"], X["pseudo"], **o
        ),
        None,
    ),
    "RegularizedLoss": (lambda **o: boxloss.RegularizedLoss()(X["fg"], X["image"], **o), None),
}

WITH_TERMS = {
    "noise_aware_loss": {"ce", "unreliable", "confidence"},
    "NoiseAwareLoss": {"ce", "unreliable", "confidence"},
    "Box2SegLoss": {"gc", "aw", "alpha", "affinity"},
    "RegularizedLoss": {"crf", "volumetric", "positional", "negative"},
}


def _is_loss(name: str) -> bool:
    return name.endswith(("_loss", "Loss", "_regulariser", "Regulariser"))


def test_every_loss_has_a_case():
    losses = {name for name in boxloss.__all__ if _is_loss(name)}
    assert losses == set(CASES), f"missing: {sorted(losses - set(CASES))}, unknown: {sorted(set(CASES) - losses)}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_returns_a_scalar_tensor_that_backpropagates(name):
    call, _ = CASES[name]
    loss = call()
    assert isinstance(loss, torch.Tensor), type(loss)
    assert loss.dim() == 0
    assert torch.isfinite(loss)
    loss.backward()


@pytest.mark.parametrize("name", sorted(n for n, (_, shape) in CASES.items() if shape is not None))
def test_reduction_none_gives_the_documented_shape(name):
    call, shape = CASES[name]
    values = call(reduction="none")
    assert isinstance(values, torch.Tensor) and tuple(values.shape) == shape
    torch.testing.assert_close(call(reduction="sum"), values.sum())


@pytest.mark.parametrize("name", sorted(WITH_TERMS))
def test_parts_on_request(name):
    call, _ = CASES[name]
    loss, terms = call(return_terms=True)
    torch.testing.assert_close(loss, call())
    assert isinstance(terms, dict) and set(terms) == WITH_TERMS[name]
    assert all(isinstance(t, torch.Tensor) for t in terms.values())
