"""Values out of their domain, in every float argument of every op and loss: NaN, +Inf and -Inf anywhere (NaN and
-Inf for negative log-probabilities, where +Inf is a valid value), and for probability and attention arguments values
outside [0, 1] and logits passed by mistake.  Each must raise ValueError naming the function (or, where noted, the op
that checks the argument for it), the argument and what is wrong; never a finite result, an Inf or a NaN.

A case is ``(function, argument, domain, build)``: ``build()`` returns ``(call, arguments)`` or ``(call, arguments,
where)``, ``call(**arguments)`` runs the function, and the test corrupts ``arguments[argument]`` (the element at flat
index ``where[argument]``, by default the middle one; for "logits" the whole tensor) inside the region the function
reads (inside a box for the box priors).
"""

from __future__ import annotations

import math

import pytest
import torch

import boxloss
from bana_inputs import make_bana_boxes, make_features
from uncertainty_inputs import make_binary_inputs, make_class_inputs

P, F = "probabilities", "finite"
# Probabilities read through row and column maxima (the box priors): a value raises when it can become a maximum
# out of [0, 1]; a value below 0 next to a larger one changes nothing and is not reported (docs/box_priors.md).
M = "maxima"
# Negative log-probabilities (the unaries of CRF inference): +Inf is a label of probability 0, so one +Inf is valid
# (every class +Inf at a pixel raises, tests/test_crf_inference.py); NaN and -Inf are not.
U = "negative log-probabilities"
B, C, H, W = 2, 3, 8, 9


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=_g(seed), dtype=torch.float64)


def _softmax(*shape, seed=0):
    return (3 * torch.randn(*shape, generator=_g(seed), dtype=torch.float64)).softmax(1)


def _boxes():
    boxes = torch.tensor([[1.0, 1.0, 7.0, 6.0], [0.0, 2.0, 5.0, 8.0]], dtype=torch.float64)
    return boxes, torch.tensor([0, 1]), torch.tensor([1, 2])


def _label_map(seed=1):
    return torch.randint(0, C, (B, H, W), generator=_g(seed))


def _one_hot(seed=1):
    return torch.nn.functional.one_hot(_label_map(seed), C).permute(0, 3, 1, 2).double()


# Pixel (3, 4) of class 1 in image 0: inside box 0.
INSIDE_BOX = ((0 * C + 1) * H + 3) * W + 4


def _box_prior(fn):
    def build():
        boxes, batch, labels = _boxes()
        return (lambda probs: fn(probs, boxes, batch, labels)), {"probs": _softmax(B, C, H, W)}, {"probs": INSIDE_BOX}

    return build


def _sparse_crf():
    return (lambda probs, image: boxloss.sparse_crf_loss(probs, image)), {
        "probs": _softmax(B, C, H, W),
        "image": _rand(B, 3, H, W, seed=2),
    }


def _dense_crf():
    return (lambda probs, image: boxloss.dense_crf_loss(probs, image, sigma_xy=4.0)), {
        "probs": _softmax(B, C, H, W),
        "image": 255 * _rand(B, 3, H, W, seed=2),
    }


def _crf_inference():
    return (lambda unary, image: boxloss.dense_crf_inference(unary, image, iterations=2)), {
        "unary": -torch.log(_softmax(B, C, H, W)),
        "image": 255 * _rand(B, 3, H, W, seed=2),
    }


def _bilateral():
    return (lambda values, image: boxloss.bilateral_filter(values, image, 4.0, 15.0)), {
        "values": torch.randn(B, C, H, W, generator=_g(0), dtype=torch.float64),
        "image": 255 * _rand(B, 3, H, W, seed=2),
    }


def _region(fn, **kwargs):
    def build():
        return (lambda fg_probs: fn(fg_probs, **kwargs)), {"fg_probs": _rand(B, 1, H, W)}

    return build


def _regularized(prior):
    def build():
        loss = boxloss.RegularizedLoss(prior=prior)
        return (lambda fg_probs, image: loss(fg_probs, image)), {
            "fg_probs": _rand(B, 1, H, W),
            "image": _rand(B, 3, H, W, seed=2),
        }

    return build


def _ce(fn, target_name, one_hot):
    def build():
        target = _one_hot() if one_hot else _label_map()
        args = {"probs": _softmax(B, C, H, W)}
        if one_hot:
            args[target_name] = target
            return (lambda probs, **t: fn(probs, t[target_name])), args
        return (lambda probs: fn(probs, target)), args

    return build


def _attention_loss(fn, with_probs=True):
    def build():
        args = {"attention": _rand(B, C - 1, H, W, seed=3)}
        if with_probs:
            args["probs"] = _softmax(B, C, H, W)
            return (lambda probs, attention: fn(probs, attention, _label_map())), args
        return (lambda attention: fn(attention, _label_map())), args

    return build


def _background_only():
    return (lambda probs: boxloss.attention_background_loss(probs, _label_map())), {"probs": _softmax(B, C, H, W)}


def _fill_rate_hinge():
    return (lambda attention: boxloss.fill_rate_hinge_loss(attention, _label_map(4), _label_map())), {
        "attention": _rand(B, C - 1, H, W, seed=3)
    }


def _fill_rates():
    return (lambda attention: boxloss.fill_rates(_label_map(4), _label_map(), attention)), {
        "attention": _rand(B, C - 1, H, W, seed=3)
    }


def _affinity(mode):
    def build():
        args = {
            "embeddings": torch.randn(B, 4, H, W, generator=_g(5), dtype=torch.float64),
            "probs": _softmax(B, C, H, W),
        }
        return (lambda embeddings, probs: boxloss.affinity_loss(embeddings, probs, mode=mode, generator=_g(6))), args

    return build


def _box2seg():
    loss = boxloss.Box2SegLoss()
    return (lambda probs, attention, embeddings: loss(probs, attention, embeddings, _label_map(), _label_map(4))), {
        "probs": _softmax(B, C, H, W),
        "attention": _rand(B, C - 1, H, W, seed=3),
        "embeddings": torch.randn(B, 4, H, W, generator=_g(5), dtype=torch.float64),
    }


def _bana_boxes():
    return make_bana_boxes(B, 2 * H, 2 * W, 2)


def _attention():
    boxes, batch = _bana_boxes()
    return (lambda features: boxloss.background_attention(features, boxes, batch, spatial_scale=0.5).attention), {
        "features": make_features(B, 4, H, W)
    }


def _pool():
    boxes, batch = _bana_boxes()
    return (
        lambda features, attention: boxloss.background_aware_pool(
            features, attention, boxes, batch, output_size=2, spatial_scale=0.5
        )
    ), {"features": make_features(B, 4, H, W), "attention": _rand(B, H, W, seed=3)}


def _fused_pool():
    boxes, batch = _bana_boxes()
    bap = boxloss.BackgroundAwarePooling(grid_size=2, output_size=2, spatial_scale=0.5)
    return (lambda features: bap(features, boxes, batch)[0]), {"features": make_features(B, 4, H, W)}


def _bap_classification(with_bias):
    def build():
        args = {
            "pooled": torch.randn(3, 4, 2, 2, generator=_g(0), dtype=torch.float64),
            "queries": torch.randn(B, 4, 4, generator=_g(1), dtype=torch.float64),
            "classifier_weight": torch.randn(C, 4, generator=_g(2), dtype=torch.float64),
        }
        if with_bias:
            args["classifier_bias"] = torch.randn(C, generator=_g(3), dtype=torch.float64)
        valid = torch.ones(B, 4, dtype=torch.bool)
        labels = torch.tensor([1, 2, 1])
        return (
            lambda pooled, queries, classifier_weight, classifier_bias=None: boxloss.bap_classification_loss(
                pooled, labels, queries, valid, classifier_weight, classifier_bias
            )
        ), args

    return build


def _noise_aware(fn):
    def build():
        args = {
            "features": torch.randn(B, 4, H, W, generator=_g(0), dtype=torch.float64),
            "classifier_weight": torch.randn(C, 4, generator=_g(1), dtype=torch.float64),
        }
        if fn == "cosine_logits":
            return (lambda features, classifier_weight: boxloss.cosine_logits(features, classifier_weight)), args
        return (
            lambda features, classifier_weight: boxloss.noise_aware_loss(
                features, classifier_weight, _label_map(), _label_map(4)
            )
        ), args

    return build


def _uncertainty_binary(fn):
    def build():
        mu, log_var, target, box_mask, _ = make_binary_inputs(B, H, W, box_fraction=0.7)
        return (lambda mu, log_var, target: fn(mu, log_var, target, box_mask)), {
            "mu": mu,
            "log_var": log_var,
            "target": target,
        }

    return build


def _uncertainty_ce():
    mu, log_var, target, box_mask, _ = make_class_inputs(B, C, H, W, box_fraction=0.7)
    return (lambda mu, log_var: boxloss.uncertainty_ce_loss(mu, log_var, target, seed=1, box_mask=box_mask)), {
        "mu": mu,
        "log_var": log_var,
    }


# (function, its float arguments and their domains, builder, the names an error may carry)
FUNCTIONS = [
    ("sparse_crf_loss", {"probs": P, "image": F}, _sparse_crf, ()),
    # The lattice is built (and its image checked) by the op the loss and the filter share.
    ("dense_crf_loss", {"probs": P, "image": F}, _dense_crf, ("permutohedral_lattice",)),
    ("bilateral_filter", {"values": F, "image": F}, _bilateral, ("permutohedral_lattice", "lattice_filter")),
    ("dense_crf_inference", {"unary": U, "image": F}, _crf_inference, ()),
    # NaN inside a box is an error of the op the box priors share.
    ("tight_box_loss", {"probs": M}, _box_prior(boxloss.tight_box_loss), ("box_row_col_max",)),
    ("mil_box_loss", {"probs": M}, _box_prior(boxloss.mil_box_loss), ("box_row_col_max",)),
    ("projection_loss", {"probs": M}, _box_prior(boxloss.projection_loss), ("box_row_col_max",)),
    (
        "border_background_loss",
        {"fg_probs": P},
        _region(boxloss.border_background_loss, border_mask=_rand(H, W) > 0.5),
        (),
    ),
    ("volumetric_loss", {"fg_probs": P}, _region(boxloss.volumetric_loss), ()),
    ("positional_loss", {"fg_probs": P}, _region(boxloss.positional_loss), ()),
    ("negative_loss", {"fg_probs": P}, _region(boxloss.negative_loss), ()),
    # The image goes straight into the Sparse-CRF term, whose kernel checks it.
    ("RegularizedLoss", {"fg_probs": P, "image": F}, _regularized("tight"), ("sparse_crf_loss",)),
    ("RegularizedLoss", {"fg_probs": P, "image": F}, _regularized("centre"), ("sparse_crf_loss",)),
    ("box_ce_loss", {"probs": P}, _ce(boxloss.box_ce_loss, "box_masks", False), ()),
    ("box_ce_loss", {"probs": P, "box_masks": P}, _ce(boxloss.box_ce_loss, "box_masks", True), ()),
    (
        "pseudo_label_ce_loss",
        {"probs": P, "pseudo_labels": P},
        _ce(boxloss.pseudo_label_ce_loss, "pseudo_labels", True),
        (),
    ),
    ("attention_foreground_loss", {"probs": P, "attention": P}, _attention_loss(boxloss.attention_foreground_loss), ()),
    ("attention_background_loss", {"probs": P}, _background_only, ()),
    ("attention_weighted_loss", {"probs": P, "attention": P}, _attention_loss(boxloss.attention_weighted_loss), ()),
    (
        "attention_box_regulariser",
        {"attention": P},
        _attention_loss(boxloss.attention_box_regulariser, with_probs=False),
        (),
    ),
    ("fill_rate_hinge_loss", {"attention": P}, _fill_rate_hinge, ()),
    ("fill_rates", {"attention": P}, _fill_rates, ()),
    ("affinity_loss", {"embeddings": F, "probs": P}, _affinity("exact"), ()),
    ("affinity_loss", {"embeddings": F, "probs": P}, _affinity("sampled"), ()),
    ("Box2SegLoss", {"probs": P, "attention": P, "embeddings": F}, _box2seg, ()),
    ("background_attention", {"features": F}, _attention, ()),
    ("background_aware_pool", {"features": F, "attention": P}, _pool, ()),
    # The fused op computes the attention first, and checks the features there.
    ("BackgroundAwarePooling", {"features": F}, _fused_pool, ("background_attention",)),
    (
        "bap_classification_loss",
        {"pooled": F, "queries": F, "classifier_weight": F, "classifier_bias": F},
        _bap_classification(True),
        (),
    ),
    ("noise_aware_loss", {"features": F, "classifier_weight": F}, _noise_aware("noise_aware_loss"), ()),
    ("cosine_logits", {"features": F, "classifier_weight": F}, _noise_aware("cosine_logits"), ()),
    (
        "uncertainty_bce_loss",
        {"mu": F, "log_var": F, "target": P},
        _uncertainty_binary(boxloss.uncertainty_bce_loss),
        (),
    ),
    ("uncertainty_l2_loss", {"mu": F, "log_var": F, "target": F}, _uncertainty_binary(boxloss.uncertainty_l2_loss), ()),
    ("uncertainty_ce_loss", {"mu": F, "log_var": F}, _uncertainty_ce, ()),
]

CORRUPTIONS = {
    F: ["nan", "inf", "-inf"],
    P: ["nan", "inf", "-inf", "above_one", "below_zero", "logits"],
    M: ["nan", "inf", "above_one", "logits"],
    U: ["nan", "-inf"],
}
EXPECTED_WORDS = {
    "nan": "NaN",
    "inf": "Inf",
    "-inf": "Inf",
    "above_one": "outside \\[0, 1\\]",
    "below_zero": "outside \\[0, 1\\]",
    "logits": "",
}

CASES = [
    pytest.param(fn, arg, domain, build, aliases, corruption, id=f"{fn}-{arg}-{corruption}-{i}")
    for i, (fn, args, build, aliases) in enumerate(FUNCTIONS)
    for arg, domain in args.items()
    for corruption in CORRUPTIONS[domain]
]


def corrupt(tensor: torch.Tensor, corruption: str, *, index: int | None = None) -> torch.Tensor:
    """A copy of ``tensor`` with one element (by default the one in the middle) replaced, or all of it for logits."""
    out = tensor.clone(memory_format=torch.contiguous_format)
    if corruption == "logits":
        return 4 * torch.randn(tensor.shape, generator=_g(11), dtype=tensor.dtype)
    value = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "above_one": 1.5, "below_zero": -0.5}[corruption]
    flat = out.view(-1)
    flat[flat.numel() // 2 if index is None else index] = value
    return out


@pytest.mark.parametrize("fn, arg, domain, build, aliases, corruption", CASES)
def test_value_out_of_domain_raises(fn, arg, domain, build, aliases, corruption):
    call, arguments, *where = build()
    call(**arguments)  # the uncorrupted call works
    arguments[arg] = corrupt(arguments[arg], corruption, index=where[0].get(arg) if where else None)
    names = "|".join([fn, *aliases])
    with pytest.raises(ValueError, match=rf"^({names}): {arg} must .*{EXPECTED_WORDS[corruption]}"):
        call(**arguments)


@pytest.mark.parametrize("fn", ["tight_box_loss", "mil_box_loss", "projection_loss"])
@pytest.mark.parametrize("value", [math.inf, 1e30, 2.0])
def test_box_priors_infinite_probability_inside_a_box(fn, value):
    # The README's promise: the box losses never produce Inf or NaN.  A value above 1 inside a box
    # becomes a row or column maximum, which the losses read: it raises rather than give Inf (tight),
    # -Inf (MIL) or NaN (projection).
    probs = _softmax(B, C, H, W)
    boxes, batch, labels = _boxes()
    probs.view(-1)[INSIDE_BOX] = value
    with pytest.raises(ValueError, match=rf"^{fn}: probs must hold probabilities in \[0, 1\]"):
        getattr(boxloss, fn)(probs, boxes, batch, labels)


@pytest.mark.parametrize("fn", ["tight_box_loss", "mil_box_loss", "projection_loss"])
def test_box_priors_clamp_inside_compiled_graphs(fn):
    # A compiled graph cannot raise on values; the maxima are clamped to [0, 1] there, so the loss stays finite.
    probs = _softmax(B, C, H, W)
    boxes, batch, labels = _boxes()
    probs.view(-1)[INSIDE_BOX] = math.inf
    loss = getattr(boxloss, fn)
    compiled = torch.compile(lambda p: loss(p, boxes, batch, labels), fullgraph=True, backend="aot_eager")
    value = compiled(probs)
    assert torch.isfinite(value).all()
    clamped = probs.clamp(0, 1)
    torch.testing.assert_close(value, loss(clamped, boxes, batch, labels))


def test_background_aware_pool_nan_attention_does_not_fall_back_to_the_mean():
    # A NaN weight made the bin's weight sum "not positive", which pooled the plain mean silently.
    boxes, batch = _bana_boxes()
    features, attention = make_features(B, 4, H, W), _rand(B, H, W, seed=3)
    attention[0] = math.nan
    with pytest.raises(ValueError, match="^background_aware_pool: attention must hold values in \\[0, 1\\].*NaN"):
        boxloss.background_aware_pool(features, attention, boxes, batch, output_size=2, spatial_scale=0.5)


@pytest.mark.parametrize("value", [1.5, -0.25])
def test_background_aware_pool_attention_out_of_range_raises(value):
    # With A = 1.5 the weights 1 - A are negative and the pooled features left the features' range.
    boxes, batch = _bana_boxes()
    features = make_features(B, 4, H, W)
    attention = torch.full((B, H, W), value, dtype=torch.float64)
    with pytest.raises(ValueError, match="^background_aware_pool: attention must hold values in \\[0, 1\\]"):
        boxloss.background_aware_pool(features, attention, boxes, batch, output_size=1, spatial_scale=0.5)


@pytest.mark.parametrize("arg", ["mu", "log_var"])
@pytest.mark.parametrize("where", ["box", "outside", "ignored"])
def test_uncertainty_ce_nan_is_not_absorbed(arg, where):
    # The kernels clamp their exponentials, so a NaN would come out as a finite loss (3.4e38 at a box pixel): it raises.
    mu, log_var, target, _, _ = make_class_inputs(1, C, H, W)
    box_mask = torch.zeros(1, H, W, dtype=torch.bool)
    box_mask[0, :4] = True
    row = {"box": 1, "outside": 6, "ignored": 7}[where]
    target[0, 7] = 255
    tensors = {"mu": mu, "log_var": log_var}
    tensors[arg][0, 1, row, 2] = math.nan
    with pytest.raises(ValueError, match=f"^uncertainty_ce_loss: {arg} must be finite, but it contains NaN"):
        boxloss.uncertainty_ce_loss(tensors["mu"], tensors["log_var"], target, seed=0, box_mask=box_mask)


def test_checks_are_skipped_inside_compiled_graphs():
    # The plain-PyTorch losses check values in eager mode only: a compiled graph must stay whole.
    probs, attention, labels = _softmax(B, C, H, W), _rand(B, C - 1, H, W, seed=3), _label_map()
    embeddings = torch.randn(B, 4, H, W, generator=_g(5), dtype=torch.float64)
    loss = boxloss.Box2SegLoss()
    step = torch.compile(lambda p, a, e: loss(p, a, e, labels, labels), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(step(probs, attention, embeddings), loss(probs, attention, embeddings, labels, labels))
