r"""Size and position priors of the single-class regularized loss
(Box to Tag and Back, Ji & Veksler BMVC 2021, Sec. 3; after Veksler's
regularized loss): volumetric (Eq. 2), positional (Eq. 3) and negative (Eq. 5).

All take the object probability map ``x`` of a single-class network, (B, H, W)
or (B, 1, H, W) with values in [0, 1].
"""

from __future__ import annotations

import torch
from torch import nn

from boxloss import _checks


def _foreground(fn: str, name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{fn}: {name} must be a torch.Tensor of shape (B, H, W) or (B, 1, H, W), got {type(x).__name__}"
        )
    if x.dim() == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dim() != 3:
        raise ValueError(f"{fn}: {name} must have shape (B, H, W) or (B, 1, H, W), got shape {tuple(x.shape)}")
    _checks.check_float_dtype(fn, name, x)
    if 0 in x.shape:
        raise ValueError(f"{fn}: {name} must be non-empty in every dimension, got shape {tuple(x.shape)}")
    # A data-dependent check: eager calls pay one min/max pass and raise; compiled
    # graphs skip it rather than break.
    _checks.check_values(fn, **{name: (x, _checks.PROBABILITIES)})
    return x


def _pixel_mask(fn: str, name: str, mask, x: torch.Tensor) -> torch.Tensor:
    """A bool (B, H, W) or (H, W) mask, broadcast to x's (B, H, W)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a bool tensor of shape (B, H, W) or (H, W), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{fn}: {name} must be a bool tensor, got {mask.dtype}")
    if mask.shape not in (x.shape, x.shape[1:]):
        raise ValueError(
            f"{fn}: {name} must have shape {tuple(x.shape)} or {tuple(x.shape[1:])}, got {tuple(mask.shape)}"
        )
    _checks.check_same(fn, name, mask, "the probabilities", x, what="device")
    return mask.expand(x.shape)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B,) mean over each image's pixels where mask is True; 0 for an empty mask."""
    if mask is None:
        return x.mean((1, 2))
    m = mask.to(x.dtype)
    return (x * m).sum((1, 2)) / m.sum((1, 2)).clamp_min(1)


def image_border_mask(height: int, width: int, border_width: int = 3, *, device=None) -> torch.Tensor:
    """(H, W) bool: the pixels less than ``border_width`` from the image edge."""
    fn = "image_border_mask"
    _checks.check_int(fn, "height", height, minimum=1)
    _checks.check_int(fn, "width", width, minimum=1)
    _checks.check_int(fn, "border_width", border_width, minimum=0)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    inner_rows = (rows >= border_width) & (rows < height - border_width)
    inner_cols = (cols >= border_width) & (cols < width - border_width)
    return ~(inner_rows[:, None] & inner_cols[None, :])


def image_centre_mask(height: int, width: int, centre_size: int = 3, *, device=None) -> torch.Tensor:
    """(H, W) bool: the central ``centre_size`` x ``centre_size`` square (clipped to the image),
    starting at row ``(H - centre_size) // 2`` and column ``(W - centre_size) // 2``."""
    fn = "image_centre_mask"
    _checks.check_int(fn, "height", height, minimum=1)
    _checks.check_int(fn, "width", width, minimum=1)
    _checks.check_int(fn, "centre_size", centre_size, minimum=1)
    r0, c0 = max((height - centre_size) // 2, 0), max((width - centre_size) // 2, 0)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    return ((rows >= r0) & (rows < r0 + centre_size))[:, None] & ((cols >= c0) & (cols < c0 + centre_size))[None, :]


def normalised_sizes(x: torch.Tensor, valid_mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""(B,) normalised object sizes :math:`\bar x_i = \frac{1}{|P|}\sum_{p \in P} x_p` over the valid pixels."""
    return _masked_mean(x, valid_mask)


def _volumetric_from_sizes(sizes, include, s_min, lambda_s, distributed, process_group):
    inc = include.to(sizes.dtype)
    small = ((sizes < s_min).to(sizes.dtype) * (sizes - s_min) ** 2 * inc).sum()
    stats = torch.stack([small, (sizes * inc).sum(), inc.sum()])
    if distributed:
        import torch.distributed as dist
        from torch.distributed.nn.functional import all_reduce

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("volumetric_loss: distributed=True needs an initialised torch.distributed process group")
        # A differentiable all-reduce: its backward all-reduces the gradient, so
        # after DDP averages over ranks every parameter gets the gradient of the
        # whole-batch loss.
        stats = all_reduce(stats, group=process_group if process_group is not None else dist.group.WORLD)
    small, size_sum, count = stats[0], stats[1], stats[2]
    return lambda_s * small + (size_sum / count.clamp_min(1) - 0.5) ** 2


def _check_volumetric(fn, s_min, lambda_s):
    if isinstance(s_min, bool) or not isinstance(s_min, (int, float)) or not 0 <= s_min <= 1:
        raise ValueError(f"{fn}: s_min must be a number in [0, 1], got {s_min!r}")
    if (
        isinstance(lambda_s, bool)
        or not isinstance(lambda_s, (int, float))
        or not lambda_s >= 0
        or lambda_s == float("inf")
    ):
        raise ValueError(f"{fn}: lambda_s must be a finite number >= 0, got {lambda_s!r}")
    return float(s_min), float(lambda_s)


def volumetric_loss(
    fg_probs: torch.Tensor,
    *,
    s_min: float = 0.15,
    lambda_s: float = 5.0,
    valid_mask: torch.Tensor | None = None,
    distributed: bool = False,
    process_group=None,
) -> torch.Tensor:
    r"""Volumetric loss (Eq. 2): penalises trivial (empty or full) segmentations.

    .. math::
        L_v(x_1..x_m) = \lambda_s \sum_i [\bar x_i < s_{min}] (\bar x_i - s_{min})^2
                        + \Big(\frac1m \sum_i \bar x_i - 0.5\Big)^2

    with :math:`\bar x_i` the mean object probability of image ``i`` over its
    valid pixels (images without a valid pixel are left out).  The first term
    is a sum over images and the second pulls the batch mean to 0.5, so the
    loss is a batch quantity: it returns a scalar and has no ``reduction``.

    With ``distributed=True`` both sums are all-reduced (differentiably) over
    ``process_group`` (default: the world), so each rank returns the loss of
    the whole global batch and DistributedDataParallel's gradient averaging
    yields exactly the gradient of one process on the whole batch.

    Example:
        >>> x = torch.rand(8, 1, 64, 64, requires_grad=True)
        >>> volumetric_loss(x, s_min=0.3).backward()
    """
    fn = "volumetric_loss"
    x = _foreground(fn, "fg_probs", fg_probs)
    s_min, lambda_s = _check_volumetric(fn, s_min, lambda_s)
    mask = None if valid_mask is None else _pixel_mask(fn, "valid_mask", valid_mask, x)
    include = torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if mask is None else mask.any(2).any(1)
    return _volumetric_from_sizes(normalised_sizes(x, mask), include, s_min, lambda_s, bool(distributed), process_group)


def positional_loss(
    fg_probs: torch.Tensor,
    *,
    border_width: int = 3,
    centre_size: int = 3,
    valid_mask: torch.Tensor | None = None,
    border_mask: torch.Tensor | None = None,
    centre_mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Centre/border positional prior (Eq. 3) for a single-class image crop.

    .. math::
        L_p(x) = \Big(\frac{1}{|\mathcal B|}\sum_{p\in\mathcal B} x_p\Big)^2
               + \Big(\frac{1}{|\mathcal C|}\sum_{p\in\mathcal C} x_p - 1\Big)^2

    ``B``: the pixels within ``border_width`` of the image edge, or ``border_mask`` when given (a box crop's margin
    from outside its box); ``C``: the central ``centre_size`` square (see :func:`image_centre_mask`), or
    ``centre_mask`` when given; both restricted to ``valid_mask``. Masks are (B, H, W) or (H, W) bool. An empty
    set's term is 0. Reduction over images: ``"mean"``, ``"sum"``, ``"none"`` (B,).
    """
    fn = "positional_loss"
    x = _foreground(fn, "fg_probs", fg_probs)
    _checks.check_choice(fn, "reduction", reduction, _checks.REDUCTIONS)
    B, H, W = x.shape
    border_width = _checks.check_int(fn, "border_width", border_width, minimum=0)
    centre_size = _checks.check_int(fn, "centre_size", centre_size, minimum=1)
    if border_mask is None:
        border = image_border_mask(H, W, border_width, device=x.device).expand(B, H, W)
    else:
        border = _pixel_mask(fn, "border_mask", border_mask, x)
    if centre_mask is None:
        centre = image_centre_mask(H, W, centre_size, device=x.device).expand(B, H, W)
    else:
        centre = _pixel_mask(fn, "centre_mask", centre_mask, x)
    if valid_mask is not None:
        valid = _pixel_mask(fn, "valid_mask", valid_mask, x)
        border, centre = border & valid, centre & valid
    has_centre = centre.any(2).any(1).to(x.dtype)
    per_image = _masked_mean(x, border) ** 2 + has_centre * (_masked_mean(x, centre) - 1) ** 2
    return _checks.reduce_per_image(per_image, reduction)


def negative_loss(
    fg_probs: torch.Tensor,
    *,
    valid_mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Negative loss (Eq. 5, without its weight): :math:`\frac{1}{|P|}\sum_p x_p^2` for an image
    known to hold no object of the class.  Reduction over images: ``"mean"``, ``"sum"``, ``"none"``."""
    fn = "negative_loss"
    x = _foreground(fn, "fg_probs", fg_probs)
    _checks.check_choice(fn, "reduction", reduction, _checks.REDUCTIONS)
    mask = None if valid_mask is None else _pixel_mask(fn, "valid_mask", valid_mask, x)
    return _checks.reduce_per_image(_masked_mean(x * x, mask), reduction)


class VolumetricLoss(nn.Module):
    """Module form of :func:`volumetric_loss`."""

    def __init__(
        self, *, s_min: float = 0.15, lambda_s: float = 5.0, distributed: bool = False, process_group=None
    ) -> None:
        super().__init__()
        self.s_min, self.lambda_s = _check_volumetric("VolumetricLoss", s_min, lambda_s)
        self.distributed, self.process_group = bool(distributed), process_group

    def forward(self, fg_probs, valid_mask=None):
        return volumetric_loss(
            fg_probs,
            s_min=self.s_min,
            lambda_s=self.lambda_s,
            valid_mask=valid_mask,
            distributed=self.distributed,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return f"s_min={self.s_min}, lambda_s={self.lambda_s}, distributed={self.distributed}"


class PositionalLoss(nn.Module):
    """Module form of :func:`positional_loss`."""

    def __init__(self, *, border_width: int = 3, centre_size: int = 3, reduction: str = "mean") -> None:
        super().__init__()
        self.border_width = _checks.check_int("PositionalLoss", "border_width", border_width, minimum=0)
        self.centre_size = _checks.check_int("PositionalLoss", "centre_size", centre_size, minimum=1)
        _checks.check_choice("PositionalLoss", "reduction", reduction, _checks.REDUCTIONS)
        self.reduction = reduction

    def forward(self, fg_probs, valid_mask=None):
        return positional_loss(
            fg_probs,
            border_width=self.border_width,
            centre_size=self.centre_size,
            valid_mask=valid_mask,
            reduction=self.reduction,
        )


class NegativeLoss(nn.Module):
    """Module form of :func:`negative_loss`."""

    def __init__(self, *, reduction: str = "mean") -> None:
        super().__init__()
        _checks.check_choice("NegativeLoss", "reduction", reduction, _checks.REDUCTIONS)
        self.reduction = reduction

    def forward(self, fg_probs, valid_mask=None):
        return negative_loss(fg_probs, valid_mask=valid_mask, reduction=self.reduction)
