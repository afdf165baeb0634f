r"""BANA's pseudo labels (Sec. 3.2) and noise-aware loss (Sec. 3.3).

Oh, Kim and Ham, "Background-Aware Pooling and Noise-Aware Loss for
Weakly-Supervised Semantic Segmentation", CVPR 2021, with its supplement.

Pseudo labels (:func:`bana_pseudo_labels`, offline, one image at a time on the CPU):

.. math::
    u_c(p) = \frac{\mathrm{CAM}_c(p)}{\max_p \mathrm{CAM}_c(p)} [p \in \mathcal{B}_c], \quad
    \mathrm{CAM}_c(p) = \mathrm{ReLU}(f(p) \cdot w_c), \quad u_0(p) = A(p)              \quad (5\text{-}7)

    q_c = \frac{1}{|Q_c|} \sum_{p \in Q_c} f(p), \qquad
    C_c(p) = \frac{f(p)}{\|f(p)\|} \cdot \frac{q_c}{\|q_c\|}                              \quad (8, 9)

Noise-aware loss (:func:`noise_aware_loss`) with the cosine classifier of the
supplement (Eq. 3) ``H_c(p) = softmax_c(tau cos(phi(p), W_c))``:

.. math::
    \mathcal{L}_{ce} = -\frac{1}{|S|} \sum_{p \in S} \log H_{c^*}(p), \quad
    \sigma(p) = \Big(\frac{1 + \cos(\phi(p), W_{c^*})}{\max_c (1 + \cos(\phi(p), W_c))}\Big)^\gamma  \quad (10\text{-}12)

    \mathcal{L}_{wce} = -\frac{\sum_{p \notin S} \sigma(p) \log H_{c^*}(p)}{\sum_{p \notin S} \sigma(p)}, \quad
    \mathcal{L} = \mathcal{L}_{ce} + \lambda \mathcal{L}_{wce}                             \quad (13, 14)
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from boxloss import _checks

UNRELIABLE = ("nal", "ignore", "entropy", "bootstrap")
COS_EPS = 1e-8


def cosine_logits(features: torch.Tensor, classifier_weight: torch.Tensor, tau: float = 20.0) -> torch.Tensor:
    """(B, C, H, W) logits tau * cos(phi(p), W_c) of the cosine classifier (supplement Eq. 3).

    Norms are clamped at 1e-8, so a zero feature vector has cosine 0 with every class.
    """
    phi = features / features.norm(dim=1, keepdim=True).clamp_min(COS_EPS)
    w = classifier_weight / classifier_weight.norm(dim=1, keepdim=True).clamp_min(COS_EPS)
    return tau * torch.einsum("bdhw,cd->bchw", phi, w)


def bootstrap_beta(iteration: int, max_iterations: int, power: float = 0.9) -> float:
    """The poly schedule of the bootstrapping beta, from 1 at iteration 0 to 0 at max_iterations (supplement Eq. 7)."""
    fn = "bootstrap_beta"
    _checks.check_int(fn, "max_iterations", max_iterations, minimum=1)
    _checks.check_int(fn, "iteration", iteration, minimum=0)
    return float(max(0.0, 1.0 - iteration / max_iterations) ** power)


class NoiseAwareLoss(NamedTuple):
    loss: torch.Tensor  # L_ce + lam * L_unreliable
    ce: torch.Tensor  # L_ce on S
    unreliable: torch.Tensor  # L_wce, L_ER, L_BS or 0
    confidence: torch.Tensor  # (B, H, W) sigma (0 where y_crf is ignore_index)


def noise_aware_loss(
    features: torch.Tensor,
    classifier_weight: torch.Tensor,
    y_crf: torch.Tensor,
    y_ret: torch.Tensor,
    *,
    gamma: float = 7.0,
    lam: float = 0.1,
    tau: float = 20.0,
    ignore_index: int = 255,
    detach_confidence: bool = True,
    unreliable: str = "nal",
    beta: float = 1.0,
) -> NoiseAwareLoss:
    r"""The noise-aware loss L = L_ce + lam * L_wce (BANA Eq. 10-14).

    S, the reliable region, holds the pixels where ``y_crf == y_ret``; the
    unreliable region ~S the pixels where they differ; pixels with ``y_crf ==
    ignore_index`` are in neither (a ``y_ret`` of ignore_index with a valid
    ``y_crf`` counts as disagreement).  The target everywhere is c* = y_crf.

    ``unreliable`` selects the term on ~S (Table 3 of the paper): ``"nal"``
    (Eq. 13, confidence-weighted CE), ``"ignore"`` (0), ``"entropy"`` (supplement
    Eq. 4, mean entropy of H over ~S) or ``"bootstrap"`` (supplement Eq. 6-7,
    cross-entropy to ``beta * onehot(y_crf) + (1 - beta) * H``, H detached; see
    :func:`bootstrap_beta` for the poly schedule).

    Means over empty sets are 0, so the loss is finite when S or ~S is empty
    (and for zero feature vectors, whose cosines are 0).  The confidence is
    detached by default (a weight, not a target of the gradient; set
    ``detach_confidence=False`` to differentiate through Eq. 11-12).

    Args:
        features: (B, D, H, W) phi (at the label resolution).
        classifier_weight: (C, D) W, C = L + 1 classes (no bias).
        y_crf, y_ret: (B, H, W) int64 labels in [0, C) or ignore_index.
        gamma: damping of Eq. 12 (>= 1 in the paper, 7 by default).
        lam: lambda of Eq. 14.
        tau: scale of the cosine classifier.

    Returns:
        :class:`NoiseAwareLoss` (loss, ce, unreliable, confidence).

    Shape:
        features (B, D, H, W), labels (B, H, W) -> scalar loss.

    Example:
        >>> phi = torch.randn(2, 16, 8, 8, requires_grad=True)
        >>> W = torch.randn(3, 16, requires_grad=True)
        >>> y1 = torch.randint(0, 3, (2, 8, 8)); y2 = torch.randint(0, 3, (2, 8, 8))
        >>> out = noise_aware_loss(phi, W, y1, y2)
        >>> out.loss.backward()
    """
    fn = "noise_aware_loss"
    _checks.check_tensor(fn, "features", features, dim=4, layout="(B, D, H, W)")
    _checks.check_float_dtype(fn, "features", features)
    _checks.check_tensor(fn, "classifier_weight", classifier_weight, dim=2, layout="(C, D)")
    B, D, H, W = features.shape
    C = classifier_weight.shape[0]
    if classifier_weight.shape[1] != D:
        raise ValueError(f"{fn}: classifier_weight must have shape (C, D) with D = {D}, got "
                         f"{tuple(classifier_weight.shape)}")
    for name, y in (("y_crf", y_crf), ("y_ret", y_ret)):
        _checks.check_tensor(fn, name, y, dim=3, layout="(B, H, W)")
        if y.dtype != torch.long:
            raise TypeError(f"{fn}: {name} must be an int64 tensor, got {y.dtype}")
        if tuple(y.shape) != (B, H, W):
            raise ValueError(f"{fn}: {name} must have shape (B, H, W) = {(B, H, W)}, got {tuple(y.shape)}")
        _checks.check_same(fn, name, y, "features", features, what="device")
    _checks.check_choice(fn, "unreliable", unreliable, UNRELIABLE)
    for name, v in (("gamma", gamma), ("tau", tau)):
        _checks.check_positive(fn, name, v)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
        raise ValueError(f"{fn}: lam must be a number >= 0, got {lam!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"{fn}: beta must be a number in [0, 1], got {beta!r}")

    logits = cosine_logits(features, classifier_weight, tau)
    log_h = logits.log_softmax(1)
    labelled = y_crf != ignore_index
    target = torch.where(labelled, y_crf, torch.zeros_like(y_crf))
    # Labels out of range would index garbage: checked here, on the values (no graph break: it raises).
    bad = labelled & ((y_crf < 0) | (y_crf >= C))
    if bool(bad.any()):
        raise ValueError(f"{fn}: y_crf must hold labels in [0, {C}) or ignore_index = {ignore_index}")
    nll = -log_h.gather(1, target.unsqueeze(1)).squeeze(1)  # (B, H, W)
    reliable = labelled & (y_ret == y_crf)
    unreliable_mask = labelled & ~reliable
    zero = nll.new_zeros(())
    ce = torch.where(reliable, nll, zero).sum() / reliable.sum().clamp_min(1)

    # Eq. 11-12 on the same cosines (logits / tau); 1 + cos >= 0.
    corr = 1.0 + logits / tau
    corr_star = corr.gather(1, target.unsqueeze(1)).squeeze(1)
    ratio = corr_star / corr.amax(1).clamp_min(COS_EPS)
    confidence = torch.where(labelled, ratio.clamp(0.0, 1.0) ** gamma, zero)
    if detach_confidence:
        confidence = confidence.detach()

    count = unreliable_mask.sum().clamp_min(1)
    if unreliable == "nal":
        weights = torch.where(unreliable_mask, confidence, zero)
        total = weights.sum()
        term = (weights * nll).sum() / torch.where(total > 0, total, torch.ones_like(total))
    elif unreliable == "entropy":
        entropy = -(log_h.exp() * log_h).sum(1)
        term = torch.where(unreliable_mask, entropy, zero).sum() / count
    elif unreliable == "bootstrap":
        probs = log_h.exp().detach()
        onehot = F.one_hot(target, C).permute(0, 3, 1, 2).to(log_h.dtype)
        soft = beta * onehot + (1.0 - beta) * probs
        per_pixel = -(soft * log_h).sum(1)
        term = torch.where(unreliable_mask, per_pixel, zero).sum() / count
    else:
        term = zero
    return NoiseAwareLoss(ce + lam * term, ce, term, confidence)


class NoiseAwareCELoss(nn.Module):
    """Module form of :func:`noise_aware_loss`; ``forward(features, classifier_weight, y_crf, y_ret)`` -> loss."""

    def __init__(self, *, gamma: float = 7.0, lam: float = 0.1, tau: float = 20.0, ignore_index: int = 255,
                 detach_confidence: bool = True, unreliable: str = "nal") -> None:
        super().__init__()
        _checks.check_choice("NoiseAwareCELoss", "unreliable", unreliable, UNRELIABLE)
        self.gamma, self.lam, self.tau = gamma, lam, tau
        self.ignore_index, self.detach_confidence, self.unreliable = ignore_index, detach_confidence, unreliable

    def forward(self, features, classifier_weight, y_crf, y_ret, beta: float = 1.0):
        return noise_aware_loss(features, classifier_weight, y_crf, y_ret, gamma=self.gamma, lam=self.lam,
                                tau=self.tau, ignore_index=self.ignore_index,
                                detach_confidence=self.detach_confidence, unreliable=self.unreliable,
                                beta=beta).loss

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, lam={self.lam}, tau={self.tau}, unreliable={self.unreliable!r}"


# --------------------------------------------------------------------------- pseudo labels

DEFAULT_CRF = {"iterations": 10, "bilateral_weight": 4.0, "bilateral_xy": 55.0, "bilateral_rgb": 3.0,
               "gaussian_weight": 3.0, "gaussian_xy": 3.0}


class PseudoLabels(NamedTuple):
    y_crf: torch.Tensor  # (H, W) int64 labels 0..L after DenseCRF (Eq. 5-7)
    y_ret: torch.Tensor  # (H, W) int64 labels 0..L by retrieval (Eq. 8-9)
    attention: torch.Tensor  # (h, w) A used for u_0
    fallback: bool  # the attention fell back to A = 0 inside the boxes


BACKGROUND_UNARIES = ("attention", "cam")


def _pydensecrf_inference(unary: torch.Tensor, image: torch.Tensor, *, bilateral, gaussian, iterations: int
                          ) -> torch.Tensor:
    """Mean-field marginals Q (B, C, H, W) through pydensecrf, one image at a time: ``unary`` (B, C, H, W) negative
    log-probabilities, ``image`` (B, 3, H, W) colours in [0, 255], ``bilateral`` = (weight, sigma_xy, sigma_rgb),
    ``gaussian`` = (weight, sigma_xy) (pydensecrf's ``compat``, ``sxy`` and ``srgb``)."""
    import pydensecrf.densecrf as dcrf

    B, C, H, W = unary.shape
    out = torch.empty(B, C, H, W, dtype=torch.float32)
    for b in range(B):
        rgb = np.ascontiguousarray(image[b].detach().cpu().float().round().clamp(0, 255).to(torch.uint8)
                                   .permute(1, 2, 0).numpy())
        model = dcrf.DenseCRF2D(W, H, C)
        model.setUnaryEnergy(np.ascontiguousarray(unary[b].detach().cpu().float().reshape(C, -1).numpy()))
        model.addPairwiseGaussian(sxy=float(gaussian[1]), compat=float(gaussian[0]))
        model.addPairwiseBilateral(sxy=float(bilateral[1]), srgb=float(bilateral[2]), rgbim=rgb,
                                   compat=float(bilateral[0]))
        out[b] = torch.from_numpy(np.array(model.inference(int(iterations)), dtype=np.float32).reshape(C, H, W))
    return out


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
    2. Unaries at the feature resolution: ``u_c = CAM_c / max_p CAM_c`` (max over
       the whole map, 0 if the CAM is 0 everywhere) inside the boxes of class c
       and 0 elsewhere; ``u_0 = A`` where ``A >= bg_threshold`` (the "confident
       background" of the paper's hyperparameter section) and 0 elsewhere inside
       the boxes, 1 outside them.  u_0 and u_c are upsampled bilinearly to the
       image size (the footnote), the box masks applied at image resolution;
       the channels of the classes present are normalised to sum to one per
       pixel (a small floor keeps every log finite) and their negative logs are
       the DenseCRF unaries.  DenseCRF runs on the uint8 RGB image with the
       official defaults ``crf`` = :data:`DEFAULT_CRF` (bilateral weight 4, xy
       55, rgb 3; Gaussian weight 3, xy 3; 10 iterations).  A pixel that the
       CRF gives a class whose boxes do not cover it becomes background.
       ``background="cam"`` replaces u_0 inside the boxes by the background
       class's CAM, normalised like u_c (no threshold): the paper's "Y_crf w/o
       u_0" row of Table 1, and what a network without background attention
       (global average pooling) has.
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
            colours in [0, 255]; it returns the marginals (1, C', H, W). Default: pydensecrf.

    Returns:
        :class:`PseudoLabels` (y_crf, y_ret as (H, W) int64, attention, fallback).
    """
    fn = "bana_pseudo_labels"
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{fn}: image must be a uint8 RGB array of shape (H, W, 3), got {image.dtype} "
                         f"{image.shape}")
    image = np.ascontiguousarray(image)
    _checks.check_tensor(fn, "features", features, dim=3, layout="(D, h, w)")
    _checks.check_tensor(fn, "classifier_weight", classifier_weight, dim=2, layout="(L + 1, D)")
    settings = dict(DEFAULT_CRF)
    if crf is not None:
        unknown = set(crf) - set(DEFAULT_CRF)
        if unknown:
            raise ValueError(f"{fn}: crf has unknown keys {sorted(unknown)}; known: {sorted(DEFAULT_CRF)}")
        settings.update(crf)
    _checks.check_choice(fn, "background", background, BACKGROUND_UNARIES)
    if inference is not None and not callable(inference):
        raise TypeError(f"{fn}: inference must be callable (unary, image, *, bilateral, gaussian, iterations), "
                        f"got {type(inference).__name__}")
    H, W = image.shape[:2]
    features = features.detach().to("cpu", torch.float32)
    weight = classifier_weight.detach().to("cpu", torch.float32)
    D, h, w = features.shape
    C = weight.shape[0]
    if weight.shape[1] != D:
        raise ValueError(f"{fn}: classifier_weight must have shape (L + 1, D) with D = {D}, got {tuple(weight.shape)}")
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4).cpu()
    box_labels = torch.as_tensor(box_labels).reshape(-1).to(torch.long).cpu()
    if box_labels.shape[0] != boxes.shape[0]:
        raise ValueError(f"{fn}: box_labels must have one label per box ({boxes.shape[0]}), got "
                         f"{box_labels.shape[0]}")
    if bool(((box_labels < 1) | (box_labels >= C)).any()):
        raise ValueError(f"{fn}: box_labels must lie in [1, {C - 1}], got {box_labels.tolist()}")
    from boxloss.background_attention import background_attention
    from boxloss.box_masks import boxes_to_masks

    scale = w / W
    box_batch = torch.zeros(boxes.shape[0], dtype=torch.long)
    att = background_attention(features[None], boxes, box_batch, grid_size=grid_size, spatial_scale=scale,
                               min_background=min_background)
    A = att.attention[0]
    # Box masks per class at the image (union over boxes of a class) and feature resolutions.
    union = boxes_to_masks(boxes, box_batch, box_labels, (1, H, W), C - 1, form="union")[0]  # (C, H, W)
    union_small = boxes_to_masks(boxes, box_batch, box_labels, (1, h, w), C - 1, spatial_scale=scale,
                                 form="union")[0]
    inside_small = ~union_small[0]
    cams = torch.relu(torch.einsum("dhw,cd->chw", features, weight))  # (C, h, w)
    peak = cams.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    u = cams / peak
    if background == "attention":
        u[0] = torch.where(inside_small, torch.where(A >= bg_threshold, A, torch.zeros_like(A)), torch.ones_like(A))
    else:
        u[0] = torch.where(inside_small, u[0], torch.ones_like(A))
    up = F.interpolate(u[None], size=(H, W), mode="bilinear", align_corners=False)[0].clamp_min(0)
    present = [0] + sorted(set(box_labels.tolist()))
    inside = ~union[0]
    unary = torch.stack([torch.where(inside, up[0], torch.ones_like(up[0])) if c == 0
                         else torch.where(union[c], up[c], torch.zeros_like(up[c])) for c in present])
    unary = unary + 1e-5
    unary = unary / unary.sum(0, keepdim=True)
    run = _pydensecrf_inference if inference is None else inference
    image_t = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    # -log of the probabilities clipped at 1e-5, as pydensecrf's unary_from_softmax.
    q = run(-unary.clamp_min(1e-5).log()[None].float(), image_t,
            bilateral=(settings["bilateral_weight"], settings["bilateral_xy"], settings["bilateral_rgb"]),
            gaussian=(settings["gaussian_weight"], settings["gaussian_xy"]), iterations=int(settings["iterations"]))
    if not isinstance(q, torch.Tensor) or tuple(q.shape) != (1, len(present), H, W):
        raise ValueError(f"{fn}: inference must return marginals of shape {(1, len(present), H, W)}, got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    y_crf = torch.as_tensor(np.asarray(present))[q[0].argmax(0).cpu()]
    # A class only inside its boxes (the CRF's smoothing can spill a little past a box edge).
    y_crf = torch.where(union.gather(0, y_crf[None])[0], y_crf, torch.zeros_like(y_crf))

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
    allowed = torch.stack([torch.ones(H, W, dtype=torch.bool) if c == 0 else union[c] for c in present])
    corr_up = torch.where(allowed, corr_up, torch.full_like(corr_up, -float("inf")))
    y_ret = torch.as_tensor(np.asarray(present))[corr_up.argmax(0)]
    return PseudoLabels(y_crf.long(), y_ret.long(), A, bool(att.fallback[0]))
