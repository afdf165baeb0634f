"""Hypothesis fuzzing of the plain-PyTorch losses (Box2Seg, the region priors and RegularizedLoss, BANA's
noise-aware and classification losses) over shapes: NaN, Inf and (for probabilities and attention) values outside
[0, 1] and logits in every float argument raise ValueError naming the function and the argument; huge finite values
give a finite loss and gradient; double backward agrees with finite differences of the gradient."""

from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import boxloss  # noqa: E402
from value_fuzz import (  # noqa: E402
    FINITE,
    PROBABILITIES,
    assert_close_products,
    assert_rejected,
    bad_values,
    corrupt,
    directional_difference,
    hessian_vector_product,
)

P, F = PROBABILITIES, FINITE


def _softmax(g, *shape):
    return (2 * torch.randn(*shape, generator=g, dtype=torch.float64)).softmax(1)


def _uniform(g, *shape, low=0.05, high=0.95):
    return low + (high - low) * torch.rand(*shape, generator=g, dtype=torch.float64)


def _labels(g, B, C, H, W, void=False):
    y = torch.randint(0, C, (B, H, W), generator=g)
    if void:
        y[torch.rand(B, H, W, generator=g) < 0.2] = 255
    return y


@st.composite
def cases(draw, exact_gradients=False):
    """(name, call, arguments, domains, aliases): call(**arguments) is the loss; domains maps each float argument
    to P or F; aliases are the other function names an error may carry.  With ``exact_gradients`` the losses use
    settings whose gradient is the derivative of the loss (no detached weights or targets), and the arguments that
    are constants by design (RegularizedLoss's image) are left out of ``domains``."""
    B, C, H, W, D = (draw(st.integers(1, 3)), draw(st.integers(2, 4)), draw(st.integers(1, 7)),
                     draw(st.integers(1, 7)), draw(st.integers(1, 4)))  # fmt: skip
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    name = draw(
        st.sampled_from(
            [
                "box_ce_loss",
                "pseudo_label_ce_loss",
                "attention_foreground_loss",
                "attention_background_loss",
                "attention_weighted_loss",
                "attention_box_regulariser",
                "fill_rate_hinge_loss",
                "affinity_loss",
                "Box2SegLoss",
                "border_background_loss",
                "volumetric_loss",
                "positional_loss",
                "negative_loss",
                "RegularizedLoss",
                "noise_aware_loss",
                "cosine_logits",
                "bap_classification_loss",
            ]
        )
    )
    one_hot = draw(st.booleans())
    box_masks = _labels(g, B, C, H, W)
    pseudo = _labels(g, B, C, H, W, void=not one_hot)
    if one_hot:
        box_masks = torch.nn.functional.one_hot(box_masks, C).permute(0, 3, 1, 2).double()
        pseudo = torch.nn.functional.one_hot(pseudo, C).permute(0, 3, 1, 2).double()
    probs, attention = _softmax(g, B, C, H, W), _uniform(g, B, C - 1, H, W)
    embeddings = torch.randn(B, D, H, W, generator=g, dtype=torch.float64)
    fg = _uniform(g, B, 1, H, W)
    aliases = ()
    if name == "box_ce_loss":
        args, domains = {"probs": probs, "box_masks": box_masks}, {"probs": P}
        call = boxloss.box_ce_loss
    elif name == "pseudo_label_ce_loss":
        args, domains = {"probs": probs, "pseudo_labels": pseudo}, {"probs": P}
        call = boxloss.pseudo_label_ce_loss
    elif name in ("attention_foreground_loss", "attention_weighted_loss"):
        args, domains = {"probs": probs, "attention": attention, "box_masks": box_masks}, {"probs": P, "attention": P}
        call = getattr(boxloss, name)
    elif name == "attention_background_loss":
        args, domains = {"probs": probs, "box_masks": box_masks}, {"probs": P}
        call = boxloss.attention_background_loss
    elif name == "attention_box_regulariser":
        args, domains = {"attention": attention, "box_masks": box_masks}, {"attention": P}
        call = boxloss.attention_box_regulariser
    elif name == "fill_rate_hinge_loss":
        args = {"attention": attention, "pseudo_labels": pseudo, "box_masks": box_masks}
        domains = {"attention": P}
        call = boxloss.fill_rate_hinge_loss
    elif name == "affinity_loss":
        mode = draw(st.sampled_from(["exact", "sampled"]))
        args, domains = {"embeddings": embeddings, "probs": probs}, {"embeddings": F, "probs": P}
        seed = draw(st.integers(0, 99))

        def call(embeddings, probs):
            return boxloss.affinity_loss(embeddings, probs, mode=mode, generator=torch.Generator().manual_seed(seed))

    elif name == "Box2SegLoss":
        loss = boxloss.Box2SegLoss()
        args = {"probs": probs, "attention": attention, "embeddings": embeddings}
        domains = {"probs": P, "attention": P, "embeddings": F}

        def call(probs, attention, embeddings):
            return loss(probs, attention, embeddings, box_masks, pseudo)

    elif name in ("border_background_loss", "volumetric_loss", "positional_loss", "negative_loss"):
        args, domains = {"fg_probs": fg}, {"fg_probs": P}
        fn = getattr(boxloss, name)
        border = torch.rand(B, H, W, generator=g) < 0.4

        def call(fg_probs):
            return fn(fg_probs, border) if name == "border_background_loss" else fn(fg_probs)

    elif name == "RegularizedLoss":
        prior = draw(st.sampled_from(["tight", "centre"]))
        H, W = H + 6, W + 6  # the default box is the crop minus a 3-pixel border
        loss = boxloss.RegularizedLoss(prior=prior)
        args = {"fg_probs": _uniform(g, B, 1, H, W), "image": torch.rand(B, 3, H, W, generator=g, dtype=torch.float64)}
        domains, aliases = {"fg_probs": P, "image": F}, ("sparse_crf_loss",)
        if exact_gradients:
            del domains["image"]  # the colours are a constant of the Sparse-CRF term: no gradient by design
        negative = torch.rand(B, generator=g) < 0.3

        def call(fg_probs, image):
            return loss(fg_probs, image, negative=negative)

    elif name in ("noise_aware_loss", "cosine_logits"):
        weight = torch.randn(C, D, generator=g, dtype=torch.float64)
        args, domains = {"features": embeddings, "classifier_weight": weight}, {"features": F, "classifier_weight": F}
        # The confidence weights and the bootstrapped targets are detached by default: a stop-gradient, whose
        # "second derivative" is not that of the loss.
        unreliable = draw(st.sampled_from(["nal", "entropy", "ignore"] + ([] if exact_gradients else ["bootstrap"])))
        y_crf, y_ret = _labels(g, B, C, H, W, void=True), _labels(g, B, C, H, W)

        def call(features, classifier_weight):
            if name == "cosine_logits":
                return boxloss.cosine_logits(features, classifier_weight)
            return boxloss.noise_aware_loss(
                features,
                classifier_weight,
                y_crf,
                y_ret,
                unreliable=unreliable,
                beta=0.5,
                detach_confidence=not exact_gradients,
            )

    else:
        K, S, J = draw(st.integers(0, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 4))
        args = {
            "pooled": torch.randn(K, D, S, S, generator=g, dtype=torch.float64),
            "queries": torch.randn(B, J, D, generator=g, dtype=torch.float64),
            "classifier_weight": torch.randn(C, D, generator=g, dtype=torch.float64),
            "classifier_bias": torch.randn(C, generator=g, dtype=torch.float64),
        }
        domains = dict.fromkeys(args, F)
        labels = torch.randint(1, C, (K,), generator=g)
        valid = torch.rand(B, J, generator=g) < 0.7

        def call(pooled, queries, classifier_weight, classifier_bias):
            return boxloss.bap_classification_loss(pooled, labels, queries, valid, classifier_weight, classifier_bias)

    return name, call, args, domains, aliases


@given(cases(), st.data())
def test_fuzz_bad_values_raise_naming_the_argument(case, data):
    name, call, args, domains, aliases = case
    argument = data.draw(st.sampled_from(sorted(domains)))
    if args[argument].numel() == 0:
        return
    args = dict(args)
    args[argument] = corrupt(
        args[argument], data.draw(bad_values(domains[argument])), data.draw(st.integers(0, 2**16)), 3
    )
    assert_rejected((name, *aliases), argument, lambda: call(**args))


@given(cases(), st.data())
def test_fuzz_huge_finite_values_give_a_finite_loss(case, data):
    name, call, args, domains, _ = case
    finite = sorted(a for a, d in domains.items() if d == F and args[a].numel() > 0)
    if not finite or name == "RegularizedLoss":  # a huge colour only makes the Sparse-CRF weights 0
        return
    argument = data.draw(st.sampled_from(finite))
    args = {k: v.detach().clone().requires_grad_() for k, v in args.items() if v.is_floating_point()} | {
        k: v for k, v in args.items() if not v.is_floating_point()
    }
    with torch.no_grad():
        args[argument].view(-1)[data.draw(st.integers(0, 2**16)) % args[argument].numel()] = data.draw(
            st.sampled_from([1e30, -1e30, 1e150])
        )
    out = call(**args)
    assert torch.isfinite(out).all()
    floats = [v for v in args.values() if v.requires_grad]
    grads = torch.autograd.grad(out.sum(), floats, allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)


@settings(max_examples=60)
@given(cases(exact_gradients=True))
def test_fuzz_double_backward_matches_finite_differences(case):
    name, call, args, domains, _ = case
    names = [a for a in domains if args[a].numel() > 0]
    if name == "affinity_loss" or name == "Box2SegLoss":
        names = [a for a in names if a != "probs"]  # the sampled mode's arg-max labels are piecewise constant
    inputs = [args[a] for a in names]

    def loss_fn(*xs):
        return call(**(args | dict(zip(names, xs)))).sum()

    g = torch.Generator().manual_seed(5)
    directions = [torch.randn(x.shape, generator=g, dtype=x.dtype) * 1e-2 for x in inputs]
    analytic = hessian_vector_product(loss_fn, inputs, directions)
    numeric = directional_difference(loss_fn, inputs, directions)
    assert_close_products(analytic, numeric, rtol=1e-4, atol=1e-6)
