"""What the op wrappers of :mod:`boxloss.ops` run when the compiled ops are unavailable.

``boxloss._C`` may be missing (not built here, built for another torch) or
disabled (``BOXLOSS_DISABLE_EXTENSION=1``).  The wrappers then call the
function of the same name here, which warns once (or raises under
``BOXLOSS_REQUIRE_EXTENSION=1``, see :func:`boxloss._extension.warn_fallback`)
and runs the readable pure-PyTorch implementation of :mod:`boxloss.reference`.
Each takes the arguments the wrapper has already checked and returns what the
compiled op would give the wrapper.  The kernels check values while they
compute (NaN, Inf, probabilities outside [0, 1]); the references do not, so
the same checks run here first and both paths raise the same errors.

This is the one public-side module that imports :mod:`boxloss.reference`; it
does so inside each function, so importing boxloss never loads the references.
"""

from __future__ import annotations

import torch

from boxloss._extension import warn_fallback


def _check_finite(fn: str, name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{fn}: {name} must be finite, but it contains NaN or Inf")


def _check_probabilities(fn: str, name: str, tensor: torch.Tensor, what: str = "probabilities") -> None:
    if not ((tensor >= 0) & (tensor <= 1)).all():
        raise ValueError(f"{fn}: {name} must hold {what} in [0, 1], but it contains NaN, Inf or values outside [0, 1]")


# --------------------------------------------------------------------------- boxes


def box_front_index(fn, boxes, box_batch, box_labels, priority, batch, channels, height, width, spatial_scale):
    """(front (B, H, W) int64, ranges (K, 4) int64), as ``boxloss::box_front_index``."""
    from boxloss.reference.boxes import box_front_index_reference

    warn_fallback(fn)
    return box_front_index_reference(
        boxes, box_batch, box_labels, priority, batch, channels, height, width, spatial_scale
    )


def box_row_col_max(fn, probs, boxes, box_batch, box_labels, spatial_scale):
    """(row_max (K, H), col_max (K, W), ranges (K, 4)): the dense maxima of ``boxloss::box_row_col_max``."""
    from boxloss.reference.box_priors import box_row_col_max_reference

    warn_fallback(fn)
    return box_row_col_max_reference(probs, boxes, box_batch, box_labels, spatial_scale)


# --------------------------------------------------------------------------- pairwise


def sparse_crf_loss(fn, probs, image, valid_mask, channels, sigma, neighbourhood, dilation, kind):
    """(B,) per-image losses, as ``boxloss::sparse_crf_loss``."""
    from boxloss.reference.pairwise import sparse_crf_loss_reference

    warn_fallback(fn)
    _check_finite(fn, "image", image)
    _check_probabilities(fn, "probs", probs if channels is None else probs[:, channels])
    return sparse_crf_loss_reference(
        probs,
        image,
        sigma=sigma,
        neighbourhood=neighbourhood,
        dilation=dilation,
        valid_mask=valid_mask,
        kind=kind,
        channels=channels,
        reduction="none",
    )


def permutohedral_lattice(fn, image, sigma_xy, sigma_rgb):
    """(splat_index, splat_weight, blur_neighbours, vertex_offsets), as ``boxloss::permutohedral_lattice``."""
    from boxloss.reference.bilateral import permutohedral_lattice_reference

    warn_fallback(fn)
    _check_finite(fn, "image", image)
    return permutohedral_lattice_reference(image, sigma_xy, sigma_rgb)


def lattice_filter(fn, values, lattice, reverse):
    """The lattice filter of ``values`` in their dtype (float16/bfloat16 computed in float32)."""
    from boxloss.reference.bilateral import lattice_filter_reference

    warn_fallback(fn)
    _check_finite(fn, "values", values)
    compute = torch.float64 if values.dtype == torch.float64 else torch.float32
    return lattice_filter_reference(values.to(compute), lattice, reverse=reverse).to(values.dtype)


def dense_crf_energy(fn, probs, valid_mask, lattice):
    """(energy (B,), normaliser (B,)) in the dtype of ``probs``, as ``boxloss::dense_crf_loss``."""
    from boxloss.reference.pairwise import dense_crf_energy_lattice_reference

    warn_fallback(fn)
    _check_probabilities(fn, "probs", probs)
    compute = torch.float64 if probs.dtype == torch.float64 else torch.float32
    energy, normaliser = dense_crf_energy_lattice_reference(probs.to(compute), valid_mask, lattice)
    return energy.to(probs.dtype), normaliser.to(probs.dtype)


def dense_crf_inference(fn, unary, image, valid_mask, bilateral, gaussian, iterations):
    """Q (B, C, H, W) in the dtype of ``unary``, as ``boxloss::dense_crf_inference``."""
    from boxloss.reference.crf_inference import dense_crf_inference_reference

    warn_fallback(fn)
    if torch.isnan(unary).any():
        raise ValueError(f"{fn}: unary must not contain NaN")
    if (unary == float("-inf")).any():
        raise ValueError(
            f"{fn}: unary must not be -Inf (it holds negative log-probabilities; +Inf marks an impossible label)"
        )
    if (unary == float("inf")).all(1).any():
        raise ValueError(f"{fn}: unary is +Inf for every class at some pixel (no label is possible there)")
    if bilateral[0] > 0:
        _check_finite(fn, "image", image)
    compute = torch.float64 if unary.dtype == torch.float64 else torch.float32
    q = dense_crf_inference_reference(
        unary.to(compute),
        image.to(compute),
        bilateral=bilateral,
        gaussian=gaussian,
        iterations=iterations,
        valid_mask=valid_mask,
    )
    return q.to(unary.dtype)


# --------------------------------------------------------------------------- background attention


def background_attention(fn, features, boxes, box_batch, grid_size, spatial_scale, bg_mask, min_background):
    """(attention, queries, valid, fallback), as the first four outputs of ``boxloss::background_attention``."""
    from boxloss.reference.background_attention import background_attention_reference

    warn_fallback(fn)
    _check_finite(fn, "features", features)
    return background_attention_reference(
        features,
        boxes,
        box_batch,
        grid_size=grid_size,
        spatial_scale=spatial_scale,
        bg_mask=bg_mask,
        min_background=min_background,
    )


def background_aware_pool(fn, features, attention, boxes, box_batch, output_size, spatial_scale):
    """pooled (K, D, S, S), the first output of ``boxloss::background_aware_pool``."""
    from boxloss.reference.background_attention import background_aware_pool_reference

    warn_fallback(fn)
    _check_finite(fn, "features", features)
    _check_probabilities(fn, "attention", attention, "values")
    return background_aware_pool_reference(
        features, attention, boxes, box_batch, output_size=output_size, spatial_scale=spatial_scale
    )


# --------------------------------------------------------------------------- uncertainty


def uncertainty_bce_loss(
    fn, mu, log_var, target, box_mask, pixel_perfect, tau, temperature, bootstrap, route_gradients
):
    """(B, H, W) per-pixel losses, as ``boxloss::uncertainty_bce_loss``."""
    from boxloss.reference.uncertainty import uncertainty_bce_loss_reference

    warn_fallback(fn)
    _check_finite(fn, "mu", mu)
    _check_finite(fn, "log_var", log_var)
    _check_probabilities(fn, "target", target)
    return uncertainty_bce_loss_reference(
        mu,
        log_var,
        target,
        box_mask,
        tau=tau,
        temperature=temperature,
        bootstrap=bootstrap,
        pixel_perfect=pixel_perfect,
        route_gradients=route_gradients,
        reduction="none",
    )


def uncertainty_ce_loss(
    fn, mu, log_var, target, box_mask, pixel_perfect, seed, samples, tau, bootstrap, route_gradients, ignore_index
):
    """(B, H, W) per-pixel losses, as the first output of ``boxloss::uncertainty_ce_loss``; ``seed`` is the
    (key, offset) int64 tensor the op reads."""
    from boxloss.reference.uncertainty import uncertainty_ce_loss_reference

    warn_fallback(fn)
    _check_finite(fn, "mu", mu)
    _check_finite(fn, "log_var", log_var)
    num_classes = mu.shape[1]
    labelled = target != ignore_index
    if not (~labelled | ((target >= 0) & (target < num_classes))).all():
        raise ValueError(
            f"{fn}: target must hold class indices in [0, {num_classes - 1}] or ignore_index ({ignore_index})"
        )
    key, offset = seed.tolist()
    return uncertainty_ce_loss_reference(
        mu,
        log_var,
        target,
        samples=samples,
        seed=key,
        offset=offset,
        tau=tau,
        bootstrap=bootstrap,
        box_mask=box_mask,
        pixel_perfect=pixel_perfect,
        ignore_index=ignore_index,
        reduction="none",
        route_gradients=route_gradients,
    )
