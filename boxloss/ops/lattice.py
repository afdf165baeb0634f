r"""Bilateral filtering on the permutohedral lattice (Adams, Baek & Davis, 2010).

:func:`bilateral_filter` approximates, for every pixel ``i`` of an RGB image,

.. math::
    \mathrm{out}_i = \sum_j \exp\Big(-\frac{(x_i - x_j)^2 + (y_i - y_j)^2}{2\sigma_{xy}^2}
                                     -\frac{\lVert I_i - I_j \rVert^2}{2\sigma_{rgb}^2}\Big)\, v_j

(the pixel itself included) in time linear in the number of pixels, all
channels of ``v`` in one splat-blur-slice pass.  :class:`PermutohedralLattice`
keeps the lattice of a batch so that several filters (the mean-field
iterations of CRF inference, or a forward and its backward) reuse one build.

The lattice reproduces Krähenbühl's ``permutohedral.cpp`` (the one DenseCRF
and the DenseCRF loss of Tang et al. use) to float rounding, including its
accuracy: on natural images its output is about 0.5-0.6 times the exact
Gaussian sum (the factor varies by a few percent over an image and with the
sigmas), and after that scale about 6 % off it (12 % at ``sigma_rgb = 5``);
normalised filters ``filter(v) / filter(1)`` are within 0.3-1.5 % (5.5 % at
``sigma_rgb = 5``); ``benchmarks/dense_crf.py`` measures these errors.  The
filter is linear in ``v`` with an exact adjoint
(the same lattice blurred in reverse axis order), so gradients are exact for the
op; the image is a constant (no gradient flows to it).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from boxloss import _checks, _fallback
from boxloss._extension import extension_loaded

_LATTICE = "permutohedral_lattice"
_FILTER = "bilateral_filter"


class LatticeTensors(NamedTuple):
    """The lattice of a batch, in the layout of ``torch.ops.boxloss.permutohedral_lattice``.

    splat_index (B, H*W, d+1) int32: each pixel's d+1 simplex vertices (vertex
    numbers local to the image), in remainder order; splat_weight (B, H*W, d+1):
    the barycentric weights (sum 1); blur_neighbours (d+1, V, 2) int32: for each
    lattice axis and the vertices of all images (image b's are columns
    vertex_offsets[b]:vertex_offsets[b+1]), the local number of the neighbour one
    step down and one step up the axis, -1 where that point is not in the
    lattice; vertex_offsets (B+1,) int64.
    """

    splat_index: torch.Tensor
    splat_weight: torch.Tensor
    blur_neighbours: torch.Tensor
    vertex_offsets: torch.Tensor


def check_rgb_image(fn: str, image, *, like: torch.Tensor | None = None) -> torch.Tensor:
    """image: a (B, 3, H, W) float tensor (on the device of ``like``, with its B, H, W)."""
    image = _checks.check_tensor(fn, "image", image, dim=4, layout="(B, 3, H, W)")
    _checks.check_float_dtype(fn, "image", image)
    if image.shape[1] != 3:
        raise ValueError(f"{fn}: image must have 3 (RGB) channels, got shape {tuple(image.shape)}")
    if image.shape[0] == 0 or image.shape[2] == 0 or image.shape[3] == 0:
        raise ValueError(f"{fn}: image must be non-empty in every dimension, got shape {tuple(image.shape)}")
    if like is not None:
        _checks.check_same(fn, "image", image, like[0], like[1], what="device")
        if image.shape[0] != like[1].shape[0] or image.shape[2:] != like[1].shape[2:]:
            raise ValueError(
                f"{fn}: image must match {like[0]} in B, H and W ({like[0]} {tuple(like[1].shape)}), "
                f"got shape {tuple(image.shape)}"
            )
    return image


class PermutohedralLattice:
    """The lattice of a batch of RGB images, built once and reused by every filter.

    Args:
        image: (B, 3, H, W) colours in the units of ``sigma_rgb`` (the DenseCRF
            papers use [0, 255] with ``sigma_rgb = 15``).  NaN or Inf raise ``ValueError``.
        sigma_xy: spatial standard deviation in pixels, > 0.
        sigma_rgb: colour standard deviation in the units of ``image``, > 0.

    Attributes:
        tensors: the lattice as :class:`LatticeTensors`
            (splat_index, splat_weight, blur_neighbours, vertex_offsets).
        num_vertices: lattice points per image (a list of B ints; reading it synchronises on CUDA).

    The lattice holds about 50 bytes per pixel (the float32 weights and int32
    vertex numbers of each pixel's 6 simplex vertices) plus 48 bytes per
    lattice point.

    Example:
        >>> image = torch.rand(2, 3, 64, 64) * 255
        >>> lattice = boxloss.PermutohedralLattice(image, sigma_xy=10.0, sigma_rgb=15.0)
        >>> q = torch.rand(2, 21, 64, 64).softmax(1)
        >>> for _ in range(5):                       # mean-field iterations reuse the lattice
        ...     q = (lattice.filter(q) * 0.1 + q.log()).softmax(1)
    """

    def __init__(self, image: torch.Tensor, sigma_xy: float, sigma_rgb: float) -> None:
        image = check_rgb_image(_LATTICE, image)
        self.sigma_xy = _checks.check_positive(_LATTICE, "sigma_xy", sigma_xy)
        self.sigma_rgb = _checks.check_positive(_LATTICE, "sigma_rgb", sigma_rgb)
        self.shape = (image.shape[0], image.shape[2], image.shape[3])
        self.dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
        self.device = image.device
        if extension_loaded():
            tensors = torch.ops.boxloss.permutohedral_lattice.default(image, self.sigma_xy, self.sigma_rgb)
        else:
            tensors = _fallback.permutohedral_lattice(_LATTICE, image, self.sigma_xy, self.sigma_rgb)
        self.tensors = LatticeTensors(*tensors)

    @property
    def num_vertices(self) -> list[int]:
        return (self.tensors.vertex_offsets[1:] - self.tensors.vertex_offsets[:-1]).tolist()

    def filter(self, values: torch.Tensor, *, reverse: bool = False) -> torch.Tensor:
        r"""Filters every channel of ``values`` (B, C, H, W) in one pass.

        ``reverse=True`` blurs the lattice axes in reverse order: the exact
        transpose of the forward filter (its backward).  The result has the
        dtype of ``values``; float16/bfloat16 run in float32.  A float64
        lattice (from a float64 image) filters float64 values, a float32
        lattice the other dtypes.  Differentiable in ``values``.
        """
        fn = "PermutohedralLattice.filter"
        values = _checks.check_tensor(fn, "values", values, dim=4, layout="(B, C, H, W)")
        _checks.check_float_dtype(fn, "values", values)
        B, H, W = self.shape
        if values.shape[0] != B or values.shape[2:] != (H, W):
            raise ValueError(
                f"{fn}: values must have shape (B, C, H, W) with (B, H, W) = {self.shape} of the lattice's image, "
                f"got shape {tuple(values.shape)}"
            )
        if values.device != self.device:
            raise ValueError(f"{fn}: values must be on the lattice's device ({self.device}), got {values.device}")
        compute = torch.float64 if values.dtype == torch.float64 else torch.float32
        if compute != self.dtype:
            raise TypeError(
                f"{fn}: values must be float64 for a float64 lattice and float16/bfloat16/float32 for a float32 one "
                f"(build the lattice from an image of the values' precision); got {values.dtype} for a {self.dtype} lattice"
            )
        if values.shape[1] == 0:
            return values.clone()
        if extension_loaded():
            return torch.ops.boxloss.lattice_filter.default(values, *self.tensors, reverse)
        return _fallback.lattice_filter(fn, values, self.tensors, reverse)

    def __repr__(self) -> str:
        return (
            f"PermutohedralLattice(shape={self.shape}, sigma_xy={self.sigma_xy}, sigma_rgb={self.sigma_rgb}, "
            f"dtype={self.dtype}, device={self.device})"
        )


def permutohedral_lattice(image: torch.Tensor, sigma_xy: float, sigma_rgb: float) -> PermutohedralLattice:
    """Builds the lattice of a (B, 3, H, W) batch; see :class:`PermutohedralLattice`."""
    return PermutohedralLattice(image, sigma_xy, sigma_rgb)


def bilateral_filter(values: torch.Tensor, image: torch.Tensor, sigma_xy: float, sigma_rgb: float) -> torch.Tensor:
    r"""Gaussian bilateral filter of ``values`` guided by an RGB ``image``, on the permutohedral lattice.

    .. math::
        \mathrm{out}_i \approx \sum_j \exp\Big(-\tfrac12 \lVert f_i - f_j \rVert^2\Big) v_j, \qquad
        f_i = \Big(\frac{x_i}{\sigma_{xy}}, \frac{y_i}{\sigma_{xy}}, \frac{I^r_i}{\sigma_{rgb}},
                   \frac{I^g_i}{\sigma_{rgb}}, \frac{I^b_i}{\sigma_{rgb}}\Big)

    (the sum includes ``j = i``).  Builds the lattice once for the batch and
    filters all channels in one pass; to filter several times with one image,
    build a :class:`PermutohedralLattice` and call its :meth:`~PermutohedralLattice.filter`.
    The accuracy is that of the original lattice (see the module docstring).

    Args:
        values: (B, C, H, W) floats; NaN or Inf raise ``ValueError``.  Gradients
            flow to ``values`` (the exact adjoint of the lattice filter), not to ``image``.
        image: (B, 3, H, W) colours, same device; float64 images give a float64
            lattice and then need float64 values.
        sigma_xy: spatial standard deviation in pixels, > 0.
        sigma_rgb: colour standard deviation in the units of ``image``, > 0.

    Shape:
        - values: :math:`(B, C, H, W)`, float16/bfloat16 (run in float32), float32 or float64.
        - image: :math:`(B, 3, H, W)`.
        - output: :math:`(B, C, H, W)`, dtype of ``values``.

    Example:
        >>> image = torch.rand(1, 3, 32, 32) * 255
        >>> q = torch.rand(1, 4, 32, 32, requires_grad=True)
        >>> out = boxloss.bilateral_filter(q, image, sigma_xy=8.0, sigma_rgb=15.0)
        >>> out.sum().backward()
    """
    values = _checks.check_tensor(_FILTER, "values", values, dim=4, layout="(B, C, H, W)")
    _checks.check_float_dtype(_FILTER, "values", values)
    image = check_rgb_image(_FILTER, image, like=("values", values))
    if values.dtype == torch.float64 and image.dtype != torch.float64:
        image = image.double()
    elif values.dtype != torch.float64 and image.dtype == torch.float64:
        image = image.float()
    return PermutohedralLattice(image, sigma_xy, sigma_rgb).filter(values)


class BilateralFilter(nn.Module):
    """Module form of :func:`bilateral_filter`: stores the sigmas, checks them once.

    Example:
        >>> smooth = boxloss.BilateralFilter(sigma_xy=80.0, sigma_rgb=13.0)
        >>> out = smooth(values, image)
    """

    def __init__(self, sigma_xy: float, sigma_rgb: float) -> None:
        super().__init__()
        self.sigma_xy = _checks.check_positive("BilateralFilter", "sigma_xy", sigma_xy)
        self.sigma_rgb = _checks.check_positive("BilateralFilter", "sigma_rgb", sigma_rgb)

    def forward(self, values: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return bilateral_filter(values, image, self.sigma_xy, self.sigma_rgb)

    def extra_repr(self) -> str:
        return f"sigma_xy={self.sigma_xy}, sigma_rgb={self.sigma_rgb}"


def _register() -> None:
    @torch.library.register_fake("boxloss::permutohedral_lattice")
    def _permutohedral_lattice_fake(image, sigma_xy, sigma_rgb):
        B, _, H, W = image.shape
        dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
        # The number of lattice points depends on the colours.
        vertices = torch.library.get_ctx().new_dynamic_size()
        return (
            image.new_empty((B, H * W, 6), dtype=torch.int32),
            image.new_empty((B, H * W, 6), dtype=dtype),
            image.new_empty((6, vertices, 2), dtype=torch.int32),
            image.new_empty((B + 1,), dtype=torch.int64),
        )

    def lattice_setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*output)

    def lattice_backward(ctx, *grads):
        # The lattice is a piecewise-constant function of the image (which
        # simplex each pixel falls in) with weights the losses treat as
        # constants: no gradient flows to the image.
        return None, None, None

    torch.library.register_autograd(
        "boxloss::permutohedral_lattice", lattice_backward, setup_context=lattice_setup_context
    )

    @torch.library.register_fake("boxloss::lattice_filter")
    def _lattice_filter_fake(values, splat_index, splat_weight, blur_neighbours, vertex_offsets, reverse):
        return values.new_empty(values.shape)

    def setup_context(ctx, inputs, output):
        _, splat_index, splat_weight, blur_neighbours, vertex_offsets, reverse = inputs
        ctx.save_for_backward(splat_index, splat_weight, blur_neighbours, vertex_offsets)
        ctx.reverse = reverse

    def backward(ctx, grad):
        grad_values = None
        if ctx.needs_input_grad[0]:
            # The filter is linear; its transpose is the same lattice blurred in
            # reverse axis order (itself an op with this autograd formula).
            grad_values = torch.ops.boxloss.lattice_filter.default(grad, *ctx.saved_tensors, not ctx.reverse)
        # The lattice (a function of the image) is a constant.
        return grad_values, None, None, None, None, None

    torch.library.register_autograd("boxloss::lattice_filter", backward, setup_context=setup_context)


if extension_loaded():
    _register()
