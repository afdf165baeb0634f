r"""BANA's pseudo labels (Sec. 3.2): Y_crf by DenseCRF and Y_ret by retrieval, one image at a time.

Oh, Kim and Ham, "Background-Aware Pooling and Noise-Aware Loss for
Weakly-Supervised Semantic Segmentation", CVPR 2021.  The two label maps are
the inputs of the noise-aware loss (:func:`boxloss.noise_aware_loss`).

.. math::
    u_c(p) = \frac{\mathrm{CAM}_c(p)}{\max_p \mathrm{CAM}_c(p)} [p \in \mathcal{B}_c], \quad
    \mathrm{CAM}_c(p) = \mathrm{ReLU}(f(p) \cdot w_c), \quad u_0(p) = A(p)              \quad (5\text{-}7)

    q_c = \frac{1}{|Q_c|} \sum_{p \in Q_c} f(p), \qquad
    C_c(p) = \frac{f(p)}{\|f(p)\|} \cdot \frac{q_c}{\|q_c\|}                              \quad (8, 9)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from boxloss import _checks
from boxloss.losses.noise_aware import COS_EPS
from boxloss.ops.background_attention import background_attention
from boxloss.ops.box_masks import boxes_to_masks
from boxloss.ops.boxes import box_pixel_ranges
from boxloss.recipes.dense_crf import pydensecrf_inference

DEFAULT_CRF = {
    "iterations": 10,
    "bilateral_weight": 4.0,
    "bilateral_xy": 55.0,
    "bilateral_rgb": 3.0,
    "gaussian_weight": 3.0,
    "gaussian_xy": 3.0,
}


class PseudoLabels(NamedTuple):
    y_crf: torch.Tensor  # (H, W) int64 labels 0..L after DenseCRF (Eq. 5-7)
    y_ret: torch.Tensor  # (H, W) int64 labels 0..L by retrieval (Eq. 8-9)
    attention: torch.Tensor  # (h, w) A used for u_0
    fallback: bool  # the attention fell back to A = 0 inside the boxes


BACKGROUND_UNARIES = ("attention", "cam")


def _check_finite(fn: str, name: str, t: torch.Tensor, when: str = "") -> None:
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        where = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"{fn}: {name} must be finite{when}, got {t[where].item()} at {name}{list(where)}")


def _check_crf(fn: str, settings: dict) -> None:
    it = settings["iterations"]
    if isinstance(it, bool) or not isinstance(it, (int, float)) or not (it >= 1 and float(it).is_integer()):
        raise ValueError(f"{fn}: crf['iterations'] must be a whole number >= 1 (mean-field steps), got {it!r}")
    for key in DEFAULT_CRF:
        v = settings[key]
        if key != "iterations" and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf")):
            raise ValueError(f"{fn}: crf[{key!r}] must be a positive finite number, got {v!r}")


@torch.no_grad()
def bana_pseudo_labels(
    image,
    features: torch.Tensor,
    classifier_weight: torch.Tensor,
    boxes: torch.Tensor,
    box_labels: torch.Tensor,
    *,
    crf: dict | None = None,
    bg_threshold: float = 0.99,
    grid_size: int = 1,
    min_background: float = 0.125,
    background: str = "attention",
    inference: Callable | None = None,
) -> PseudoLabels:
    r"""Y_crf and Y_ret of one image (BANA Sec. 3.2, Eq. 5-9).

    1. A from :func:`boxloss.background_attention` (grid_size 1 by default, the
       paper's setting for pseudo labels) at the feature resolution, the boxes
       scaled by ``w / W``.
    2. Unaries: the CAMs and ``u_0`` at the feature resolution, upsampled
       bilinearly to the image size (the footnote); ``u_0 = A`` where
       ``A >= bg_threshold`` (the "confident background" of the paper's
       hyperparameter section) and 0 elsewhere inside the boxes, 1 outside
       them.  ``u_c`` (Eq. 5) is the CAM of each box of class c over its
       maximum in that box (the official code's normalisation; where boxes of
       one class overlap, the larger value; 0 for a CAM that is 0 in the box)
       and 0 outside the boxes of c.  The paper leaves open how the u become
       the DenseCRF's probabilities; as the official code, a softmax over the
       classes present inside the boxes (each u in [0, 1], so a weak CAM
       against ``u_0 = 0`` stays uncertain and the pairwise terms decide) and
       background outside them; the unaries are their negative logs, clipped
       at 1e-5 as pydensecrf's ``unary_from_softmax``.  DenseCRF runs on the
       uint8 RGB image with the official defaults ``crf`` =
       :data:`DEFAULT_CRF` (bilateral weight 4, xy 55, rgb 3; Gaussian weight
       3, xy 3; 10 iterations), through pydensecrf unless ``inference`` is
       given.  Y_crf is the arg-max of the marginals over the background and
       the classes whose boxes cover the pixel.  ``background="cam"`` replaces
       u_0 inside the boxes by the background class's CAM over its maximum (no
       threshold): the paper's "Y_crf w/o u_0" row of Table 1, and what a
       network without background attention (global average pooling) has.
    3. Prototypes q_c: the mean feature over the pixels of the feature map whose
       centre lies in class c of Y_crf (Eq. 8); a class of the image's boxes
       absent from Y_crf uses its classifier weight w_c.  C_c (Eq. 9) is
       upsampled bilinearly; Y_ret is the arg-max over the background and the
       classes whose boxes cover the pixel (outside every box: background).

    Args:
        image: (H, W, 3) uint8 RGB (numpy array or tensor).
        features: (D, h, w) feature map f of the classification network.
        classifier_weight: (L + 1, D) classifier w (row 0 the background).
        boxes: (K, 4) in image pixels; box_labels: (K,) in [1, L].
        background: ``"attention"`` (u_0 = A, Eq. 7) or ``"cam"`` (u_0 from the background CAM).
        inference: the mean-field DenseCRF, called as ``inference(unary, image, bilateral=(weight, xy, rgb),
            gaussian=(weight, xy), iterations=n)`` with ``unary`` (1, C', H, W) float32 negative
            log-probabilities of the C' classes present (background first) and ``image`` (1, 3, H, W) float32
            colours in [0, 255]; it returns the marginals (1, C', H, W), finite.  Default:
            :func:`boxloss.pydensecrf_inference`.

    Returns:
        :class:`PseudoLabels` (y_crf, y_ret as (H, W) int64, attention, fallback).
    """
    fn = "bana_pseudo_labels"
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{fn}: image must be a uint8 RGB array of shape (H, W, 3), got {image.dtype} {image.shape}")
    if 0 in image.shape:
        raise ValueError(f"{fn}: image must have at least one row and one column, got shape {image.shape}")
    image = np.ascontiguousarray(image)
    _checks.check_tensor(fn, "features", features, dim=3, layout="(D, h, w)")
    _checks.check_float_dtype(fn, "features", features)
    if 0 in features.shape:
        raise ValueError(f"{fn}: features must be non-empty in every dimension, got shape {tuple(features.shape)}")
    _checks.check_tensor(fn, "classifier_weight", classifier_weight, dim=2, layout="(L + 1, D)")
    _checks.check_float_dtype(fn, "classifier_weight", classifier_weight)
    settings = dict(DEFAULT_CRF)
    if crf is not None:
        unknown = set(crf) - set(DEFAULT_CRF)
        if unknown:
            raise ValueError(f"{fn}: crf has unknown keys {sorted(unknown)}; known: {sorted(DEFAULT_CRF)}")
        settings.update(crf)
    _check_crf(fn, settings)
    if isinstance(bg_threshold, bool) or not isinstance(bg_threshold, (int, float)) or not 0 <= bg_threshold <= 1:
        raise ValueError(f"{fn}: bg_threshold must be a number in [0, 1], got {bg_threshold!r}")
    _checks.check_choice(fn, "background", background, BACKGROUND_UNARIES)
    if inference is not None and not callable(inference):
        raise TypeError(
            f"{fn}: inference must be callable (unary, image, *, bilateral, gaussian, iterations), "
            f"got {type(inference).__name__}"
        )
    H, W = image.shape[:2]
    # NaN or Inf would turn every CAM and correlation into NaN, and the arg-max of NaN is a label all the same.
    _check_finite(fn, "features", features.detach())
    _check_finite(fn, "classifier_weight", classifier_weight.detach())
    features = features.detach().to("cpu", torch.float32)
    weight = classifier_weight.detach().to("cpu", torch.float32)
    _check_finite(fn, "features", features, " after conversion to float32 (the pseudo labels are computed in float32)")
    _check_finite(
        fn, "classifier_weight", weight, " after conversion to float32 (the pseudo labels are computed in float32)"
    )
    D, h, w = features.shape
    C = weight.shape[0]
    if weight.shape[1] != D or C < 2:
        raise ValueError(
            f"{fn}: classifier_weight must have shape (L + 1, D) with L >= 1 and D = {D}, got {tuple(weight.shape)}"
        )
    boxes = torch.as_tensor(boxes)
    if boxes.dtype == torch.bool or boxes.dtype.is_complex:
        raise TypeError(f"{fn}: boxes must hold real numbers x0, y0, x1, y1, got {boxes.dtype}")
    if boxes.numel() == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{fn}: boxes must have shape (K, 4) holding x0, y0, x1, y1, got shape {tuple(boxes.shape)}")
    boxes = boxes.to(torch.float32).cpu()
    box_labels = torch.as_tensor(box_labels).reshape(-1).to(torch.long).cpu()
    if box_labels.shape[0] != boxes.shape[0]:
        raise ValueError(f"{fn}: box_labels must have one label per box ({boxes.shape[0]}), got {box_labels.shape[0]}")
    if bool(((box_labels < 1) | (box_labels >= C)).any()):
        raise ValueError(f"{fn}: box_labels must lie in [1, {C - 1}], got {box_labels.tolist()}")
    if bool(boxes.isnan().any()):
        k = int(boxes.isnan().any(1).nonzero()[0, 0])
        raise ValueError(f"{fn}: boxes must not hold NaN, got boxes[{k}] = {tuple(boxes[k].tolist())}")
    scale = w / W
    box_batch = torch.zeros(boxes.shape[0], dtype=torch.long)
    att = background_attention(
        features[None], boxes, box_batch, grid_size=grid_size, spatial_scale=scale, min_background=min_background
    )
    A = att.attention[0]
    # Box masks per class at the image (union over boxes of a class) and feature resolutions.
    union = boxes_to_masks(boxes, box_batch, box_labels, (1, H, W), C - 1, form="union")[0]  # (C, H, W)
    union_small = boxes_to_masks(boxes, box_batch, box_labels, (1, h, w), C - 1, spatial_scale=scale, form="union")[0]
    inside_small = ~union_small[0]
    cams = torch.relu(torch.einsum("dhw,cd->chw", features, weight))  # (C, h, w)
    if not bool(torch.isfinite(cams).all()):
        raise ValueError(
            f"{fn}: the class activation maps features . classifier_weight overflow float32 (largest |feature| "
            f"{features.abs().max().item():.3g}, largest |weight| {weight.abs().max().item():.3g})"
        )
    present = [0] + sorted(set(box_labels.tolist()))
    slot = {c: i for i, c in enumerate(present)}
    # u_c and u_0 at the feature resolution, upsampled bilinearly to the image (the paper's footnote 3).
    small = torch.empty(len(present), h, w)
    small[1:] = cams[present[1:]]
    if background == "attention":
        small[0] = torch.where(inside_small, torch.where(A >= bg_threshold, A, torch.zeros_like(A)), torch.ones_like(A))
    else:
        small[0] = torch.where(inside_small, cams[0] / cams[0].max().clamp_min(1e-12), torch.ones_like(A))
    up = F.interpolate(small[None], size=(H, W), mode="bilinear", align_corners=False)[0].clamp_min(0)
    # Eq. 5: the CAM of each box over its maximum in that box (the official code's normalisation); where boxes of one
    # class overlap, the larger value.
    u = torch.zeros(len(present), H, W)
    u[0] = torch.where(union[0], torch.ones_like(up[0]), up[0])
    for box, c in zip(boxes.tolist(), box_labels.tolist()):
        r0, r1, c0, c1 = box_pixel_ranges(box, H, W)
        if r1 > r0 and c1 > c0:
            cam = up[slot[c], r0:r1, c0:c1]
            u[slot[c], r0:r1, c0:c1] = torch.maximum(u[slot[c], r0:r1, c0:c1], cam / cam.max().clamp_min(1e-12))
    # Probabilities as the official code makes them: inside the boxes a softmax over the classes present, so that
    # a weak CAM against u_0 = 0 stays uncertain and the pairwise terms decide; outside them background.
    inside = ~union[0]
    probs = torch.zeros_like(u)
    probs[0] = 1.0
    probs[:, inside] = torch.softmax(u[:, inside], 0)
    run = pydensecrf_inference if inference is None else inference
    image_t = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    # -log of the probabilities clipped at 1e-5, as pydensecrf's unary_from_softmax.
    q = run(
        -probs.clamp_min(1e-5).log()[None].float(),
        image_t,
        bilateral=(settings["bilateral_weight"], settings["bilateral_xy"], settings["bilateral_rgb"]),
        gaussian=(settings["gaussian_weight"], settings["gaussian_xy"]),
        iterations=int(settings["iterations"]),
    )
    if not isinstance(q, torch.Tensor) or tuple(q.shape) != (1, len(present), H, W):
        got = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"{fn}: inference must return marginals of shape {(1, len(present), H, W)}, got {got}")
    if not bool(torch.isfinite(q).all()):
        raise ValueError(f"{fn}: inference returned marginals that are not finite (NaN or Inf)")
    # A class only inside its boxes: its marginal is dropped elsewhere before the arg-max (the CRF's smoothing can
    # spill a little past a box edge).
    allowed = torch.stack([torch.ones(H, W, dtype=torch.bool) if c == 0 else union[c] for c in present])
    q = torch.where(allowed, q[0].detach().cpu().float(), torch.full((len(present), H, W), -1.0))
    y_crf = torch.as_tensor(np.asarray(present))[q.argmax(0)]

    # Eq. 8: prototypes from Y_crf sampled at the feature map's pixel centres.
    ys = ((torch.arange(h, dtype=torch.float64) + 0.5) * H / h).floor().clamp(max=H - 1).long()
    xs = ((torch.arange(w, dtype=torch.float64) + 0.5) * W / w).floor().clamp(max=W - 1).long()
    y_small = y_crf[ys][:, xs]
    f_hat = features / features.norm(dim=0, keepdim=True).clamp_min(COS_EPS)
    corr = []
    for c in present:
        member = y_small == c
        q = features[:, member].mean(1) if bool(member.any()) else weight[c]
        q_hat = q / q.norm().clamp_min(COS_EPS)
        corr.append(torch.einsum("dhw,d->hw", f_hat, q_hat))
    corr_up = F.interpolate(torch.stack(corr)[None], size=(H, W), mode="bilinear", align_corners=False)[0]
    corr_up = torch.where(allowed, corr_up, torch.full_like(corr_up, -float("inf")))
    y_ret = torch.as_tensor(np.asarray(present))[corr_up.argmax(0)]
    return PseudoLabels(y_crf.long(), y_ret.long(), A, bool(att.fallback[0]))
