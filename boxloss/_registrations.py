"""Fake kernels and autograd formulas of the compiled ops.

Imported by boxloss._extension only after boxloss._C has loaded (the schemas
it registers must exist first).
"""

from __future__ import annotations

import torch

_REGISTERED = False


def _register_sparse_crf() -> None:
    @torch.library.register_fake("boxloss::sparse_crf_loss")
    def _sparse_crf_loss_fake(probs, image, valid_mask, channels, sigma, neighbourhood, dilation, kind):
        return probs.new_empty((probs.shape[0],))

    @torch.library.register_fake("boxloss::sparse_crf_loss_backward")
    def _sparse_crf_loss_backward_fake(
        grad, probs, image, valid_mask, channels, sigma, neighbourhood, dilation, kind
    ):
        # The real kernels return a contiguous (B, C, H, W) tensor whatever the
        # layout of probs.
        return probs.new_empty(probs.shape)

    def setup_context(ctx, inputs, output):
        probs, image, valid_mask, channels, sigma, neighbourhood, dilation, kind = inputs
        ctx.save_for_backward(probs, image, valid_mask)
        ctx.settings = (channels, sigma, neighbourhood, dilation, kind)

    def backward(ctx, grad):
        probs, image, valid_mask = ctx.saved_tensors
        grad_probs = None
        if ctx.needs_input_grad[0]:
            grad_probs = torch.ops.boxloss.sparse_crf_loss_backward.default(
                grad, probs, image, valid_mask, *ctx.settings
            )
        # The image (and so the colour weights) is a constant of the loss.
        return grad_probs, None, None, None, None, None, None, None

    torch.library.register_autograd("boxloss::sparse_crf_loss", backward, setup_context=setup_context)


def _register_row_col_max() -> None:
    @torch.library.register_fake("boxloss::box_row_col_max")
    def _box_row_col_max_fake(probs, boxes, box_batch, box_labels, spatial_scale):
        K = boxes.shape[0]
        H, W = probs.shape[2], probs.shape[3]
        index = probs.new_empty((K, H), dtype=torch.long)
        return (
            probs.new_empty((K, H)),
            probs.new_empty((K, W)),
            index,
            probs.new_empty((K, W), dtype=torch.long),
            probs.new_empty((K, 4), dtype=torch.long),
        )

    @torch.library.register_fake("boxloss::box_row_col_max_backward")
    def _box_row_col_max_backward_fake(grad_row_max, grad_col_max, row_index, col_index, probs_shape):
        return grad_row_max.new_empty(probs_shape)

    def setup_context(ctx, inputs, output):
        probs = inputs[0]
        _, _, row_index, col_index, _ = output
        ctx.save_for_backward(row_index, col_index)
        ctx.probs_shape = probs.shape
        ctx.mark_non_differentiable(row_index, col_index, output[4])

    def backward(ctx, grad_row_max, grad_col_max, _grad_row_index, _grad_col_index, _grad_ranges):
        row_index, col_index = ctx.saved_tensors
        grad_probs = None
        if ctx.needs_input_grad[0]:
            grad_probs = torch.ops.boxloss.box_row_col_max_backward.default(
                grad_row_max, grad_col_max, row_index, col_index, list(ctx.probs_shape)
            )
        # Box coordinates only select pixels: the maxima are piecewise constant in them.
        return grad_probs, None, None, None, None

    torch.library.register_autograd("boxloss::box_row_col_max", backward, setup_context=setup_context)


def _register_permutohedral() -> None:
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


def _register_dense_crf() -> None:
    @torch.library.register_fake("boxloss::dense_crf_loss")
    def _dense_crf_loss_fake(probs, valid_mask, splat_index, splat_weight, blur_neighbours, vertex_offsets):
        B, C, H, W = probs.shape
        compute = torch.float64 if probs.dtype == torch.float64 else torch.float32
        return (
            probs.new_empty((B,)),
            probs.new_empty((B,)),
            probs.new_empty((B, C + 1, H, W), dtype=compute),
        )

    @torch.library.register_fake("boxloss::dense_crf_loss_backward")
    def _dense_crf_loss_backward_fake(
        grad_energy, probs, valid_mask, filtered, splat_index, splat_weight, blur_neighbours, vertex_offsets
    ):
        return probs.new_empty(probs.shape)

    def setup_context(ctx, inputs, output):
        probs, valid_mask, *lattice = inputs
        _, normaliser, filtered = output
        ctx.save_for_backward(probs, valid_mask, filtered, *lattice)
        ctx.mark_non_differentiable(normaliser, filtered)

    def backward(ctx, grad_energy, _grad_normaliser, _grad_filtered):
        probs, valid_mask, filtered, *lattice = ctx.saved_tensors
        grad_probs = None
        if ctx.needs_input_grad[0]:
            grad_probs = torch.ops.boxloss.dense_crf_loss_backward.default(
                grad_energy, probs, valid_mask, filtered, *lattice
            )
        return grad_probs, None, None, None, None, None

    torch.library.register_autograd("boxloss::dense_crf_loss", backward, setup_context=setup_context)


def register_all() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    _register_sparse_crf()
    _register_row_col_max()
    _register_permutohedral()
    _register_dense_crf()
    _REGISTERED = True
