"""Noise-aware loss (BANA Eq. 10-14 with the supplement's alternatives) and the
pseudo labels of Sec. 3.2 on a rendered image with its boxes."""

import math
import types

import numpy as np
import pytest
import torch

import boxloss
from boxloss.losses.noise_aware import bootstrap_beta, cosine_logits


def _labels(B=2, H=6, W=7, C=4, seed=0, agree=0.6):
    g = torch.Generator().manual_seed(seed)
    y_crf = torch.randint(0, C, (B, H, W), generator=g)
    other = torch.randint(0, C, (B, H, W), generator=g)
    y_ret = torch.where(torch.rand(B, H, W, generator=g) < agree, y_crf, other)
    y_crf[0, 0, :3] = 255
    return y_crf, y_ret


def _features(B=2, D=5, H=6, W=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, H, W, generator=g, dtype=torch.float64)


def _loss_by_loops(phi, weight, y_crf, y_ret, gamma, lam, tau, ignore=255):
    """Eq. 10-14 pixel by pixel."""
    B, D, H, W = phi.shape
    ce_sum, ce_n, wce_num, wce_den = 0.0, 0, 0.0, 0.0
    for b in range(B):
        for i in range(H):
            for j in range(W):
                c = int(y_crf[b, i, j])
                if c == ignore:
                    continue
                v = phi[b, :, i, j]
                cos = torch.stack([torch.dot(v, wc) / (v.norm() * wc.norm()) for wc in weight])
                log_h = torch.log_softmax(tau * cos, 0)
                if int(y_ret[b, i, j]) == c:
                    ce_sum += -log_h[c].item()
                    ce_n += 1
                else:
                    sigma = ((1 + cos[c]) / (1 + cos).max()).item() ** gamma
                    wce_num += -sigma * log_h[c].item()
                    wce_den += sigma
    ce = ce_sum / ce_n if ce_n else 0.0
    wce = wce_num / wce_den if wce_den else 0.0
    return ce + lam * wce, ce, wce


@pytest.mark.parametrize("gamma, lam, tau", [(7.0, 0.1, 20.0), (1.0, 1.0, 5.0)])
def test_noise_aware_loss_by_hand(gamma, lam, tau):
    phi = _features()
    weight = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y_crf, y_ret = _labels()
    out = _terms(phi, weight, y_crf, y_ret, gamma=gamma, lam=lam, tau=tau)
    loss, ce, wce = _loss_by_loops(phi, weight, y_crf, y_ret, gamma, lam, tau)
    assert math.isclose(out.loss.item(), loss, rel_tol=1e-9)
    assert math.isclose(out.ce.item(), ce, rel_tol=1e-9)
    assert math.isclose(out.unreliable.item(), wce, rel_tol=1e-9)


def test_noise_aware_loss_edge_cases_are_finite():
    phi = _features().requires_grad_(True)
    weight = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    y_crf, _ = _labels()
    for unreliable in ("nal", "ignore", "entropy", "bootstrap"):
        # ~S empty (labels agree), S empty (labels always differ), all ignored, zero features.
        cases = [
            (phi, y_crf, y_crf.clone()),
            (phi, y_crf, torch.where(y_crf == 255, y_crf, (y_crf + 1) % 4)),
            (phi, torch.full_like(y_crf, 255), y_crf),
            (torch.zeros_like(phi, requires_grad=True), y_crf, (y_crf + 1) % 4),
        ]
        for features, a, b in cases:
            out = _terms(features, weight, a, b, unreliable=unreliable, beta=0.5)
            assert torch.isfinite(out.loss), unreliable
            out.loss.backward()
            assert torch.isfinite(weight.grad).all()
    out = _terms(phi, weight, y_crf, y_crf.clone())
    assert out.unreliable.item() == 0.0
    zero = _terms(torch.zeros_like(phi), weight, y_crf, (y_crf + 1) % 4)
    # Zero features: every cosine is 0, sigma = 1, H uniform.
    assert torch.allclose(zero.unreliable, torch.tensor(math.log(4.0), dtype=torch.float64))


def test_unreliable_options_table3_loop():
    phi = _features().requires_grad_(True)
    weight = torch.randn(4, 5, dtype=torch.float64)
    y_crf, y_ret = _labels()
    results = {}
    for setting in ("ignore", "entropy", "bootstrap", "nal"):
        results[setting] = _terms(phi, weight, y_crf, y_ret, unreliable=setting, beta=0.3)
    assert results["ignore"].loss.item() == pytest.approx(results["ignore"].ce.item())
    logp = cosine_logits(phi, weight, 20.0).log_softmax(1)
    mask = (y_crf != 255) & (y_crf != y_ret)
    entropy = -(logp.exp() * logp).sum(1)[mask].mean()
    assert results["entropy"].unreliable.item() == pytest.approx(entropy.item(), rel=1e-9)
    target = torch.where(y_crf == 255, 0, y_crf)
    onehot = torch.nn.functional.one_hot(target, 4).permute(0, 3, 1, 2).double()
    soft = 0.3 * onehot + 0.7 * logp.exp()
    bs = -(soft * logp).sum(1)[mask].mean()
    assert results["bootstrap"].unreliable.item() == pytest.approx(bs.item(), rel=1e-9)
    # beta = 1: bootstrapping is the plain cross-entropy on ~S.
    b1 = _terms(phi, weight, y_crf, y_ret, unreliable="bootstrap", beta=1.0)
    nll = -logp.gather(1, target[:, None])[:, 0]
    assert b1.unreliable.item() == pytest.approx(nll[mask].mean().item(), rel=1e-9)
    assert bootstrap_beta(0, 100) == 1.0 and bootstrap_beta(100, 100) == 0.0
    assert 0 < bootstrap_beta(50, 100) < 1


def _terms(*args, **kwargs):
    """The loss and its terms as attributes."""
    loss, terms = boxloss.noise_aware_loss(*args, return_terms=True, **kwargs)
    assert set(terms) == {"ce", "unreliable", "confidence"}
    return types.SimpleNamespace(loss=loss, **terms)


def test_loss_is_a_tensor_and_terms_on_request():
    phi = _features().requires_grad_(True)
    weight = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    y_crf, y_ret = _labels()
    loss = boxloss.noise_aware_loss(phi, weight, y_crf, y_ret, lam=0.5)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0
    loss.backward()
    assert phi.grad is not None and weight.grad is not None
    again, terms = boxloss.noise_aware_loss(phi, weight, y_crf, y_ret, lam=0.5, return_terms=True)
    torch.testing.assert_close(again, loss)
    torch.testing.assert_close(again, terms["ce"] + 0.5 * terms["unreliable"])
    assert terms["confidence"].shape == y_crf.shape
    module = boxloss.NoiseAwareLoss(lam=0.5)
    assert boxloss.NoiseAwareCELoss is boxloss.NoiseAwareLoss
    torch.testing.assert_close(module(phi, weight, y_crf, y_ret), loss)
    module_loss, module_terms = module(phi, weight, y_crf, y_ret, return_terms=True)
    torch.testing.assert_close(module_loss, loss)
    torch.testing.assert_close(module_terms["unreliable"], terms["unreliable"])
    with pytest.raises(TypeError, match="return_terms must be a bool"):
        boxloss.noise_aware_loss(phi, weight, y_crf, y_ret, return_terms="yes")


def test_confidence_detach_and_module():
    phi = _features().requires_grad_(True)
    weight = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    y_crf, y_ret = _labels()
    out = _terms(phi, weight, y_crf, y_ret)
    assert not out.confidence.requires_grad
    assert ((out.confidence >= 0) & (out.confidence <= 1)).all()
    out2 = _terms(phi, weight, y_crf, y_ret, detach_confidence=False)
    assert out2.confidence.requires_grad
    torch.testing.assert_close(out.loss, out2.loss)
    module = boxloss.NoiseAwareCELoss(gamma=7, lam=0.1)
    torch.testing.assert_close(module(phi, weight, y_crf, y_ret), out.loss)


def test_noise_aware_loss_gradcheck():
    phi = _features(B=1, H=3, W=3).requires_grad_(True)
    weight = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    y_crf, y_ret = _labels(B=1, H=3, W=3, seed=2, agree=0.5)
    for detach in (True, False):
        assert torch.autograd.gradcheck(
            lambda p, w, detach=detach: boxloss.noise_aware_loss(
                p, w, y_crf, y_ret, gamma=2.0, detach_confidence=detach
            ),
            (phi, weight),
        )


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(unreliable="drop"), ValueError, "unreliable"),
        (dict(gamma=0.0), ValueError, "gamma"),
        (dict(lam=-1.0), ValueError, "lam"),
        (dict(beta=2.0), ValueError, "beta"),
    ],
)
def test_noise_aware_loss_bad_settings(kwargs, exc, match):
    y_crf, y_ret = _labels()
    with pytest.raises(exc, match=match):
        boxloss.noise_aware_loss(_features(), torch.randn(4, 5, dtype=torch.float64), y_crf, y_ret, **kwargs)


def test_noise_aware_loss_bad_inputs():
    y_crf, y_ret = _labels()
    phi, weight = _features(), torch.randn(4, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="y_ret must have shape"):
        boxloss.noise_aware_loss(phi, weight, y_crf, y_ret[:, :-1])
    with pytest.raises(TypeError, match="y_crf must be an int64"):
        boxloss.noise_aware_loss(phi, weight, y_crf.int(), y_ret)
    with pytest.raises(ValueError, match="classifier_weight"):
        boxloss.noise_aware_loss(phi, weight[:, :3], y_crf, y_ret)
    with pytest.raises(ValueError, match="y_crf must hold labels"):
        boxloss.noise_aware_loss(phi, weight, torch.full_like(y_crf, 9), y_ret)


@pytest.mark.parametrize("label", [9, 4, -1])
def test_noise_aware_loss_checks_y_ret_labels(label):
    # A y_ret label out of range would silently count as a disagreement: it raises, like y_crf.
    y_crf, y_ret = _labels()
    y_ret = y_ret.clone()
    y_ret[0, 0, 0] = label
    with pytest.raises(ValueError, match=f"^noise_aware_loss: y_ret must hold labels in \\[0, 4\\) .*got {label}"):
        boxloss.noise_aware_loss(_features(), torch.randn(4, 5, dtype=torch.float64), y_crf, y_ret)
    y_ret[0, 0, 0] = 255  # ignore_index stays allowed
    boxloss.noise_aware_loss(_features(), torch.randn(4, 5, dtype=torch.float64), y_crf, y_ret)


@pytest.mark.parametrize("fn", ["noise_aware_loss", "cosine_logits"])
def test_classifier_weight_dtype_and_device_are_checked(fn):
    # float32 features with float64 weights: a TypeError naming the argument, not one from inside einsum.
    y_crf, y_ret = _labels()
    phi, weight = _features().float(), torch.randn(4, 5, dtype=torch.float64)
    call = getattr(boxloss, fn)
    args = (phi, weight, y_crf, y_ret) if fn == "noise_aware_loss" else (phi, weight)
    with pytest.raises(TypeError, match=f"^{fn}: classifier_weight must have the dtype of features"):
        call(*args)


def test_cosine_logits_of_huge_features_are_cosines():
    # The norm of a huge (finite) vector would overflow to Inf and make its cosine 0: the vectors are rescaled first.
    phi = torch.zeros(1, 2, 1, 1)
    phi[0, :, 0, 0] = torch.tensor([3e38, 3e38])
    weight = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    logits = cosine_logits(phi, weight, tau=1.0)
    torch.testing.assert_close(logits[0, :, 0, 0], torch.tensor([1.0, 0.0]), atol=1e-6, rtol=0)


def _rendered_sample():
    from boxloss.data import SyntheticConfig
    from boxloss.data.synthetic import generate_sample

    for index in range(20):
        s = generate_sample(SyntheticConfig(image_size=(96, 128), num_classes=3, seed=1), "train", index)
        if 1 <= s.num_boxes <= 4:
            return s
    raise AssertionError("no sample with 1-4 boxes")


def test_pseudo_labels_on_rendered_image():
    s = _rendered_sample()
    H, W = s.image.shape[:2]
    stride = 8
    h, w = H // stride, W // stride
    # Features a trained network might give: the image's colour at stride 8 plus the class indicator of the
    # true mask (so foreground and background are separable), with a little noise.
    import torch.nn.functional as F

    img = torch.as_tensor(s.image).permute(2, 0, 1).float()[None] / 255
    mask = torch.as_tensor(s.mask.astype(np.int64))
    onehot = F.one_hot(torch.where(mask == 255, 0, mask), 4).permute(2, 0, 1).float()[None]
    feats = torch.cat([F.adaptive_avg_pool2d(img, (h, w)), 2 * F.adaptive_avg_pool2d(onehot, (h, w))], 1)[0]
    feats = feats + 0.05 * torch.randn(feats.shape, generator=torch.Generator().manual_seed(0))
    weight = torch.cat([torch.zeros(4, 3), 2 * torch.eye(4)], 1)
    out = boxloss.bana_pseudo_labels(s.image, feats, weight, torch.as_tensor(s.boxes), torch.as_tensor(s.labels))
    assert out.y_crf.shape == (H, W) and out.y_ret.shape == (H, W)
    assert out.y_crf.dtype == torch.long and out.y_ret.dtype == torch.long
    present = {0, *s.labels.tolist()}
    assert set(out.y_crf.unique().tolist()) <= present and set(out.y_ret.unique().tolist()) <= present
    # Outside every box both are background.
    from boxloss.recipes.baselines import box_fill_masks

    inside = box_fill_masks(s.boxes, (H, W)).any(0)
    assert (out.y_crf.numpy()[~inside] == 0).all() and (out.y_ret.numpy()[~inside] == 0).all()
    # Both label maps agree with the true mask on most labelled pixels inside the boxes.
    m = (s.mask != 255) & inside
    for y in (out.y_crf, out.y_ret):
        acc = (y.numpy()[m] == s.mask[m]).mean()
        assert acc > 0.6, acc
    with pytest.raises(ValueError, match="uint8 RGB"):
        boxloss.bana_pseudo_labels(s.image.astype(np.float32), feats, weight, s.boxes, s.labels)
    with pytest.raises(ValueError, match="box_labels must lie"):
        boxloss.bana_pseudo_labels(s.image, feats, weight, s.boxes, np.zeros(len(s.labels), np.int64))
    with pytest.raises(ValueError, match="unknown keys"):
        boxloss.bana_pseudo_labels(s.image, feats, weight, s.boxes, s.labels, crf={"iters": 3})


def _rendered_features(s, stride=8, seed=0):
    """Features a trained network might give (see test_pseudo_labels_on_rendered_image)."""
    import torch.nn.functional as F

    H, W = s.image.shape[:2]
    h, w = H // stride, W // stride
    img = torch.as_tensor(s.image).permute(2, 0, 1).float()[None] / 255
    mask = torch.as_tensor(s.mask.astype(np.int64))
    onehot = F.one_hot(torch.where(mask == 255, 0, mask), 4).permute(2, 0, 1).float()[None]
    feats = torch.cat([F.adaptive_avg_pool2d(img, (h, w)), 2 * F.adaptive_avg_pool2d(onehot, (h, w))], 1)[0]
    return feats + 0.05 * torch.randn(feats.shape, generator=torch.Generator().manual_seed(seed))


def _no_crf(unary, image, *, bilateral, gaussian, iterations):
    """Mean-field with no pairwise term: the marginals are the unaries' own probabilities."""
    return torch.softmax(-unary, 1)


def test_pseudo_labels_call_the_given_inference():
    s = _rendered_sample()
    H, W = s.image.shape[:2]
    feats = _rendered_features(s)
    weight = torch.cat([torch.zeros(4, 3), 2 * torch.eye(4)], 1)
    calls = []

    def inference(unary, image, **kwargs):
        calls.append((unary, image, kwargs))
        return _no_crf(unary, image, **kwargs)

    out = boxloss.bana_pseudo_labels(
        s.image, feats, weight, s.boxes, s.labels, inference=inference, crf={"iterations": 4}
    )
    ((unary, image, kwargs),) = calls
    present = 1 + len(set(s.labels.tolist()))
    assert unary.shape == (1, present, H, W) and unary.dtype == torch.float32 and torch.isfinite(unary).all()
    assert torch.equal(image[0].permute(1, 2, 0), torch.as_tensor(s.image).float())
    assert kwargs == {"bilateral": (4.0, 55.0, 3.0), "gaussian": (3.0, 3.0), "iterations": 4}
    # Without a pairwise term Y_crf is the arg-max of the unaries: the true classes on most labelled box pixels.
    from boxloss import box_fill_masks

    m = (s.mask != 255) & box_fill_masks(s.boxes, (H, W)).any(0)
    assert (out.y_crf.numpy()[m] == s.mask[m]).mean() > 0.8
    with pytest.raises(ValueError, match="inference must return marginals of shape"):
        boxloss.bana_pseudo_labels(s.image, feats, weight, s.boxes, s.labels, inference=lambda u, i, **k: u[:, :1])
    with pytest.raises(TypeError, match="inference must be callable"):
        boxloss.bana_pseudo_labels(s.image, feats, weight, s.boxes, s.labels, inference="pydensecrf")


def test_pseudo_labels_background_from_the_cam():
    """background="cam" takes u_0 from the background CAM (Table 1's "w/o u_0"), "attention" from A (Eq. 7)."""
    s = _rendered_sample()
    H, W = s.image.shape[:2]
    feats = _rendered_features(s)
    # Class CAMs positive everywhere (the colour channels), the background CAM zero everywhere.
    weight = torch.cat([torch.full((4, 3), 0.3), 2 * torch.eye(4)], 1)
    weight[0] = 0
    from boxloss import box_fill_masks

    true_bg_in_box = (s.mask == 0) & box_fill_masks(s.boxes, (H, W)).any(0)
    assert true_bg_in_box.sum() > 50
    # At stride 2 the upsampling spreads little of u_0 = 1 from outside the boxes into them.
    feats = _rendered_features(s, stride=2)
    kw = {"inference": _no_crf, "bg_threshold": 0.5}
    att = boxloss.bana_pseudo_labels(s.image, feats, weight, s.boxes, s.labels, background="attention", **kw)
    cam = boxloss.bana_pseudo_labels(s.image, feats, weight, s.boxes, s.labels, background="cam", **kw)
    assert (att.y_crf.numpy()[true_bg_in_box] == 0).mean() > 0.8
    assert (cam.y_crf.numpy()[true_bg_in_box] == 0).mean() < 0.2
    # With the background row of the classifier on the background channel the CAM finds it again.
    weight[0, 3] = 2.0
    cam = boxloss.bana_pseudo_labels(s.image, feats, weight, s.boxes, s.labels, background="cam", **kw)
    assert (cam.y_crf.numpy()[true_bg_in_box] == 0).mean() > 0.8
    with pytest.raises(ValueError, match="background must be one of"):
        boxloss.bana_pseudo_labels(s.image, feats, weight, s.boxes, s.labels, background="gap")


def test_pseudo_labels_let_the_crf_decide_where_the_cam_is_weak():
    """Inside a box, a weak CAM against u_0 = 0 (A below the threshold) is an uncertain unary (a softmax over the u,
    as the official code makes it), so the pairwise terms give background to box pixels coloured like the
    background outside, and keep the class on the object's own colour."""
    pytest.importorskip("pydensecrf.densecrf")
    H = W = 40
    image = np.full((H, W, 3), 120, np.uint8)
    image[8:32, 8:20] = (220, 40, 40)  # the object: the left part of the box
    boxes = torch.tensor([[8.0, 8.0, 32.0, 32.0]])
    # Features at stride 4: background (1, 0) outside the box; inside it the object (0.2, 1) and, right of it,
    # background-coloured pixels (1, 0.5), whose cosine to the background query (0.89) is below the threshold 0.99.
    f = torch.zeros(2, 10, 10)
    f[0] = 1.0
    f[:, 2:8, 2:5] = torch.tensor([0.2, 1.0])[:, None, None]
    f[:, 2:8, 5:8] = torch.tensor([1.0, 0.5])[:, None, None]
    weight = torch.eye(2)  # w_0 = (1, 0), w_1 = (0, 1): CAM_1 is 1 on the object and 0.5 right of it
    out = boxloss.bana_pseudo_labels(image, f, weight, boxes, torch.tensor([1]))
    assert float(out.attention[2:8, 5:8].max()) < 0.99  # no confident background inside the box
    y = out.y_crf
    assert (y[10:30, 10:18] == 1).float().mean() > 0.95  # the object keeps its class
    assert (y[10:30, 23:32] == 0).float().mean() > 0.95  # the background-coloured part of the box is background
    assert bool((y[:8] == 0).all() and (y[32:] == 0).all())


def test_pseudo_labels_normalise_each_box_by_its_own_maximum():
    """Eq. 5 with the official code's normalisation: a box whose CAM is weak everywhere still gets u_c = 1 at its
    strongest pixel, and a second box of the same class with a stronger CAM does not lower it."""
    H = W = 32
    image = np.full((H, W, 3), 100, np.uint8)
    boxes = torch.tensor([[0.0, 0.0, 12.0, 12.0], [20.0, 20.0, 32.0, 32.0]])
    f = torch.zeros(2, 8, 8)
    f[0] = 1.0
    f[:, :3, :3] = torch.tensor([0.0, 0.1])[:, None, None]  # weak CAM in box 0
    f[:, 5:, 5:] = torch.tensor([0.0, 5.0])[:, None, None]  # strong CAM in box 1
    calls = []

    def inference(unary, image, **kwargs):
        calls.append(unary)
        return torch.softmax(-unary, 1)

    boxloss.bana_pseudo_labels(image, f, torch.eye(2), boxes, torch.tensor([1, 1]), inference=inference)
    probs = torch.softmax(-calls[0][0], 0)  # the probabilities the unaries came from (inside the boxes)
    # u_0 = 0 (A = 0: the box features are orthogonal to the background's) and u_1 = 1 in the middle of each box:
    # softmax(0, 1) in both boxes, whatever the scale of their CAMs.
    expected = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    torch.testing.assert_close(probs[:, 5, 5], expected)
    torch.testing.assert_close(probs[:, 26, 26], expected)
    assert float(probs[0, 0, 20]) > 0.99  # outside the boxes: background
