"""boxloss.pydensecrf_inference: pydensecrf's mean-field on batched tensors, and its input checks."""

import math

import numpy as np
import pytest
import torch

import boxloss
from boxloss import _pydensecrf


def _inputs(seed=0, B=2, C=3, H=9, W=11):
    g = torch.Generator().manual_seed(seed)
    unary = -torch.log_softmax(2 * torch.randn(B, C, H, W, generator=g, dtype=torch.float64), 1)
    image = torch.randint(0, 256, (B, 3, H, W), generator=g, dtype=torch.uint8)
    return unary, image


def _one_image(unary, image, bilateral, gaussian, iterations):
    """pydensecrf called directly on one (C, H, W) unary and (3, H, W) uint8 image."""
    crf = _pydensecrf.load("test")
    C, H, W = unary.shape
    model = crf.DenseCRF2D(W, H, C)
    model.setUnaryEnergy(np.ascontiguousarray(unary.float().reshape(C, -1).numpy()))
    model.addPairwiseGaussian(sxy=gaussian[1], compat=gaussian[0])
    rgb = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
    model.addPairwiseBilateral(sxy=bilateral[1], srgb=bilateral[2], rgbim=rgb, compat=bilateral[0])
    return torch.from_numpy(np.array(model.inference(iterations), dtype=np.float32).reshape(C, H, W))


def test_each_image_is_pydensecrf_on_that_image():
    pytest.importorskip("pydensecrf.densecrf")
    unary, image = _inputs()
    kw = {"bilateral": (4.0, 5.0, 13.0), "gaussian": (3.0, 1.5), "iterations": 4}
    q = boxloss.pydensecrf_inference(unary, image, **kw)
    assert q.shape == unary.shape and q.dtype == torch.float32
    for b in range(unary.shape[0]):
        assert torch.equal(q[b], _one_image(unary[b], image[b], kw["bilateral"], kw["gaussian"], kw["iterations"]))
    # float colours are rounded to pydensecrf's uint8
    assert torch.equal(boxloss.pydensecrf_inference(unary, image.double() + 0.3, **kw), q)
    # the pairwise terms change the marginals: the test above compares something that moved
    assert (q - torch.softmax(-unary.float(), 1)).abs().max() > 0.05


def test_weights_zero_leave_the_unaries_and_inf_makes_a_label_impossible():
    pytest.importorskip("pydensecrf.densecrf")
    unary, image = _inputs(1)
    q = boxloss.pydensecrf_inference(unary, image, bilateral=(0.0, 5.0, 10.0), gaussian=(0.0, 3.0), iterations=3)
    torch.testing.assert_close(q, torch.softmax(-unary.float(), 1), atol=1e-5, rtol=1e-4)
    unary[:, 2, :4] = math.inf
    q = boxloss.pydensecrf_inference(unary, image, iterations=3)
    assert bool(torch.isfinite(q).all()) and bool((q[:, 2, :4] == 0).all())
    torch.testing.assert_close(q.sum(1), torch.ones(2, 9, 11), atol=1e-4, rtol=0)


def test_empty_batch_needs_no_pydensecrf():
    q = boxloss.pydensecrf_inference(torch.zeros(0, 3, 4, 4), torch.zeros(0, 3, 4, 4))
    assert q.shape == (0, 3, 4, 4)


@pytest.mark.parametrize(
    "change, exc, words",
    [
        (lambda u, i: (u[0], i), ValueError, r"unary must have shape \(B, C, H, W\)"),
        (lambda u, i: (u.long(), i), TypeError, "unary must be float16"),
        (lambda u, i: (u, i[:, :2]), ValueError, r"image must have shape \(B, 3, H, W\) = \(2, 3, 9, 11\)"),
        (lambda u, i: (u, i[..., :5]), ValueError, "image must have shape"),
        (lambda u, i: (u, i > 0), ValueError, "image must hold uint8 or float colours"),
        (lambda u, i: (u, i.double().index_fill(2, torch.tensor([1]), math.nan)), ValueError, "image must be finite"),
        (lambda u, i: (u.index_fill(1, torch.tensor([0]), math.nan), i), ValueError, "unary must not hold NaN"),
        (
            lambda u, i: (u.index_fill(1, torch.tensor([0]), -math.inf), i),
            ValueError,
            "unary must not hold NaN or -inf",
        ),
        (
            lambda u, i: (u.index_fill(3, torch.tensor([4]), math.inf), i),
            ValueError,
            r"unary is \+inf for every class at image 0, pixel \(row 0, column 4\)",
        ),
    ],
)
def test_bad_tensors_name_the_argument(change, exc, words):
    unary, image = change(*_inputs())
    with pytest.raises(exc, match=f"pydensecrf_inference: {words}"):
        boxloss.pydensecrf_inference(unary, image)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"bilateral": (4.0, 0.0, 3.0)}, "bilateral's sigmas must be finite and > 0"),
        ({"bilateral": (4.0, 55.0, math.nan)}, "bilateral's sigmas must be finite and > 0"),
        ({"gaussian": (3.0, -1.0)}, "gaussian's sigmas must be finite and > 0"),
        ({"gaussian": (-3.0, 3.0)}, "gaussian's weight must be finite and >= 0"),
        ({"bilateral": (4.0, 55.0)}, r"bilateral must be 3 numbers \(weight, sigma_xy, sigma_rgb\)"),
        ({"gaussian": 3.0}, "gaussian must be 2 numbers"),
        ({"gaussian": ("3", 3.0)}, "gaussian must be 2 numbers"),
        ({"iterations": 0}, "iterations must be an int >= 1"),
        ({"iterations": 2.0}, "iterations must be an int >= 1"),
    ],
)
def test_bad_settings_name_the_argument(kwargs, words):
    unary, image = _inputs()
    with pytest.raises(ValueError, match=f"pydensecrf_inference: {words}"):
        boxloss.pydensecrf_inference(unary, image, **kwargs)
