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

    @torch.library.register_fake("boxloss::_sparse_crf_loss_backward")
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
            grad_probs = torch.ops.boxloss._sparse_crf_loss_backward.default(
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

    @torch.library.register_fake("boxloss::_box_row_col_max_backward")
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
            grad_probs = torch.ops.boxloss._box_row_col_max_backward.default(
                grad_row_max, grad_col_max, row_index, col_index, list(ctx.probs_shape)
            )
        # Box coordinates only select pixels: the maxima are piecewise constant in them.
        return grad_probs, None, None, None, None

    torch.library.register_autograd("boxloss::box_row_col_max", backward, setup_context=setup_context)


def _register_box_raster() -> None:
    @torch.library.register_fake("boxloss::box_front_index")
    def _box_front_index_fake(boxes, box_batch, box_labels, priority, batch, num_classes, height, width, spatial_scale):
        K = boxes.shape[0]
        return (boxes.new_empty((batch, height, width), dtype=torch.long),
                boxes.new_empty((K, 4), dtype=torch.long))


def _register_background_attention() -> None:
    def _compute_dtype(dtype):
        return torch.float64 if dtype == torch.float64 else torch.float32

    @torch.library.register_fake("boxloss::background_attention")
    def _background_attention_fake(features, boxes, box_batch, grid_size, spatial_scale, bg_mask, min_background):
        B, D, h, w = features.shape
        J = grid_size * grid_size
        return (
            features.new_empty((B, h, w)),
            features.new_empty((B, J, D)),
            features.new_empty((B, J), dtype=torch.bool),
            features.new_empty((B,), dtype=torch.bool),
            features.new_empty((B, h, w), dtype=torch.bool),
            features.new_empty((B, h, w), dtype=torch.bool),
        )

    @torch.library.register_fake("boxloss::_background_attention_backward")
    def _background_attention_backward_fake(grad_attention, grad_queries, features, queries, valid, fallback,
                                            inside, background, grid_size):
        return features.new_empty(features.shape)

    def setup_attention(ctx, inputs, output):
        features, _, _, grid_size, _, _, _ = inputs
        _, queries, valid, fallback, inside, background = output
        ctx.save_for_backward(features, queries, valid, fallback, inside, background)
        ctx.grid_size = grid_size
        ctx.mark_non_differentiable(valid, fallback, inside, background)

    def backward_attention(ctx, grad_attention, grad_queries, *_):
        features, queries, valid, fallback, inside, background = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        B, D, h, w = features.shape
        if grad_attention is None:
            grad_attention = features.new_zeros((B, h, w))
        if grad_queries is None:
            grad_queries = queries.new_zeros(queries.shape)
        grad = torch.ops.boxloss._background_attention_backward.default(
            grad_attention, grad_queries, features, queries, valid, fallback, inside, background, ctx.grid_size
        )
        # Boxes and the background mask only select pixels: no gradient.
        return grad, None, None, None, None, None, None

    torch.library.register_autograd("boxloss::background_attention", backward_attention,
                                    setup_context=setup_attention)

    @torch.library.register_fake("boxloss::background_aware_pool")
    def _background_aware_pool_fake(features, attention, boxes, box_batch, output_size, spatial_scale):
        K, D, S = boxes.shape[0], features.shape[1], output_size
        return (
            features.new_empty((K, D, S, S)),
            features.new_empty((K, S, S), dtype=_compute_dtype(features.dtype)),
            features.new_empty((K, 4), dtype=torch.long),
        )

    @torch.library.register_fake("boxloss::_background_aware_pool_backward")
    def _background_aware_pool_backward_fake(grad_pooled, features, attention, pooled, weight_sum, ranges, box_batch,
                                             output_size):
        return features.new_empty(features.shape), attention.new_empty(attention.shape)

    def setup_pool(ctx, inputs, output):
        features, attention, _, box_batch, output_size, _ = inputs
        pooled, weight_sum, ranges = output
        ctx.save_for_backward(features, attention, pooled, weight_sum, ranges, box_batch)
        ctx.output_size = output_size
        ctx.mark_non_differentiable(weight_sum, ranges)

    def backward_pool(ctx, grad_pooled, *_):
        features, attention, pooled, weight_sum, ranges, box_batch = ctx.saved_tensors
        if grad_pooled is None or not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return (None,) * 6
        grad_features, grad_attention = torch.ops.boxloss._background_aware_pool_backward.default(
            grad_pooled, features, attention, pooled, weight_sum, ranges, box_batch, ctx.output_size
        )
        return (
            grad_features if ctx.needs_input_grad[0] else None,
            grad_attention if ctx.needs_input_grad[1] else None,
            None, None, None, None,
        )

    torch.library.register_autograd("boxloss::background_aware_pool", backward_pool, setup_context=setup_pool)

    @torch.library.register_fake("boxloss::background_attention_pool")
    def _background_attention_pool_fake(features, boxes, box_batch, grid_size, output_size, spatial_scale, bg_mask,
                                       min_background):
        B, D, h, w = features.shape
        K, S, J = boxes.shape[0], output_size, grid_size * grid_size
        return (
            features.new_empty((K, D, S, S)),
            features.new_empty((B, h, w)),
            features.new_empty((B, J, D)),
            features.new_empty((B, J), dtype=torch.bool),
            features.new_empty((B,), dtype=torch.bool),
            features.new_empty((K, S, S), dtype=_compute_dtype(features.dtype)),
            features.new_empty((K, 4), dtype=torch.long),
            features.new_empty((B, h, w), dtype=torch.bool),
            features.new_empty((B, h, w), dtype=torch.bool),
        )

    @torch.library.register_fake("boxloss::_background_attention_pool_backward")
    def _background_attention_pool_backward_fake(grad_pooled, grad_attention, grad_queries, features, *_):
        return features.new_empty(features.shape)

    def setup_pooling(ctx, inputs, output):
        features, _, box_batch, grid_size, output_size, _, _, _ = inputs
        pooled, attention, queries, valid, fallback, weight_sum, ranges, inside, background = output
        ctx.save_for_backward(features, attention, queries, valid, fallback, pooled, weight_sum, ranges, box_batch,
                              inside, background)
        ctx.settings = (grid_size, output_size)
        ctx.mark_non_differentiable(valid, fallback, weight_sum, ranges, inside, background)

    def backward_pooling(ctx, grad_pooled, grad_attention, grad_queries, *_):
        (features, attention, queries, valid, fallback, pooled, weight_sum, ranges, box_batch, inside,
         background) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        if grad_pooled is None:
            grad_pooled = pooled.new_zeros(pooled.shape)
        if grad_attention is None:
            grad_attention = attention.new_zeros(attention.shape)
        if grad_queries is None:
            grad_queries = queries.new_zeros(queries.shape)
        grad = torch.ops.boxloss._background_attention_pool_backward.default(
            grad_pooled, grad_attention, grad_queries, features, attention, queries, valid, fallback, pooled,
            weight_sum, ranges, box_batch, inside, background, *ctx.settings
        )
        return grad, None, None, None, None, None, None, None

    torch.library.register_autograd("boxloss::background_attention_pool", backward_pooling,
                                    setup_context=setup_pooling)
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

    @torch.library.register_fake("boxloss::_dense_crf_loss_backward")
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
            grad_probs = torch.ops.boxloss._dense_crf_loss_backward.default(
                grad_energy, probs, valid_mask, filtered, *lattice
            )
        return grad_probs, None, None, None, None, None

    torch.library.register_autograd("boxloss::dense_crf_loss", backward, setup_context=setup_context)
def _register_uncertainty() -> None:
    @torch.library.register_fake("boxloss::uncertainty_bce_loss")
    def _bce_fake(mu, log_var, target, box_mask, pixel_perfect, tau, temperature, bootstrap, route_gradients):
        return mu.new_empty(mu.shape)

    @torch.library.register_fake("boxloss::_uncertainty_bce_loss_backward")
    def _bce_backward_fake(grad, mu, log_var, target, box_mask, pixel_perfect, tau, temperature, bootstrap,
                           route_gradients):
        return mu.new_empty(mu.shape), mu.new_empty(mu.shape)

    def bce_setup_context(ctx, inputs, output):
        mu, log_var, target, box_mask, pixel_perfect, *settings = inputs
        ctx.save_for_backward(mu, log_var, target, box_mask, pixel_perfect)
        ctx.settings = settings

    def bce_backward(ctx, grad):
        grad_mu = grad_log_var = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_mu, grad_log_var = torch.ops.boxloss._uncertainty_bce_loss_backward.default(
                grad, *ctx.saved_tensors, *ctx.settings
            )
        # The target and the masks are constants of the loss.
        return grad_mu, grad_log_var, None, None, None, None, None, None, None

    torch.library.register_autograd("boxloss::uncertainty_bce_loss", bce_backward, setup_context=bce_setup_context)

    @torch.library.register_fake("boxloss::uncertainty_ce_loss")
    def _ce_fake(mu, log_var, target, box_mask, pixel_perfect, seed, samples, tau, bootstrap, route_gradients,
                 ignore_index):
        shape = (mu.shape[0], mu.shape[2], mu.shape[3])
        return mu.new_empty(shape), mu.new_empty(shape)

    @torch.library.register_fake("boxloss::_uncertainty_ce_loss_backward")
    def _ce_backward_fake(grad, mu, log_var, target, box_mask, pixel_perfect, seed, sample_lse, samples, tau,
                          bootstrap, route_gradients, ignore_index):
        return mu.new_empty(mu.shape), mu.new_empty(mu.shape)

    def ce_setup_context(ctx, inputs, output):
        mu, log_var, target, box_mask, pixel_perfect, seed, *settings = inputs
        # Per-pixel quantities only: the backward regenerates the noise from
        # the seed, so what is kept does not grow with the number of samples.
        ctx.save_for_backward(mu, log_var, target, box_mask, pixel_perfect, seed, output[1])
        ctx.settings = settings
        ctx.mark_non_differentiable(output[1])

    def ce_backward(ctx, grad, _grad_sample_lse):
        grad_mu = grad_log_var = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            mu, log_var, target, box_mask, pixel_perfect, seed, sample_lse = ctx.saved_tensors
            grad_mu, grad_log_var = torch.ops.boxloss._uncertainty_ce_loss_backward.default(
                grad, mu, log_var, target, box_mask, pixel_perfect, seed, sample_lse, *ctx.settings
            )
        return grad_mu, grad_log_var, None, None, None, None, None, None, None, None, None

    torch.library.register_autograd("boxloss::uncertainty_ce_loss", ce_backward, setup_context=ce_setup_context)


def register_all() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    _register_sparse_crf()
    _register_row_col_max()
    _register_box_raster()
    _register_background_attention()
    _register_permutohedral()
    _register_dense_crf()
    _register_uncertainty()
    _REGISTERED = True
