r"""DenseCRF mean-field inference on the boxloss lattices (``boxloss::dense_crf_inference``).

Krähenbühl & Koltun, "Efficient Inference in Fully Connected CRFs with
Gaussian Edge Potentials" (NeurIPS 2011), with the kernels, normalisation and
Potts compatibility of their released code, which ``pydensecrf`` wraps
(``DenseCRF2D`` with ``addPairwiseGaussian`` and ``addPairwiseBilateral``).
Starting from :math:`Q^0 = \mathrm{softmax}(-U)`, each of ``iterations`` steps computes

.. math::
    Q_i = \mathrm{softmax}\Big(-U_i + \sum_k w_k\, n^k_i \big[L_k (n^k \odot Q)\big]_i\Big),
    \qquad n^k = (L_k \mathbf 1 + 10^{-20})^{-1/2},

over two kernels: the appearance kernel ``bilateral = (w, sigma_xy,
sigma_rgb)``, filtered on the 5-d permutohedral lattice of
``(x / sigma_xy, y / sigma_xy, rgb / sigma_rgb)`` (the lattice of
:class:`boxloss.PermutohedralLattice`), and the smoothness kernel ``gaussian =
(w, sigma_xy)``, on the 2-d lattice of ``(x / sigma_xy, y / sigma_xy)``.  The
lattice filter ``L`` includes the pixel itself, as Krähenbühl's does.  All
classes go through each lattice in one pass per step, and the whole loop runs
in one compiled op (no Python per step).  ``docs/crf_inference.md`` has the
numerics, the measured agreement with ``pydensecrf`` and the speed.
"""

from __future__ import annotations

import torch
from torch import nn

from boxloss import _checks, _fallback
from boxloss._extension import extension_loaded

_FN = "dense_crf_inference"
_IMAGE_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_kernel(fn: str, name: str, value, fields: tuple[str, ...]) -> tuple[float, ...]:
    """A (weight, sigma, ...) tuple: weight a finite number >= 0, sigmas positive and finite."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != len(fields):
        raise TypeError(f"{fn}: {name} must be a tuple ({', '.join(fields)}), got {value!r}")
    out = []
    for field, v in zip(fields, value):
        label = f"{name} {field}"
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{fn}: {label} must be a number, got {type(v).__name__}")
        v = float(v)
        if field == "weight":
            if not (v >= 0 and v != float("inf")):
                raise ValueError(f"{fn}: {label} must be a finite number >= 0 (0 drops the kernel), got {v}")
        else:
            v = _checks.check_positive(fn, label, v)
        out.append(v)
    return tuple(out)


def _check_args(unary, image, bilateral, gaussian, iterations, valid_mask):
    fn = _FN
    unary = _checks.check_tensor(fn, "unary", unary, dim=4, layout="(B, C, H, W)")
    _checks.check_float_dtype(fn, "unary", unary)
    B, C, H, W = unary.shape
    if C == 0 or H == 0 or W == 0:
        raise ValueError(f"{fn}: unary must have at least one class and one pixel, got shape {tuple(unary.shape)}")
    image = _checks.check_tensor(fn, "image", image, dim=4, layout="(B, 3, H, W)")
    if image.dtype not in _IMAGE_DTYPES:
        raise TypeError(f"{fn}: image must be uint8 or a float dtype (colours in [0, 255]), got {image.dtype}")
    if image.shape[1] != 3:
        raise ValueError(f"{fn}: image must have 3 (RGB) channels, got shape {tuple(image.shape)}")
    if image.shape[0] != B or image.shape[2:] != unary.shape[2:]:
        raise ValueError(
            f"{fn}: image must match unary in B, H and W (unary {tuple(unary.shape)}), got shape {tuple(image.shape)}"
        )
    _checks.check_same(fn, "image", image, "unary", unary, what="device")
    if valid_mask is not None:
        valid_mask = _checks.check_tensor(fn, "valid_mask", valid_mask, dim=3, layout="(B, H, W)")
        if valid_mask.dtype != torch.bool:
            raise TypeError(f"{fn}: valid_mask must be a bool tensor, got {valid_mask.dtype}")
        if valid_mask.shape != (B, H, W):
            raise ValueError(
                f"{fn}: valid_mask must have shape (B, H, W) = {(B, H, W)}, got shape {tuple(valid_mask.shape)}"
            )
        _checks.check_same(fn, "valid_mask", valid_mask, "unary", unary, what="device")
    bilateral = _check_kernel(fn, "bilateral", bilateral, ("weight", "sigma_xy", "sigma_rgb"))
    gaussian = _check_kernel(fn, "gaussian", gaussian, ("weight", "sigma_xy"))
    iterations = _checks.check_int(fn, "iterations", iterations, minimum=1)
    if torch.is_grad_enabled() and unary.requires_grad:
        raise ValueError(
            f"{fn}: unary requires grad, but mean-field inference is not differentiable here; pass "
            "unary.detach() or call it under torch.no_grad()"
        )
    return unary, image, bilateral, gaussian, iterations, valid_mask


def dense_crf_inference(
    unary: torch.Tensor,
    image: torch.Tensor,
    *,
    bilateral: tuple[float, float, float] = (4.0, 55.0, 3.0),
    gaussian: tuple[float, float] = (3.0, 3.0),
    iterations: int = 10,
    valid_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Marginals Q of a fully connected CRF after ``iterations`` mean-field steps.

    The CRF of Krähenbühl & Koltun (NeurIPS 2011) with the Potts compatibility,
    as ``pydensecrf``'s ``DenseCRF2D`` runs it (module docstring): the same
    lattices, the pixel itself inside each kernel, the symmetric normalisation.

    Args:
        unary: (B, C, H, W) negative log-probabilities, ``-log P`` (any float
            dtype; float16/bfloat16 run in float32).  ``+inf`` makes a label
            impossible (its probability is exactly 0 at every step); NaN,
            ``-inf``, or ``+inf`` for every class of a pixel raise ``ValueError``.
        image: (B, 3, H, W) RGB colours in [0, 255] (uint8 or any float dtype;
            ``bilateral``'s sigma_rgb is in these units), same device.  NaN or
            Inf raise ``ValueError``.
        bilateral: (weight, sigma_xy, sigma_rgb) of the appearance kernel, the
            order of pydensecrf's ``addPairwiseBilateral(sxy, srgb, compat=weight)``.
            The default is BANA's (Oh, Kim & Ham, CVPR 2021) and DeepLab's setting.
        gaussian: (weight, sigma_xy) of the smoothness kernel
            (``addPairwiseGaussian(sxy, compat=weight)``).  A weight of 0 drops
            a kernel; weights must be >= 0 and sigmas > 0.
        iterations: mean-field steps, >= 1.
        valid_mask: (B, H, W) bool, or None (all valid).  Invalid pixels neither
            send messages (they count as 0 in every filter, the normalisation
            included) nor receive them: their Q stays ``softmax(-U)``.  The
            lattices are those of the whole image, so the kernel between two
            valid pixels does not depend on the mask.

    Returns:
        Q (B, C, H, W) in the dtype of ``unary``, contiguous: per-pixel
        probabilities (sum 1 over C).

    Shape:
        - unary: :math:`(B, C, H, W)`, float16/bfloat16 (run in float32), float32 or float64.
        - image: :math:`(B, 3, H, W)`, uint8 or any float dtype.
        - valid_mask: :math:`(B, H, W)`, bool.
        - output: :math:`(B, C, H, W)`, dtype of ``unary``.

    Not differentiable: a ``unary`` that requires grad raises ``ValueError``
    while grad mode is on (pass ``unary.detach()``).  float64 unaries run in
    float64 throughout (the tests' precision); the others in float32.  On the
    CPU the result does not depend on the thread count.

    Example:
        >>> probs = torch.rand(1, 21, 64, 64).softmax(1)
        >>> image = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
        >>> q = boxloss.dense_crf_inference(-probs.log(), image)
        >>> labels = q.argmax(1)
    """
    unary, image, bilateral, gaussian, iterations, valid_mask = _check_args(
        unary, image, bilateral, gaussian, iterations, valid_mask
    )
    if extension_loaded():
        return torch.ops.boxloss.dense_crf_inference.default(
            unary, image, valid_mask, *bilateral, *gaussian, iterations
        )
    return _fallback.dense_crf_inference(_FN, unary, image, valid_mask, bilateral, gaussian, iterations)


class DenseCRF(nn.Module):
    """Module form of :func:`dense_crf_inference`: stores and checks the settings once.

    Example:
        >>> crf = boxloss.DenseCRF()                      # BANA's defaults, 10 steps
        >>> q = crf(-probs.log(), image)                  # (B, C, H, W) marginals
    """

    def __init__(self, bilateral=(4.0, 55.0, 3.0), gaussian=(3.0, 3.0), iterations: int = 10) -> None:
        super().__init__()
        self.bilateral = _check_kernel("DenseCRF", "bilateral", bilateral, ("weight", "sigma_xy", "sigma_rgb"))
        self.gaussian = _check_kernel("DenseCRF", "gaussian", gaussian, ("weight", "sigma_xy"))
        self.iterations = _checks.check_int("DenseCRF", "iterations", iterations, minimum=1)

    def forward(self, unary: torch.Tensor, image: torch.Tensor, valid_mask: torch.Tensor | None = None) -> torch.Tensor:
        return dense_crf_inference(
            unary,
            image,
            bilateral=self.bilateral,
            gaussian=self.gaussian,
            iterations=self.iterations,
            valid_mask=valid_mask,
        )

    def extra_repr(self) -> str:
        return f"bilateral={self.bilateral}, gaussian={self.gaussian}, iterations={self.iterations}"


def _register() -> None:
    @torch.library.register_fake("boxloss::dense_crf_inference")
    def _dense_crf_inference_fake(
        unary,
        image,
        valid_mask,
        bilateral_weight,
        bilateral_sigma_xy,
        bilateral_sigma_rgb,
        gaussian_weight,
        gaussian_sigma_xy,
        iterations,
    ):
        return unary.new_empty(unary.shape)

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, grad):
        raise RuntimeError(
            "boxloss::dense_crf_inference is not differentiable: mean-field inference has no backward here; "
            "detach the unaries (or run it under torch.no_grad())"
        )

    torch.library.register_autograd("boxloss::dense_crf_inference", backward, setup_context=setup_context)


if extension_loaded():
    _register()
