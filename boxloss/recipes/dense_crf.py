"""Mean-field DenseCRF inference through pydensecrf, batched in the calling convention of the boxloss op.

Krähenbühl & Koltun, "Efficient Inference in Fully Connected CRFs with Gaussian
Edge Potentials", NeurIPS 2011: the Potts model with an appearance kernel
(positions and colours) and a smoothness kernel (positions), as DeepLab and the
box-supervised papers run it for their pseudo labels and post-processing.
:func:`pydensecrf_inference` takes and returns tensors in the layout of
``boxloss.dense_crf_inference`` (unaries (B, C, H, W) negative
log-probabilities, colours (B, 3, H, W) in [0, 255], marginals (B, C, H, W)),
so a caller can switch between the two; it runs one image at a time on the CPU.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from boxloss import _checks, _pydensecrf


def _check_settings(fn: str, bilateral, gaussian, iterations) -> tuple[tuple[float, ...], tuple[float, ...], int]:
    """The kernels as float tuples and the iteration count; raises naming the argument (pydensecrf crashes the
    process on a NaN kernel width)."""
    kernels = {}
    for name, value, layout in (
        ("bilateral", bilateral, "(weight, sigma_xy, sigma_rgb)"),
        ("gaussian", gaussian, "(weight, sigma_xy)"),
    ):
        size = 3 if name == "bilateral" else 2
        try:
            numbers = tuple(value)
        except TypeError:
            numbers = None
        if (
            numbers is None
            or len(numbers) != size
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in numbers)
        ):
            raise ValueError(f"{fn}: {name} must be {size} numbers {layout}, got {value!r}")
        weight, *sigmas = (float(v) for v in numbers)
        if not 0 <= weight < math.inf:
            raise ValueError(f"{fn}: {name}'s weight must be finite and >= 0, got {value!r}")
        if not all(0 < s < math.inf for s in sigmas):
            raise ValueError(f"{fn}: {name}'s sigmas must be finite and > 0, got {value!r}")
        kernels[name] = (weight, *sigmas)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"{fn}: iterations must be an int >= 1, got {iterations!r}")
    return kernels["bilateral"], kernels["gaussian"], iterations


@torch.no_grad()
def pydensecrf_inference(
    unary: torch.Tensor,
    image: torch.Tensor,
    *,
    bilateral: tuple[float, float, float] = (4.0, 55.0, 3.0),
    gaussian: tuple[float, float] = (3.0, 3.0),
    iterations: int = 10,
) -> torch.Tensor:
    """Marginals Q of a fully connected CRF after ``iterations`` mean-field steps, through pydensecrf.

    Each image is a ``DenseCRF2D`` with ``setUnaryEnergy(unary)``,
    ``addPairwiseGaussian(sxy=gaussian[1], compat=gaussian[0])`` and
    ``addPairwiseBilateral(sxy=bilateral[1], srgb=bilateral[2], compat=bilateral[0])``
    on the colours rounded to uint8 (pydensecrf's input); a kernel of weight 0 is
    left out.

    Args:
        unary: (B, C, H, W) negative log-probabilities, any float dtype.  ``+inf``
            makes a label impossible at a pixel; NaN, ``-inf``, or ``+inf`` for
            every class of a pixel raise ``ValueError``.
        image: (B, 3, H, W) RGB colours in [0, 255], uint8 or float (finite).
        bilateral: (weight, sigma_xy, sigma_rgb) of the appearance kernel; the
            default is the official setting of BANA (Oh, Kim & Ham, CVPR 2021).
        gaussian: (weight, sigma_xy) of the smoothness kernel.
        iterations: mean-field steps, >= 1.

    Returns:
        Q (B, C, H, W) float32 on the CPU, per-pixel probabilities.

    Raises:
        ImportError (``PyDenseCRFUnavailable``) with the command that installs
        pydensecrf when it is missing or its build does not run.

    Example:
        >>> probs = torch.rand(1, 3, 16, 16).softmax(1)
        >>> image = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
        >>> q = boxloss.pydensecrf_inference(-probs.log(), image, iterations=5)
        >>> q.shape
        torch.Size([1, 3, 16, 16])
    """
    fn = "pydensecrf_inference"
    _checks.check_tensor(fn, "unary", unary, dim=4, layout="(B, C, H, W)")
    _checks.check_float_dtype(fn, "unary", unary)
    _checks.check_tensor(fn, "image", image, dim=4, layout="(B, 3, H, W)")
    B, C, H, W = unary.shape
    if tuple(image.shape) != (B, 3, H, W):
        raise ValueError(f"{fn}: image must have shape (B, 3, H, W) = {(B, 3, H, W)}, got {tuple(image.shape)}")
    if image.dtype == torch.bool or image.dtype.is_complex:
        raise ValueError(f"{fn}: image must hold uint8 or float colours in [0, 255], got {image.dtype}")
    bilateral, gaussian, iterations = _check_settings(fn, bilateral, gaussian, iterations)
    u = unary.detach().to("cpu", torch.float32)
    if bool(torch.isnan(u).any() | (u == -math.inf).any()):
        raise ValueError(f"{fn}: unary must not hold NaN or -inf (it is a negative log-probability)")
    if C > 0 and bool((u == math.inf).all(1).any()):
        b, y, x = (u == math.inf).all(1).nonzero()[0].tolist()
        raise ValueError(f"{fn}: unary is +inf for every class at image {b}, pixel (row {y}, column {x})")
    colours = image.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(colours).all()):
        raise ValueError(f"{fn}: image must be finite colours in [0, 255]")
    out = torch.empty(B, C, H, W, dtype=torch.float32)
    if out.numel() == 0:
        return out
    pydensecrf = _pydensecrf.load(fn)
    for b in range(B):
        rgb = np.ascontiguousarray(colours[b].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
        model = pydensecrf.DenseCRF2D(W, H, C)
        model.setUnaryEnergy(np.ascontiguousarray(u[b].reshape(C, -1).numpy()))
        if gaussian[0] > 0:
            model.addPairwiseGaussian(sxy=gaussian[1], compat=gaussian[0])
        if bilateral[0] > 0:
            model.addPairwiseBilateral(sxy=bilateral[1], srgb=bilateral[2], rgbim=rgb, compat=bilateral[0])
        out[b] = torch.from_numpy(np.array(model.inference(iterations), dtype=np.float32).reshape(C, H, W))
    return out
