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


def register_all() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    _register_sparse_crf()
    _REGISTERED = True
