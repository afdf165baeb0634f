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


def _register_uncertainty() -> None:
    @torch.library.register_fake("boxloss::uncertainty_bce_loss")
    def _bce_fake(mu, log_var, target, box_mask, pixel_perfect, tau, temperature, bootstrap, route_gradients):
        return mu.new_empty(mu.shape)

    @torch.library.register_fake("boxloss::uncertainty_bce_loss_backward")
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
            grad_mu, grad_log_var = torch.ops.boxloss.uncertainty_bce_loss_backward.default(
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

    @torch.library.register_fake("boxloss::uncertainty_ce_loss_backward")
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
            grad_mu, grad_log_var = torch.ops.boxloss.uncertainty_ce_loss_backward.default(
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
    _register_uncertainty()
    _REGISTERED = True
