"""Classical box segmentation baselines: per-box foreground masks for
:func:`boxloss.merge_box_masks`.

- :func:`grabcut_box_masks`: OpenCV's GrabCut per box, initialised with the box
  (Box2Seg's M; Box to Tag and Back's Table 1 baseline);
- :func:`dense_crf_box_masks`: one DenseCRF per image from box unaries
  (pydensecrf, installed by the ``pydensecrf2`` distribution);
- :func:`box_fill_masks`: every pixel of the box is object.

They run offline on one uint8 RGB image (H, W, 3) at a time, in image pixels
(the box convention of :mod:`boxloss.ops.boxes` at scale 1), and return (K, H, W)
bool numpy arrays.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from boxloss import _pydensecrf
from boxloss.ops.boxes import box_pixel_ranges


def _check_image(fn, image):
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{fn}: image must be a uint8 RGB array of shape (H, W, 3), got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image)


def _boxes(fn, boxes):
    b = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    if torch.isnan(b).any() or bool(((b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])).any()):
        raise ValueError(f"{fn}: boxes must be (K, 4) x0, y0, x1, y1 without NaN and with x1 >= x0, y1 >= y0")
    return b.tolist()


def box_fill_masks(boxes, size: tuple[int, int]) -> np.ndarray:
    """(K, H, W) bool: the pixels each box covers."""
    H, W = size
    out = np.zeros((len(_boxes("box_fill_masks", boxes)), H, W), dtype=bool)
    for k, box in enumerate(_boxes("box_fill_masks", boxes)):
        r0, r1, c0, c1 = box_pixel_ranges(box, H, W)
        out[k, r0:r1, c0:c1] = True
    return out


def grabcut_box_masks(image, boxes, *, iterations: int = 5, min_side: int = 3, seed: int = 0) -> np.ndarray:
    """(K, H, W) bool: GrabCut (``cv2.grabCut`` with ``GC_INIT_WITH_RECT``) inside each box.

    Pixels outside the box are background; definite and probable foreground inside it
    are object.  GrabCut needs background samples and a box of a few pixels: a box
    narrower than ``min_side``, covering the whole image, or whose model cannot be
    fitted is filled instead, with one warning that counts them.

    GrabCut starts its colour models from k-means seeded by OpenCV's random
    generator, so OpenCV's generator is set to ``seed`` (``cv2.setRNGSeed``) before
    each box: the masks are a function of the image, the boxes and the settings,
    whatever was drawn before (pseudo labels can be cached and recomputed in any
    order).  This resets OpenCV's generator of the calling thread.
    """
    import cv2

    fn = "grabcut_box_masks"
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**31:
        raise ValueError(f"{fn}: seed must be an integer in [0, 2^31), got {seed!r}")
    image = _check_image(fn, image)
    H, W = image.shape[:2]
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    boxes = _boxes(fn, boxes)
    out = np.zeros((len(boxes), H, W), dtype=bool)
    filled = 0
    for k, box in enumerate(boxes):
        r0, r1, c0, c1 = box_pixel_ranges(box, H, W)
        if r1 == r0:
            continue
        rows, cols = slice(r0, r1), slice(c0, c1)
        rect = (c0, r0, c1 - c0, r1 - r0)
        whole = r1 - r0 == H and c1 - c0 == W
        if r1 - r0 < min_side or c1 - c0 < min_side or whole:
            out[k, rows, cols] = True
            filled += 1
            continue
        mask = np.zeros((H, W), np.uint8)
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        try:
            cv2.setRNGSeed(int(seed))
            cv2.grabCut(bgr, mask, rect, bgd, fgd, iterations, cv2.GC_INIT_WITH_RECT)
        except cv2.error:
            out[k, rows, cols] = True
            filled += 1
            continue
        fg = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
        out[k, rows, cols] = fg[rows, cols]
    if filled:
        warnings.warn(
            f"{fn}: {filled} of {len(boxes)} boxes were filled instead (too small for GrabCut, "
            "covering the whole image, or GrabCut failed)",
            stacklevel=2,
        )
    return out


def dense_crf_box_masks(
    image,
    boxes,
    labels,
    num_classes: int,
    *,
    box_confidence: float = 0.6,
    outside_confidence: float = 0.9,
    iterations: int = 10,
    gaussian_sxy: float = 3.0,
    gaussian_compat: float = 3.0,
    bilateral_sxy: float = 80.0,
    bilateral_srgb: float = 13.0,
    bilateral_compat: float = 10.0,
) -> np.ndarray:
    """(K, H, W) bool: one DenseCRF (Krähenbühl & Koltun) per image from box unaries.

    Unaries: outside every box, background with probability ``outside_confidence``;
    inside boxes, ``box_confidence`` shared equally by the classes of the boxes
    covering the pixel and the rest by the background; the remaining mass spread
    over the other classes.  Pairwise terms are DeepLab's defaults (Gaussian sxy 3,
    compat 3; bilateral sxy 80, srgb 13, compat 10).  Box k's mask: pixels of the
    box labelled with its class after ``iterations`` mean-field steps.
    """
    fn = "dense_crf_box_masks"
    image = _check_image(fn, image)
    H, W = image.shape[:2]
    boxes = _boxes(fn, boxes)
    labels = [int(x) for x in torch.as_tensor(labels).reshape(-1).tolist()]
    if len(labels) != len(boxes):
        raise ValueError(f"{fn}: labels must have one entry per box ({len(boxes)}), got {len(labels)}")
    C = num_classes + 1
    if any(not 1 <= c <= num_classes for c in labels):
        raise ValueError(f"{fn}: labels must lie in [1, {num_classes}], got {labels}")
    # pydensecrf takes NaN or infinite kernel widths without complaint and crashes the process.
    settings = dict(
        gaussian_sxy=gaussian_sxy,
        gaussian_compat=gaussian_compat,
        bilateral_sxy=bilateral_sxy,
        bilateral_srgb=bilateral_srgb,
        bilateral_compat=bilateral_compat,
    )
    for name, v in settings.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
            raise ValueError(f"{fn}: {name} must be a positive finite number, got {v!r}")
    for name, v in (("box_confidence", box_confidence), ("outside_confidence", outside_confidence)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
            raise ValueError(f"{fn}: {name} must be a probability in (0, 1), got {v!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"{fn}: iterations must be an int >= 0, got {iterations!r}")
    covered = np.zeros((C, H, W), dtype=bool)
    spans = []
    for box, c in zip(boxes, labels):
        r0, r1, c0, c1 = box_pixel_ranges(box, H, W)
        rows, cols = slice(r0, r1), slice(c0, c1)
        spans.append((rows, cols))
        covered[c, rows, cols] = True
    n_box = covered[1:].sum(0)
    probs = np.empty((C, H, W), np.float32)
    rest = 1.0 - outside_confidence
    probs[:] = rest / max(C - 1, 1)
    probs[0] = outside_confidence
    inside = n_box > 0
    share = box_confidence / np.maximum(n_box, 1)
    for c in range(1, C):
        probs[c] = np.where(covered[c], share, np.where(inside, (1 - box_confidence) * 0.1 / max(C - 1, 1), probs[c]))
    probs[0] = np.where(inside, 1 - box_confidence, probs[0])
    probs /= probs.sum(0, keepdims=True)
    pydensecrf = _pydensecrf.load(fn)
    crf = pydensecrf.DenseCRF2D(W, H, C)
    crf.setUnaryEnergy(pydensecrf.unary_from_softmax(probs))
    crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    crf.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=image, compat=bilateral_compat)
    label_map = np.argmax(np.array(crf.inference(iterations)).reshape(C, H, W), axis=0)
    out = np.zeros((len(boxes), H, W), dtype=bool)
    for k, ((rows, cols), c) in enumerate(zip(spans, labels)):
        out[k, rows, cols] = label_map[rows, cols] == c
    return out
