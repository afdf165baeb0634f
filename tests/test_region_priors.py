"""Volumetric, positional, negative and border losses against per-pixel references,
the regularized loss's composition, and the volumetric loss under DDP."""

from __future__ import annotations

import os
import sys

import pytest
import torch

import boxloss
from boxloss.reference.region_priors import (
    border_background_loss_reference,
    negative_loss_reference,
    positional_loss_reference,
    volumetric_loss_reference,
)


def _x(B=4, H=9, W=11, seed=0, low=0.0, high=1.0):
    g = torch.Generator().manual_seed(seed)
    return (low + (high - low) * torch.rand(B, H, W, generator=g, dtype=torch.float64)).requires_grad_()


def _grad(value, x):
    (g,) = torch.autograd.grad(value.sum(), x)
    return g


@pytest.mark.parametrize("shape", [(4, 9, 11), (1, 1, 1), (3, 2, 7), (2, 6, 6)])
@pytest.mark.parametrize("s_min", [0.15, 0.3, 0.9])
def test_volumetric_matches_reference(shape, s_min):
    x = _x(*shape, seed=sum(shape), high=0.6)
    a = boxloss.volumetric_loss(x, s_min=s_min, lambda_s=5.0)
    b = volumetric_loss_reference(x, s_min=s_min, lambda_s=5.0)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(_grad(a, x), _grad(b, x), rtol=1e-6, atol=1e-12)


def test_volumetric_valid_mask_and_channel_form():
    x = _x(3, 8, 8, seed=4)
    mask = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[2] = False  # an image without valid pixels is left out
    a = boxloss.volumetric_loss(x[:, None], s_min=0.6, valid_mask=mask)
    b = volumetric_loss_reference(x, s_min=0.6, valid_mask=mask)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(_grad(a, x), _grad(b, x), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 9, 11), (1, 1, 1), (2, 4, 7), (1, 12, 5)])
@pytest.mark.parametrize("border_width, centre_size", [(3, 3), (1, 2), (0, 1), (6, 5)])
def test_positional_matches_reference(shape, border_width, centre_size):
    x = _x(*shape, seed=7)
    a = boxloss.positional_loss(x, border_width=border_width, centre_size=centre_size, reduction="none")
    b = positional_loss_reference(x, border_width=border_width, centre_size=centre_size)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(_grad(a, x), _grad(b, x), rtol=1e-6, atol=1e-12)


def test_positional_with_border_and_centre_masks_matches_reference():
    x = _x(3, 9, 10, seed=8)
    g = torch.Generator().manual_seed(3)
    border = torch.rand(3, 9, 10, generator=g) > 0.6
    centre = torch.rand(3, 9, 10, generator=g) > 0.8
    centre[2] = False  # no centre pixel: that term is 0
    a = boxloss.positional_loss(x, border_mask=border, centre_mask=centre, reduction="none")
    b = positional_loss_reference(x, border_mask=border, centre_mask=centre)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(_grad(a, x), _grad(b, x), rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match="border_mask must have shape"):
        boxloss.positional_loss(x, border_mask=border[:, :4])


def test_negative_and_border_match_reference():
    x = _x(3, 7, 8, seed=11)
    torch.testing.assert_close(boxloss.negative_loss(x, reduction="none"), negative_loss_reference(x))
    border = boxloss.image_border_mask(7, 8, 2).expand(3, 7, 8).clone()
    border[1] = False  # an empty border contributes 0
    x1 = x.detach().clone()
    x1[0, 0, 0] = 1.0  # log(1 - 1) is clamped, not Inf
    x1.requires_grad_()
    a = boxloss.border_background_loss(x1[:, None], border, reduction="none")
    b = border_background_loss_reference(x1, border)
    assert torch.isfinite(a).all() and a[1] == 0
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(_grad(a, x1), _grad(b, x1), rtol=1e-6, atol=1e-12)


def test_masks():
    assert boxloss.image_border_mask(5, 6, 1).sum() == 5 * 6 - 3 * 4
    assert boxloss.image_border_mask(4, 4, 3).all()
    centre = boxloss.image_centre_mask(7, 8, 3)
    assert centre.sum() == 9 and centre[2:5, 2:5].all()
    assert boxloss.image_centre_mask(2, 2, 3).all()


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: boxloss.volumetric_loss(torch.rand(2, 3, 4, 4)), ValueError, r"shape \(B, H, W\) or \(B, 1, H, W\)"),
        (lambda: boxloss.volumetric_loss(torch.rand(2, 4, 4) * 3), ValueError, "probabilities in \\[0, 1\\]"),
        (lambda: boxloss.volumetric_loss(torch.full((2, 4, 4), float("nan"))), ValueError, "NaN"),
        (lambda: boxloss.volumetric_loss(torch.rand(2, 4, 4), s_min=1.5), ValueError, "s_min must be"),
        (lambda: boxloss.volumetric_loss(torch.rand(2, 4, 4), lambda_s=-1), ValueError, "lambda_s must be"),
        (lambda: boxloss.volumetric_loss(torch.rand(2, 4, 4).long()), TypeError, "fg_probs must be float"),
        (lambda: boxloss.volumetric_loss(torch.rand(2, 4, 4), distributed=True), RuntimeError, "process group"),
        (
            lambda: boxloss.positional_loss(torch.rand(2, 4, 4), border_width=-1),
            ValueError,
            "border_width must be >= 0",
        ),
        (lambda: boxloss.positional_loss(torch.rand(2, 4, 4), centre_size=0), ValueError, "centre_size must be >= 1"),
        (lambda: boxloss.negative_loss(torch.rand(2, 4, 4), reduction="avg"), ValueError, "reduction must be one of"),
        (lambda: boxloss.negative_loss(torch.rand(2, 4, 4), valid_mask=torch.ones(2, 4, 4)), TypeError, "bool tensor"),
        (
            lambda: boxloss.border_background_loss(torch.rand(2, 4, 4), torch.ones(3, 4, 4, dtype=torch.bool)),
            ValueError,
            "border_mask must have shape",
        ),
        (lambda: boxloss.border_background_loss(torch.rand(2, 4, 4), None), TypeError, "border_mask must be a bool"),
        (
            lambda: boxloss.border_background_loss(torch.rand(2, 4, 4) + 1, torch.ones(4, 4, dtype=torch.bool)),
            ValueError,
            "fg_probs must hold probabilities",
        ),
    ],
)
def test_bad_input_raises_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ---------------------------------------------------------------------------
# RegularizedLoss


def _crop_batch(B=4, H=20, W=18, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 1, H, W, generator=g, dtype=torch.float64).requires_grad_()
    image = torch.rand(B, 3, H, W, generator=g, dtype=torch.float64)
    return x, image


def test_regularized_loss_is_the_weighted_sum_of_its_terms():
    x, image = _crop_batch()
    negative = torch.tensor([False, False, True, False])
    loss_fn = boxloss.RegularizedLoss.paper("ours(T+N)")
    total, terms = loss_fn(x, image, negative=negative, return_terms=True)
    pos = ~negative
    xs = x[:, 0]
    crf = boxloss.sparse_crf_loss(x[pos], image[pos], sigma=0.15, neighbourhood=4)
    vol = volumetric_loss_reference(xs[pos], s_min=0.3, lambda_s=5.0)
    border = boxloss.image_border_mask(20, 18, 3).expand(3, 20, 18)
    inner = torch.tensor([[3.0, 3.0, 15.0, 17.0]], dtype=torch.float64).expand(3, 4)
    tight = boxloss.tight_box_loss(x[pos], inner, torch.arange(3), torch.zeros(3, dtype=torch.long), reduction="none")
    positional = (border_background_loss_reference(xs[pos], border) + tight).mean()
    neg = negative_loss_reference(xs[negative]).mean()
    expected = 100 * crf + vol + positional + neg
    torch.testing.assert_close(terms["crf"], crf)
    torch.testing.assert_close(terms["volumetric"], vol)
    torch.testing.assert_close(terms["positional"], positional)
    torch.testing.assert_close(terms["negative"], neg)
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(_grad(total, x), _grad(expected, x))


def test_regularized_ablation_settings():
    x, image = _crop_batch(seed=3)
    negative = torch.tensor([False, True, False, False])
    ours = boxloss.RegularizedLoss.paper("ours")
    ours_t = boxloss.RegularizedLoss.paper("ours(T)")
    ours_tn = boxloss.RegularizedLoss.paper("ours(T+N)")
    _, t_centre = ours(x, image, negative=negative, return_terms=True)
    _, t_tight = ours_t(x, image, negative=negative, return_terms=True)
    _, t_neg = ours_tn(x, image, negative=negative, return_terms=True)
    assert "negative" not in t_centre and "negative" not in t_tight and "negative" in t_neg
    pos = ~negative
    expected_centre = positional_loss_reference(x[pos, 0]).mean()
    torch.testing.assert_close(t_centre["positional"], expected_centre)
    assert not torch.allclose(t_centre["positional"], t_tight["positional"])
    torch.testing.assert_close(t_tight["positional"], t_neg["positional"])
    assert ours.s_min == ours_t.s_min == 0.3 and ours.lambda_crf == 100.0 and ours.neighbourhood == 4


def test_regularized_custom_boxes_and_masks():
    x, image = _crop_batch(B=2, H=16, W=16, seed=5)
    boxes = torch.tensor([[8.0, 8.0, 40.0, 56.0], [0.0, 0.0, 64.0, 64.0]], dtype=torch.float64)
    border = torch.zeros(2, 16, 16, dtype=torch.bool)
    border[:, 0] = True
    loss_fn = boxloss.RegularizedLoss(use_negative=False)
    _, terms = loss_fn(x, image, boxes=boxes, spatial_scale=0.25, border_mask=border, return_terms=True)
    tight = boxloss.tight_box_loss(
        x, boxes, torch.arange(2), torch.zeros(2, dtype=torch.long), spatial_scale=0.25, reduction="none"
    )
    expected = (border_background_loss_reference(x[:, 0], border) + tight).mean()
    torch.testing.assert_close(terms["positional"], expected)
    with pytest.raises(ValueError, match="boxes must be a"):
        loss_fn(x, image, boxes=boxes[:1])
    with pytest.raises(ValueError, match="negative must be a bool tensor"):
        loss_fn(x, image, negative=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="prior must be one of"):
        boxloss.RegularizedLoss(prior="middle")
    with pytest.raises(ValueError, match="variant must be one of"):
        boxloss.RegularizedLoss.paper("ours(N)")


def test_regularized_centre_prior_uses_the_crop_margin_and_box_centre():
    x, image = _crop_batch(B=2, H=16, W=16, seed=6)
    boxes = torch.tensor([[2.0, 4.0, 10.0, 12.0], [0.0, 0.0, 16.0, 16.0]], dtype=torch.float64)
    border = torch.zeros(2, 16, 16, dtype=torch.bool)
    border[:, :, 0] = True
    border[1, 15] = True
    loss_fn = boxloss.RegularizedLoss.paper("ours")
    _, terms = loss_fn(x, image, boxes=boxes, border_mask=border, return_terms=True)
    centre = torch.zeros(2, 16, 16, dtype=torch.bool)
    centre[0, 6:9, 4:7] = True  # the 3 x 3 square around the first box's centre (6, 8) -> rows 6..8, columns 4..6
    centre[1, 6:9, 6:9] = True  # the whole-map box: the map's centre square
    torch.testing.assert_close(centre[1], boxloss.image_centre_mask(16, 16, 3))
    expected = positional_loss_reference(x[:, 0], border_mask=border, centre_mask=centre).mean()
    torch.testing.assert_close(terms["positional"], expected)
    # without them it is the map's border and centre, as before
    _, plain = loss_fn(x, image, return_terms=True)
    torch.testing.assert_close(plain["positional"], positional_loss_reference(x[:, 0]).mean())


@pytest.mark.parametrize("size", [(1, 1), (4, 4), (5, 5), (1, 17), (17, 6)])
def test_regularized_small_maps_name_the_border_not_an_invented_box(size):
    # The tight prior's default box is the crop minus its 3-pixel border; on a map too small for one the error says
    # so and what to pass, rather than naming an inverted box the caller never passed.
    H, W = size
    x, image = _crop_batch(B=2, H=H, W=W, seed=3)
    with pytest.raises(ValueError, match=f"^RegularizedLoss: .*border_width = 3 .* of a {H} x {W} map; pass boxes"):
        boxloss.RegularizedLoss()(x, image)
    # With boxes, a smaller border or the centre prior the same map works.
    boxes = torch.tensor([[0.0, 0.0, W, H]] * 2, dtype=torch.float64)
    assert torch.isfinite(boxloss.RegularizedLoss()(x, image, boxes=boxes))
    assert torch.isfinite(boxloss.RegularizedLoss(border_width=0)(x, image))
    assert torch.isfinite(boxloss.RegularizedLoss(prior="centre")(x, image))


def test_regularized_compiles_fullgraph():
    x, image = _crop_batch(B=2, H=12, W=12, seed=9)
    x = x.detach().float()
    image = image.float()
    loss_fn = boxloss.RegularizedLoss.paper("ours(T+N)")
    negative = torch.tensor([False, True])
    compiled = torch.compile(lambda a, b, n: loss_fn(a, b, negative=n), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, image, negative), loss_fn(x, image, negative=negative))


# ---------------------------------------------------------------------------
# Volumetric loss across two gloo processes


_DDP_WORKER = r"""
import sys, torch, torch.distributed as dist
import boxloss
from torch.nn.parallel import DistributedDataParallel as DDP

rank, world, init_file, out_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
torch.manual_seed(0)
model = torch.nn.Conv2d(3, 1, 3, padding=1).double()
g = torch.Generator().manual_seed(1)
images = torch.rand(6, 3, 10, 10, generator=g, dtype=torch.float64)
loss_fn = boxloss.VolumetricLoss(s_min=0.6, lambda_s=5.0, distributed=True)
ddp = DDP(model)
local = images.chunk(world)[rank]
loss = loss_fn(torch.sigmoid(ddp(local) - 1.0))
loss.backward()
torch.save({"loss": loss.detach(), "grads": [p.grad for p in model.parameters()]}, out_file)
dist.destroy_process_group()
"""


def test_volumetric_ddp_matches_single_process(tmp_path):
    import subprocess

    script = tmp_path / "worker.py"
    script.write_text(_DDP_WORKER)
    init_file = tmp_path / "init"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), "2", str(init_file), str(tmp_path / f"out{r}.pt")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err

    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 1, 3, padding=1).double()
    g = torch.Generator().manual_seed(1)
    images = torch.rand(6, 3, 10, 10, generator=g, dtype=torch.float64)
    loss = boxloss.volumetric_loss(torch.sigmoid(model(images) - 1.0), s_min=0.6, lambda_s=5.0)
    loss.backward()
    assert loss.item() > 0
    for r in range(2):
        out = torch.load(tmp_path / f"out{r}.pt")
        torch.testing.assert_close(out["loss"], loss.detach(), rtol=1e-12, atol=1e-14)
        for got, want in zip(out["grads"], model.parameters()):
            torch.testing.assert_close(got, want.grad, rtol=1e-10, atol=1e-14)
