r"""The regularized loss of Box to Tag and Back (Ji & Veksler, BMVC 2021, Eq. 4-6)
for single-class networks trained on box crops.

.. math::
    L = \lambda_{crf} L_{crf} + \lambda_v L_v + \lambda_p L_p + \lambda_{neg} L_{neg}

``L_crf`` the Sparse-CRF loss (Eq. 1), ``L_v`` the volumetric loss (Eq. 2),
``L_p`` either the tight-box positional prior with border cross-entropy (Eq. 6)
or the original centre/border prior (Eq. 3), and ``L_neg`` the negative loss
(Eq. 5) on images of other classes.  The paper's ablation "ours / ours(T) /
ours(T+N)" is :meth:`RegularizedLoss.paper` with those three names.
"""

from __future__ import annotations

import torch
from torch import nn

from boxloss import _checks
from boxloss.losses.box_priors import border_background_loss, tight_box_loss
from boxloss.losses.region_priors import (
    _check_volumetric,
    _foreground,
    _pixel_mask,
    _volumetric_from_sizes,
    image_border_mask,
    negative_loss,
    normalised_sizes,
    positional_loss,
)
from boxloss.ops.sparse_crf import sparse_crf_loss

PRIORS = ("tight", "centre")
PAPER_VARIANTS = {
    "ours": dict(prior="centre", use_negative=False),
    "ours(T)": dict(prior="tight", use_negative=False),
    "ours(T+N)": dict(prior="tight", use_negative=True),
}


def _box_centre_masks(boxes: torch.Tensor, height: int, width: int, size: int) -> torch.Tensor:
    """(B, H, W) bool: a ``size`` x ``size`` square of pixels around each box's centre, clipped to the map (for a
    box covering the whole map, the square of :func:`~boxloss.image_centre_mask`)."""
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    r0 = torch.floor(cy - size / 2).long().clamp(0, max(height - size, 0))
    c0 = torch.floor(cx - size / 2).long().clamp(0, max(width - size, 0))
    rows = torch.arange(height, device=boxes.device)[None, :]
    cols = torch.arange(width, device=boxes.device)[None, :]
    in_rows = (rows >= r0[:, None]) & (rows < r0[:, None] + size)
    in_cols = (cols >= c0[:, None]) & (cols < c0[:, None] + size)
    return in_rows[:, :, None] & in_cols[:, None, :]


def _weighted_mean(per_image: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (per_image * weight).sum() / weight.sum().clamp_min(1)


class RegularizedLoss(nn.Module):
    r"""Eq. 4 (+ Eq. 5) with the paper's defaults for box crops.

    Defaults: ``s_min`` 0.3 (Sec. 4.2 raises it from 0.15 for box crops),
    ``lambda_crf`` 100, ``lambda_v = lambda_p`` 1, ``lambda_s`` 5,
    ``lambda_neg`` 1, ``sigma`` 0.15 (colours in [0, 1]), a 4-connected
    Sparse-CRF as in Veksler's published code, border width 3, centre side 3.

    ``prior="tight"``: ``L_p`` is Eq. 6, the border cross-entropy
    (:func:`~boxloss.border_background_loss`) plus the tight-box term
    (:func:`~boxloss.tight_box_loss`, ``tight_mode``) on the crop's box (by
    default the crop minus its border, i.e. the box the crop was cut around).
    ``prior="centre"``: ``L_p`` is Eq. 3 (:func:`~boxloss.positional_loss`), whose border set is ``border_mask``
    when given (else the map's border) and whose centre square lies at the centre of ``boxes`` when given (else at
    the map's centre).
    ``use_negative``: add ``lambda_neg * L_neg`` over the images flagged
    ``negative`` (crops of other classes); those images take no other term.

    Each per-image term is averaged over the positive (resp. negative) images
    of the batch; ``L_v`` is the batch quantity of Eq. 2.  ``forward`` returns
    the scalar loss, or with ``return_terms=True`` the pair ``(loss, terms)``,
    ``terms`` the dict of the unweighted ``"crf"``, ``"volumetric"``,
    ``"positional"`` (and, with ``use_negative``, ``"negative"``) losses.

    Shape:
        fg_probs (B, H, W) or (B, 1, H, W) object probabilities; image (B, 3, H, W)
        in [0, 1] (sigma's units); negative (B,) bool; border_mask and valid_mask
        (B, H, W) or (H, W) bool; boxes (B, 4) one box per image in image pixels.

    Example:
        >>> loss_fn = RegularizedLoss.paper("ours(T+N)")
        >>> x = torch.rand(4, 1, 64, 64, requires_grad=True)
        >>> loss = loss_fn(x, torch.rand(4, 3, 64, 64), negative=torch.tensor([False, False, False, True]))
        >>> loss.backward()
    """

    def __init__(
        self,
        *,
        prior: str = "tight",
        use_negative: bool = True,
        s_min: float = 0.3,
        lambda_crf: float = 100.0,
        lambda_v: float = 1.0,
        lambda_p: float = 1.0,
        lambda_s: float = 5.0,
        lambda_neg: float = 1.0,
        sigma: float = 0.15,
        neighbourhood: int = 4,
        border_width: int = 3,
        centre_size: int = 3,
        tight_mode: str = "either",
        distributed: bool = False,
    ) -> None:
        super().__init__()
        fn = "RegularizedLoss"
        _checks.check_choice(fn, "prior", prior, PRIORS)
        _checks.check_choice(fn, "tight_mode", tight_mode, ("either", "both"))
        if neighbourhood not in (4, 8) or isinstance(neighbourhood, bool):
            raise ValueError(f"{fn}: neighbourhood must be 4 or 8, got {neighbourhood!r}")
        for name, value in (
            ("lambda_crf", lambda_crf),
            ("lambda_v", lambda_v),
            ("lambda_p", lambda_p),
            ("lambda_neg", lambda_neg),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"{fn}: {name} must be a finite number >= 0, got {value!r}")
        self.s_min, self.lambda_s = _check_volumetric(fn, s_min, lambda_s)
        self.prior, self.use_negative, self.tight_mode = prior, bool(use_negative), tight_mode
        self.lambda_crf, self.lambda_v, self.lambda_p, self.lambda_neg = (
            float(lambda_crf),
            float(lambda_v),
            float(lambda_p),
            float(lambda_neg),
        )
        self.sigma = _checks.check_positive(fn, "sigma", sigma)
        self.neighbourhood = int(neighbourhood)
        self.border_width = _checks.check_int(fn, "border_width", border_width, minimum=0)
        self.centre_size = _checks.check_int(fn, "centre_size", centre_size, minimum=1)
        self.distributed = bool(distributed)

    @classmethod
    def paper(cls, variant: str, **overrides) -> RegularizedLoss:
        """The settings of Table 1: ``"ours"`` (centre prior, Eq. 3), ``"ours(T)"``
        (tight-box prior, Eq. 6) or ``"ours(T+N)"`` (Eq. 6 plus the negative loss)."""
        _checks.check_choice("RegularizedLoss.paper", "variant", variant, tuple(PAPER_VARIANTS))
        return cls(**{**PAPER_VARIANTS[variant], **overrides})

    def forward(
        self,
        fg_probs: torch.Tensor,
        image: torch.Tensor,
        *,
        negative: torch.Tensor | None = None,
        border_mask: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        spatial_scale: float = 1.0,
        valid_mask: torch.Tensor | None = None,
        return_terms: bool = False,
    ):
        fn = "RegularizedLoss"
        x = _foreground(fn, "fg_probs", fg_probs)
        B, H, W = x.shape
        if negative is None:
            negative = torch.zeros(B, dtype=torch.bool, device=x.device)
        elif not isinstance(negative, torch.Tensor) or negative.dtype != torch.bool or negative.shape != (B,):
            raise ValueError(f"{fn}: negative must be a bool tensor of shape ({B},), got {negative!r}")
        valid = None if valid_mask is None else _pixel_mask(fn, "valid_mask", valid_mask, x)
        positive = (~negative).to(x.dtype)

        crf = sparse_crf_loss(
            x[:, None], image, sigma=self.sigma, neighbourhood=self.neighbourhood, valid_mask=valid, reduction="none"
        )
        include = ~negative if valid is None else ~negative & valid.any(2).any(1)
        volumetric = _volumetric_from_sizes(
            normalised_sizes(x, valid), include, self.s_min, self.lambda_s, self.distributed, None
        )
        if self.prior == "tight":
            if border_mask is None:
                border = image_border_mask(H, W, self.border_width, device=x.device).expand(B, H, W)
            else:
                border = _pixel_mask(fn, "border_mask", border_mask, x)
            if valid is not None:
                border = border & valid
            if boxes is None:
                if H <= 2 * self.border_width or W <= 2 * self.border_width:
                    raise ValueError(
                        f"{fn}: prior='tight' without boxes takes the box as the crop minus its border of "
                        f"border_width = {self.border_width} pixels, which leaves no pixel of a {H} x {W} map; "
                        "pass boxes (one per image), or a border_width below half the map's smaller side"
                    )
                bw = float(self.border_width)
                inner = torch.tensor([bw, bw, W - bw, H - bw], dtype=x.dtype, device=x.device)
                boxes, spatial_scale = inner.expand(B, 4), 1.0
            elif not isinstance(boxes, torch.Tensor) or boxes.shape != (B, 4):
                raise ValueError(
                    f"{fn}: boxes must be a (B, 4) = ({B}, 4) tensor, one box per image, got "
                    f"{getattr(boxes, 'shape', boxes)}"
                )
            index = torch.arange(B, device=x.device)
            positional = border_background_loss(x, border, reduction="none") + tight_box_loss(
                x[:, None],
                boxes,
                index,
                torch.zeros_like(index),
                spatial_scale=spatial_scale,
                mode=self.tight_mode,
                reduction="none",
            )
        else:
            centre = None
            if boxes is not None:
                if not isinstance(boxes, torch.Tensor) or boxes.shape != (B, 4):
                    raise ValueError(
                        f"{fn}: boxes must be a (B, 4) = ({B}, 4) tensor, one box per image, got "
                        f"{getattr(boxes, 'shape', boxes)}"
                    )
                centre = _box_centre_masks(boxes * spatial_scale, H, W, self.centre_size)
            positional = positional_loss(
                x,
                border_width=self.border_width,
                centre_size=self.centre_size,
                valid_mask=valid,
                border_mask=border_mask,
                centre_mask=centre,
                reduction="none",
            )
        terms = {
            "crf": _weighted_mean(crf, positive),
            "volumetric": volumetric,
            "positional": _weighted_mean(positional, positive),
        }
        total = (
            self.lambda_crf * terms["crf"] + self.lambda_v * terms["volumetric"] + self.lambda_p * terms["positional"]
        )
        if self.use_negative:
            terms["negative"] = _weighted_mean(
                negative_loss(x, valid_mask=valid, reduction="none"), negative.to(x.dtype)
            )
            total = total + self.lambda_neg * terms["negative"]
        if return_terms:
            return total, terms
        return total

    def extra_repr(self) -> str:
        return (
            f"prior={self.prior!r}, use_negative={self.use_negative}, s_min={self.s_min}, "
            f"lambda_crf={self.lambda_crf}, lambda_v={self.lambda_v}, lambda_p={self.lambda_p}, "
            f"lambda_s={self.lambda_s}, lambda_neg={self.lambda_neg}, sigma={self.sigma}, "
            f"neighbourhood={self.neighbourhood}"
        )
