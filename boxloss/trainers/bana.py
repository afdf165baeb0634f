"""BANA: Oh, Kim & Ham, "Background-Aware Pooling and Noise-Aware Loss for Weakly-Supervised Semantic Segmentation",
CVPR 2021.

The pipeline, as the paper's Sec. 3-4:

1. Sec. 3.1, a classification network trained on boxes: a feature map f, background attention A from N x N grid
   queries of the definite background (Eq. 1-3), each box pooled with the weights 1 - A (background-aware pooling,
   Eq. 4) and an (L + 1)-way softmax classifier on the pooled box features (their box's class) and the queries
   (background). ``gap`` is the same network and loss with every box average-pooled (A = 0), the paper's baseline.
2. Sec. 3.2, pseudo labels of the training images: Y_crf, DenseCRF on the unaries u_c = CAM_c / max CAM_c inside the
   boxes of class c and u_0 = A (Eq. 5-7); Y_ret, the arg-max of the cosine to class prototypes taken from Y_crf
   (Eq. 8-9). Table 1 scores them (mIoU on the training split) beside ``box`` (each box filled, the smaller in
   front), ``grabcut`` (OpenCV's GrabCut per box, the smaller in front), ``gap`` (the GAP network's CAMs with the
   background CAM as u_0: it has no attention) and ``bap-crf-no-u0`` (the BAP network with the background CAM in
   place of A).
3. Sec. 3.3, a segmentation network with the cosine classifier (supplement Eq. 3) trained on Y_crf and Y_ret: the
   cross-entropy on S, where they agree (Eq. 10), plus lambda times a term on ~S, where they differ: nothing
   (``baseline``), entropy regularisation (``entropy``, supplement Eq. 4), bootstrapping (``bootstrap``, supplement
   Eq. 6-7, beta on the poly schedule) or the confidence-weighted cross-entropy (``nal``, Eq. 11-14). Table 3 gives
   the validation mIoU before and after DenseCRF post-processing (``-crf``).

Every DenseCRF of the pipeline (Y_crf and the post-processing) goes through :func:`crf_inference`, the one place the
backend is chosen (``crf_backend``): ``"boxloss"``, the batched mean-field on the boxloss lattice
(``boxloss.dense_crf_inference``), is the default where the installed boxloss has it; otherwise ``"pydensecrf"``,
Krähenbühl's code one image at a time (``boxloss.pydensecrf_inference``).

The classification network's features f are, as in the paper, a pre-trained backbone's output at stride 8 with only
the classifier new (``stage1_features="encoder"``); ``"head"`` takes them from a new head of the whole network at
input resolution instead (slower per step). The quick preset keeps the paper's SGD (momentum 0.9, weight decay
5e-4) for this stage at a learning rate of 1e-2: its encoder starts from the synthetic pre-training, not ImageNet.

Where the paper is silent the defaults come from the official code or DeepLab and say so. At the quick preset's
small images the CRF's spatial sigmas (the paper's, for VOC images of about 500 x 375 pixels) are scaled with the
image size (``crf_reference_size``), as the Box to Tag and Back trainer scales its DenseCRF loss; the colour sigma
is kept.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import boxloss
from boxloss.trainers.engine import checkpoint
from boxloss.trainers.engine.config import ConfigError, TrainerConfig
from boxloss.trainers.engine.context import Context
from boxloss.trainers.engine.data import Batches, Splits, box_label_map, config_splits, hflip_augment
from boxloss.trainers.engine.evaluate import label_miou, miou_percent, segmentation_confusion
from boxloss.trainers.engine.figures import save_loss_curves, save_sample_panels
from boxloss.trainers.engine.loop import poly_schedule
from boxloss.trainers.engine.models import IMAGENET_MEAN, IMAGENET_STD, head_outputs

NAME = "bana"
SUMMARY = "BANA (Oh, Kim & Ham, CVPR 2021): background-aware pooling, pseudo labels Y_crf / Y_ret, noise-aware loss"
TABLE1 = ("box", "grabcut", "gap", "bap-crf-no-u0", "bap-crf", "bap-ret")
TABLE3 = ("baseline", "entropy", "bootstrap", "nal")
#: Table 3 setting -> the ``unreliable`` term of :func:`boxloss.noise_aware_loss`
UNRELIABLE_TERM = {"baseline": "ignore", "entropy": "entropy", "bootstrap": "bootstrap", "nal": "nal"}
SETTINGS = {
    "box": "Table 1: every box filled with its class (the smaller box in front)",
    "grabcut": "Table 1: GrabCut per box (OpenCV), the smaller box in front",
    "gap": "Table 1: Y_crf of a classification network with global average pooling (background CAM as u_0)",
    "bap-crf-no-u0": "Table 1: Y_crf of the BAP network with the background CAM in place of u_0 = A",
    "bap-crf": "Table 1: Y_crf of the BAP network (Eq. 5-7)",
    "bap-ret": "Table 1: Y_ret of the BAP network (Eq. 8-9)",
    "baseline": "Table 3: cross-entropy on S (Y_crf = Y_ret), ~S ignored; also -crf (DenseCRF post-processing)",
    "entropy": "Table 3: plus entropy regularisation on ~S (supplement Eq. 4-5); also -crf",
    "bootstrap": "Table 3: plus bootstrapping on ~S (supplement Eq. 6-8); also -crf",
    "nal": "Table 3: the noise-aware loss, confidence-weighted CE on ~S (Eq. 10-14); also -crf",
}
POOLINGS = ("bap", "gap")
CLASSIFIERS = ("linear", "cosine")
OPTIMIZERS = ("sgd", "adamw")
CRF_BACKENDS = ("boxloss", "pydensecrf")
#: the boxloss mean-field where this installation has it, else pydensecrf (see :func:`crf_inference`)
DEFAULT_CRF_BACKEND = "boxloss" if hasattr(boxloss, "dense_crf_inference") else "pydensecrf"
STAGE1_FEATURES = ("encoder", "head")


@dataclass
class Config(TrainerConfig):
    image_size: int = 321  # Sec. 4.1: 321 x 321 crops
    batch_size: int = 20  # Sec. 4.1 (both stages, DeepLab-V1)
    # Sec. 3.1 and 4.1: the classification network
    #: f: "encoder", the pre-trained encoder's output at ``feature_stride`` (a torchvision model: its backbone's
    #: output), as the paper's VGG-16 features at stride 8 after their ReLU; or "head", a new ``feature_dim``-channel
    #: head of the whole network at input resolution
    stage1_features: str = "encoder"
    feature_stride: int = 8  # Sec. 4.1 (AffinityNet's VGG-16): the classification network's features at stride 8
    feature_dim: int = 64  # channels of f with stage1_features=head
    grid_size: int = 4  # Sec. 4.1: N = 4 for training
    pool_size: int = 2  # official code: each box pooled into 2 x 2 bins (RoIAlign, footnote 2)
    min_background: float = 0.125  # official code: less definite background than this pools plainly
    classifier: str = "linear"  # Sec. 3.1: (L+1)-way softmax classifier; "cosine": supplement Eq. 3's
    classifier_std: float = 0.01  # Sec. 4.1: classifier weights from N(0, 0.01^2)
    stage1_steps: int = 7937  # Sec. 4.1: 15 epochs of 10,582 images at batch 20
    stage1_optimizer: str = "sgd"  # Sec. 4.1: SGD, momentum 0.9, weight decay 5e-4
    stage1_lr: float = 1e-4  # Sec. 4.1: pre-trained layers
    stage1_new_lr: float = 1e-3  # Sec. 4.1: the classifier (here also the layers that start untrained)
    stage1_decay_at: float = 10 / 15  # Sec. 4.1: learning rates divided by 10 after 10 of 15 epochs
    # Sec. 3.2 and 4.1: pseudo labels
    label_grid_size: int = 1  # Sec. 4.1: N = 1 for the attention of u_0
    bg_threshold: float = 0.99  # Sec. 4.1: u_0 = A where A >= 0.99 ("confident background")
    #: not in the paper (it uses pydensecrf): "boxloss" (boxloss.dense_crf_inference) or "pydensecrf"
    crf_backend: str = DEFAULT_CRF_BACKEND
    crf_bilateral: tuple[float, ...] = (4.0, 55.0, 3.0)  # official code: weight, sigma_xy, sigma_rgb
    crf_gaussian: tuple[float, ...] = (3.0, 3.0)  # official code: weight, sigma_xy
    crf_iterations: int = 10  # official code
    crf_reference_size: int = 0  # 0: sigma_xy as given; else scaled by image_size / crf_reference_size
    # Sec. 3.3 and 4.1: the segmentation network (DeepLab-V1's settings)
    seg_feature_dim: int = 64  # channels of phi (a head of the small network)
    #: the small network's phi at stride 2 (its decoder's resolution; 1: upsampled to the input), the loss on the
    #: labels at phi's pixel centres and the prediction upsampled bilinearly, as DeepLab at its output stride 8
    seg_output_stride: int = 2
    tau: float = 20.0  # supplement Sec. 4: scale of the cosine classifier
    gamma: float = 7.0  # Sec. 4.1
    lam: float = 0.1  # Sec. 4.1 (and supplement Sec. 5 for entropy and bootstrapping)
    seg_steps: int = 23810  # Sec. 4.1: DeepLab-V1 for 45 epochs of 10,582 images at batch 20
    seg_optimizer: str = "sgd"  # DeepLab: SGD, momentum 0.9, weight decay 5e-4, poly decay (power 0.9)
    seg_lr: float = 1e-3  # DeepLab-V1
    seg_new_lr: float = 1e-2  # DeepLab-V1: the classifier at 10 times the rate
    figures: int = 6  # images in the figures

    PRESET_OVERRIDES = {
        "paper": {},
        "quick": {
            "image_size": 96,
            "train_images": 400,
            "val_images": 150,
            "batch_size": 16,
            "seg_feature_dim": 32,
            "stage1_steps": 1000,
            "stage1_lr": 1e-2,
            "stage1_new_lr": 1e-2,
            "seg_steps": 600,
            "seg_optimizer": "adamw",
            "seg_lr": 1e-3,
            "seg_new_lr": 1e-3,
            "crf_reference_size": 400,
        },
    }

    def __post_init__(self):
        check_values(self)


def check_values(cfg: Config) -> None:
    """Clear errors for values the pipeline cannot run with (raised when the config is made, so before a run
    directory is created)."""
    choices = {
        "classifier": CLASSIFIERS,
        "stage1_optimizer": OPTIMIZERS,
        "seg_optimizer": OPTIMIZERS,
        "crf_backend": CRF_BACKENDS,
        "stage1_features": STAGE1_FEATURES,
    }
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"bana: {name} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    if cfg.seg_output_stride not in (1, 2):
        raise ConfigError(f"bana: seg_output_stride must be 1 or 2, got {cfg.seg_output_stride}")
    for name in (
        "feature_dim",
        "seg_feature_dim",
        "grid_size",
        "pool_size",
        "label_grid_size",
        "crf_iterations",
        "batch_size",
    ):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"bana: {name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("stage1_steps", "seg_steps", "crf_reference_size"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"bana: {name} must be >= 0, got {getattr(cfg, name)}")
    for name in ("stage1_lr", "stage1_new_lr", "seg_lr", "seg_new_lr", "tau", "gamma", "classifier_std"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"bana: {name} must be > 0, got {getattr(cfg, name)}")
    for name in ("bg_threshold", "min_background", "stage1_decay_at"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ConfigError(f"bana: {name} must lie in [0, 1], got {getattr(cfg, name)}")
    if cfg.lam < 0:
        raise ConfigError(f"bana: lam must be >= 0, got {cfg.lam}")
    stride = cfg.feature_stride
    if stride < 2 or stride & (stride - 1) or stride > 2 ** len(cfg.widths):
        raise ConfigError(
            f"bana: feature_stride must be a power of two from 2 to {2 ** len(cfg.widths)} (the "
            f"encoder's strides), got {stride}"
        )
    if len(cfg.crf_bilateral) != 3 or len(cfg.crf_gaussian) != 2:
        raise ConfigError(
            f"bana: crf_bilateral is (weight, sigma_xy, sigma_rgb) and crf_gaussian (weight, sigma_xy); "
            f"got {cfg.crf_bilateral} and {cfg.crf_gaussian}"
        )
    if min(cfg.crf_bilateral[1:] + cfg.crf_gaussian[1:]) <= 0 or min(cfg.crf_bilateral[0], cfg.crf_gaussian[0]) < 0:
        raise ConfigError(
            f"bana: the CRF sigmas must be > 0 and its weights >= 0, got crf_bilateral="
            f"{cfg.crf_bilateral}, crf_gaussian={cfg.crf_gaussian}"
        )


def check_backend(cfg: Config) -> None:
    """The CRF backend is installed (checked when the pipeline starts)."""
    if cfg.crf_backend == "boxloss" and not hasattr(boxloss, "dense_crf_inference"):
        raise ConfigError(
            "bana: crf_backend=boxloss needs boxloss.dense_crf_inference, which this installation "
            "lacks; use --set crf_backend=pydensecrf"
        )
    if cfg.crf_backend == "pydensecrf":
        try:  # a 1 x 1 inference: pydensecrf is imported and its build checked once per process
            boxloss.pydensecrf_inference(torch.zeros(1, 2, 1, 1), torch.zeros(1, 3, 1, 1), iterations=1)
        except ImportError as exc:
            other = "; or use --set crf_backend=boxloss" if hasattr(boxloss, "dense_crf_inference") else ""
            raise ConfigError(f"bana: crf_backend=pydensecrf: {exc}{other}") from None


# ----------------------------------------------------------------------------------------------------- DenseCRF


def crf_inference(
    unary: torch.Tensor, image: torch.Tensor, *, backend: str, bilateral, gaussian, iterations: int
) -> torch.Tensor:
    """Mean-field DenseCRF (Potts, Krähenbühl & Koltun): ``unary`` (B, C, H, W) negative log-probabilities and
    ``image`` (B, 3, H, W) colours in [0, 255] -> the marginals Q (B, C, H, W) after ``iterations`` steps.
    ``bilateral`` = (weight, sigma_xy, sigma_rgb), ``gaussian`` = (weight, sigma_xy). Every CRF of the pipeline runs
    here; ``backend`` is ``"boxloss"`` (the permutohedral lattice, batched) or ``"pydensecrf"`` (one image at a
    time)."""
    if backend == "boxloss":
        return boxloss.dense_crf_inference(
            unary, image, bilateral=tuple(bilateral), gaussian=tuple(gaussian), iterations=iterations
        )
    return boxloss.pydensecrf_inference(
        unary, image, bilateral=tuple(bilateral), gaussian=tuple(gaussian), iterations=iterations
    )


def crf_settings(cfg: Config) -> dict:
    """The CRF's parameters for this run's images (spatial sigmas scaled when ``crf_reference_size`` is set)."""
    scale = cfg.image_size / cfg.crf_reference_size if cfg.crf_reference_size else 1.0
    w_bi, xy_bi, rgb = cfg.crf_bilateral
    w_g, xy_g = cfg.crf_gaussian
    return {
        "bilateral": (float(w_bi), float(xy_bi) * scale, float(rgb)),
        "gaussian": (float(w_g), float(xy_g) * scale),
        "iterations": int(cfg.crf_iterations),
    }


def _crf(cfg: Config):
    """:func:`crf_inference` with this run's backend and parameters: ``fn(unary, image) -> Q``."""
    return functools.partial(crf_inference, backend=cfg.crf_backend, **crf_settings(cfg))


# ----------------------------------------------------------------------------------------------------- losses


class FeatureClassifier(nn.Module):
    """Features f after a ReLU (the penultimate features of the paper's VGG-16 and DeepLab are ReLU outputs) and a
    classifier of L + 1 rows without bias (CAM_c = ReLU(f . w_c), Eq. 6).

    ``take`` None: f is the ``"features"`` head of ``net`` (at input resolution); an int: f is that stage of
    ``net``, an encoder returning its stages' feature maps; a string: that entry of the dict ``net`` returns (a
    torchvision backbone). A backbone's input is normalised with the ImageNet mean and std first."""

    def __init__(self, net: nn.Module, dim: int, classes: int, std: float, take: int | str | None = None):
        super().__init__()
        self.net = net
        self.take = take
        self.classifier = nn.Parameter(torch.randn(classes, dim) * std)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.take is None:
            return torch.relu(head_outputs(self.net(images))["features"])
        return torch.relu(self.net((images - self.mean) / self.std)[self.take])


def classification_network(ctx: Context, job: str, classes: int) -> FeatureClassifier:
    """Sec. 3.1's feature extractor and classifier (see ``stage1_features``): the small U-Net's encoder up to
    ``feature_stride``, a torchvision model's backbone, or a new head of the whole network."""
    cfg: Config = ctx.config
    net = ctx.new_model(job, {"features": cfg.feature_dim})
    if cfg.stage1_features == "head":
        return FeatureClassifier(net, cfg.feature_dim, classes, cfg.classifier_std).to(ctx.device)
    encoder = getattr(net, "encoder", None)
    if encoder is not None and hasattr(encoder, "widths"):
        stage = int(math.log2(cfg.feature_stride)) - 1
        return FeatureClassifier(encoder, encoder.widths[stage], classes, cfg.classifier_std, stage).to(ctx.device)
    backbone = getattr(getattr(net, "net", None), "backbone", None)
    if backbone is not None:
        with torch.no_grad():
            dim = backbone(torch.zeros(1, 3, 64, 64))["out"].shape[1]
        return FeatureClassifier(backbone, dim, classes, cfg.classifier_std, "out").to(ctx.device)
    raise ConfigError(
        "bana: stage1_features=encoder needs the small U-Net's encoder or a torchvision model's "
        "backbone; with another network use --set stage1_features=head"
    )


def classification_loss(cfg: Config, pooled, box_labels, queries, valid, weight) -> torch.Tensor:
    """Sec. 3.1's cross-entropy over the pooled box features (their class) and the valid queries (background), with
    the linear classifier or the cosine one (tau cos(x, w_c))."""
    if cfg.classifier == "cosine":
        pooled = F.normalize(pooled, dim=1, eps=1e-8)
        queries = F.normalize(queries, dim=2, eps=1e-8)
        weight = cfg.tau * F.normalize(weight, dim=1, eps=1e-8)
    return boxloss.bap_classification_loss(pooled, box_labels, queries, valid, weight)


def _optimizer(model: nn.Module, kind: str, lr: float, new_lr: float):
    """Pre-trained layers (an ``encoder``/``backbone``) at ``lr``, the others at ``new_lr``; SGD with DeepLab's
    momentum 0.9 and weight decay 5e-4, or AdamW."""
    old, new = [], []
    for name, p in model.named_parameters():
        (old if ".encoder." in name or ".backbone." in name else new).append(p)
    groups = [g for g in ({"params": old, "lr": lr}, {"params": new, "lr": new_lr}) if g["params"]]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=5e-4)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=1e-4)


# ----------------------------------------------------------------------------------------------------- stage 1


def train_classifier(ctx: Context, pooling: str, train, L: int) -> FeatureClassifier:
    """Sec. 3.1: the classification network with background-aware pooling (``bap``) or average pooling (``gap``)."""
    cfg: Config = ctx.config
    job = f"stage1/{pooling}"
    model = classification_network(ctx, job, L + 1)

    def step(m, batch, clock):
        images = batch.images.to(ctx.device)
        boxes, box_batch = batch.boxes.to(ctx.device), batch.box_batch.to(ctx.device)
        with clock.model_forward():
            f = m(images)
        clock.watch(f)
        scale = f.shape[-1] / images.shape[-1]
        with clock.loss_forward():
            if pooling == "bap":
                bap = boxloss.BackgroundAwarePooling(
                    grid_size=cfg.grid_size,
                    output_size=cfg.pool_size,
                    spatial_scale=scale,
                    min_background=cfg.min_background,
                )
                pooled, att = bap(f, boxes, box_batch)
            else:  # the same queries for the background samples; every box averaged (A = 0)
                att = boxloss.background_attention(
                    f, boxes, box_batch, grid_size=cfg.grid_size, spatial_scale=scale, min_background=cfg.min_background
                )
                pooled = boxloss.background_aware_pool(
                    f, torch.zeros_like(att.attention), boxes, box_batch, output_size=cfg.pool_size, spatial_scale=scale
                )
            loss = classification_loss(
                cfg, pooled, batch.box_labels.to(ctx.device), att.queries, att.valid, model.classifier
            )
        return loss, {"fallback": att.fallback.float().mean()}

    steps = cfg.stage1_steps
    opt = _optimizer(model, cfg.stage1_optimizer, cfg.stage1_lr, cfg.stage1_new_lr)
    decay = round(cfg.stage1_decay_at * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < decay else 0.1)
    batches = Batches(train, cfg.batch_size, cfg.seed, augment=hflip_augment)
    ctx.fit(job, model, step, batches, steps=steps, optimizer=opt, scheduler=sched)
    return model.eval()


@torch.no_grad()
def features_of(model: FeatureClassifier, samples, device, batch_size: int = 16):
    """f of each sample, (D, H, W) on the CPU, in eval mode."""
    model.eval()
    out = []
    for i in range(0, len(samples), batch_size):
        batch = boxloss.data.collate_samples([samples[j] for j in range(i, min(i + batch_size, len(samples)))])
        f = model(batch.images.to(device)).float().cpu()
        scale = f.shape[-1] / batch.images.shape[-1]
        for k, j in enumerate(range(i, min(i + batch_size, len(samples)))):
            s = samples[j]
            out.append(f[k, :, : math.ceil(s.height * scale), : math.ceil(s.width * scale)])
    return out


def pseudo_labels(ctx: Context, model: FeatureClassifier, samples, background: str) -> dict:
    """Sec. 3.2 on every sample: ``y_crf``, ``y_ret`` (uint8 (H, W) each) and ``attention`` (A at grid
    ``label_grid_size``); ``background`` is ``"attention"`` (u_0 = A, Eq. 7) or ``"cam"``."""
    cfg: Config = ctx.config
    crf = crf_settings(cfg)
    settings = {
        "iterations": crf["iterations"],
        "bilateral_weight": crf["bilateral"][0],
        "bilateral_xy": crf["bilateral"][1],
        "bilateral_rgb": crf["bilateral"][2],
        "gaussian_weight": crf["gaussian"][0],
        "gaussian_xy": crf["gaussian"][1],
    }
    inference = functools.partial(crf_inference, backend=cfg.crf_backend)
    weight = model.classifier.detach().cpu()
    out = {"y_crf": [], "y_ret": [], "attention": [], "fallback": 0}
    for s, f in zip(samples, features_of(model, samples, ctx.device)):
        if s.num_boxes == 0:
            zero = torch.zeros(s.height, s.width, dtype=torch.uint8)
            out["y_crf"].append(zero)
            out["y_ret"].append(zero)
            out["attention"].append(torch.ones(f.shape[1:]))
            continue
        p = boxloss.bana_pseudo_labels(
            s.image,
            f,
            weight,
            torch.as_tensor(s.boxes),
            torch.as_tensor(s.labels),
            crf=settings,
            bg_threshold=cfg.bg_threshold,
            grid_size=cfg.label_grid_size,
            min_background=cfg.min_background,
            background=background,
            inference=inference,
        )
        out["y_crf"].append(p.y_crf.to(torch.uint8))
        out["y_ret"].append(p.y_ret.to(torch.uint8))
        out["attention"].append(p.attention.float())
        out["fallback"] += int(p.fallback)
    return out


def cam_precision(model: FeatureClassifier, samples, L: int, device) -> float:
    """The precision of the normalised CAMs u_c (Eq. 5) in percent, as the supplement's Table 2 compares GAP and BAP:
    per class, the mass of u_c on pixels of class c over its mass in the boxes of class c (void left out), averaged
    over the classes present."""
    hit, mass = torch.zeros(L + 1, dtype=torch.float64), torch.zeros(L + 1, dtype=torch.float64)
    for s, f in zip(samples, features_of(model, samples, device)):
        if s.num_boxes == 0:
            continue
        cams = torch.relu(torch.einsum("dhw,cd->chw", f, model.classifier.detach().cpu()))
        u = _upsampled(cams / cams.flatten(1).amax(1).clamp_min(1e-12)[:, None, None], s).clamp_min(0)
        inside = boxloss.boxes_to_masks(
            torch.from_numpy(s.boxes),
            torch.zeros(s.num_boxes, dtype=torch.long),
            torch.from_numpy(s.labels),
            (1, s.height, s.width),
            L,
            form="union",
        )[0]
        mask = torch.from_numpy(s.mask.astype(np.int64))
        labelled = mask != 255
        for c in set(s.labels.tolist()):
            region = inside[c] & labelled
            mass[c] += float(u[c][region].double().sum())
            hit[c] += float(u[c][region & (mask == c)].double().sum())
    present = mass > 0
    return 100 * float((hit[present] / mass[present]).mean()) if bool(present.any()) else float("nan")


def box_labels(samples, L: int) -> list[torch.Tensor]:
    """Table 1 ``box``: every box filled with its class, the smaller box in front."""
    return [torch.from_numpy(box_label_map(s, L)) for s in samples]


def grabcut_labels(ctx: Context, samples, L: int) -> list[torch.Tensor]:
    """Table 1 ``grabcut``: OpenCV's GrabCut in each box, merged with the smaller box in front."""
    out, notes = [], []
    for s in samples:
        if s.num_boxes == 0:
            out.append(torch.zeros(s.height, s.width, dtype=torch.uint8))
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            masks = boxloss.grabcut_box_masks(s.image, s.boxes)
        notes += [str(w.message) for w in caught]
        out.append(
            boxloss.merge_box_masks(
                torch.from_numpy(masks),
                torch.from_numpy(s.boxes),
                torch.zeros(s.num_boxes, dtype=torch.long),
                torch.from_numpy(s.labels),
                (1, s.height, s.width),
                strategy="overlap-small",
                num_classes=L,
            )[0].to(torch.uint8)
        )
    if notes:
        ctx.log(f"grabcut: {len(notes)} of {len(samples)} images had boxes filled instead (e.g. {notes[0]})")
    return out


# ----------------------------------------------------------------------------------------------------- stage 2


def _flip_labelled(item, rng):
    image, y_crf, y_ret = item
    if rng.random() < 0.5:
        return np.ascontiguousarray(image[:, ::-1]), y_crf.flip(-1), y_ret.flip(-1)
    return item


def _collate_labelled(items):
    """Images (B, 3, H, W) in [0, 1] and both label maps (B, H, W) int64, padded bottom/right (labels with 255)."""
    H = max(i[0].shape[0] for i in items)
    W = max(i[0].shape[1] for i in items)
    images = torch.zeros(len(items), 3, H, W)
    y_crf = torch.full((len(items), H, W), 255, dtype=torch.long)
    y_ret = torch.full((len(items), H, W), 255, dtype=torch.long)
    for k, (image, a, b) in enumerate(items):
        h, w = image.shape[:2]
        images[k, :, :h, :w] = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255
        y_crf[k, :h, :w] = a.long()
        y_ret[k, :h, :w] = b.long()
    return images, y_crf, y_ret


def train_segmentation(ctx: Context, setting: str, train, labels: dict, L: int, figure_items=None):
    """Sec. 3.3: the segmentation network on Y_crf and Y_ret with the loss of ``setting`` (Table 3)."""
    cfg: Config = ctx.config
    job = f"stage2/{setting}"
    net = ctx.new_model(job, {"features": cfg.seg_feature_dim})
    if hasattr(net, "output_stride"):
        net.output_stride = cfg.seg_output_stride
    model = FeatureClassifier(net, cfg.seg_feature_dim, L + 1, cfg.classifier_std).to(ctx.device)
    items = [(s.image, a, b) for s, a, b in zip(train, labels["y_crf"], labels["y_ret"])]
    batches = Batches(items, cfg.batch_size, cfg.seed, collate=_collate_labelled, augment=_flip_labelled)
    steps = cfg.seg_steps
    snapshots = ConfidenceSnapshots(ctx, job, model, figure_items, steps) if figure_items else None

    def step(m, batch, clock):
        images, y_crf, y_ret = (t.to(ctx.device) for t in batch)
        if snapshots is not None:
            snapshots.maybe_take(clock.steps)
        beta = boxloss.bootstrap_beta(clock.steps, steps) if setting == "bootstrap" else 1.0
        with clock.model_forward():
            phi = m(images)
        clock.watch(phi)
        y_crf, y_ret = at_resolution(y_crf, phi), at_resolution(y_ret, phi)
        with clock.loss_forward():
            loss, terms = boxloss.noise_aware_loss(
                phi,
                model.classifier,
                y_crf,
                y_ret,
                gamma=cfg.gamma,
                lam=cfg.lam,
                tau=cfg.tau,
                unreliable=UNRELIABLE_TERM[setting],
                beta=beta,
                return_terms=True,
            )
        return loss, {"ce": terms["ce"], "unreliable": terms["unreliable"]}

    opt = _optimizer(model, cfg.seg_optimizer, cfg.seg_lr, cfg.seg_new_lr)
    ctx.fit(job, model, step, batches, steps=steps, optimizer=opt, scheduler=poly_schedule(opt, steps))
    if snapshots is not None:
        snapshots.maybe_take(steps)
    return model.eval(), snapshots


def at_resolution(labels: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """(B, H, W) labels at the (h, w) of ``phi``: the label at each of its pixels' centres."""
    H, W = labels.shape[-2:]
    h, w = phi.shape[-2:]
    if (h, w) == (H, W):
        return labels
    rows = ((torch.arange(h, device=labels.device) + 0.5) * H / h).long().clamp(max=H - 1)
    cols = ((torch.arange(w, device=labels.device) + 0.5) * W / w).long().clamp(max=W - 1)
    return labels[:, rows][:, :, cols]


class ConfidenceSnapshots:
    """The confidence map (Eq. 12) of a few training images at 0, 1/4, 1/2, 3/4 and all of training (the paper's
    Fig. 5), kept in the run's cache so that a resumed run still draws the earlier ones."""

    def __init__(self, ctx: Context, job: str, model, items, steps: int):
        self.ctx, self.model, self.items = ctx, model, items
        self.at = sorted({round(steps * k / 4) for k in range(5)})
        self.path = ctx.run.path / "cache" / (job.replace("/", "__") + "-confidence.pt")
        self.maps = checkpoint.load(self.path) if self.path.is_file() else {}

    @torch.no_grad()
    def maybe_take(self, step: int) -> None:
        if step not in self.at or step in self.maps or not self.ctx.run.main:
            return
        cfg: Config = self.ctx.config
        images, y_crf, y_ret = (t.to(self.ctx.device) for t in _collate_labelled(self.items))
        was = self.model.training
        self.model.eval()
        phi = self.model(images)
        _, terms = boxloss.noise_aware_loss(
            phi,
            self.model.classifier,
            at_resolution(y_crf, phi),
            at_resolution(y_ret, phi),
            gamma=cfg.gamma,
            lam=cfg.lam,
            tau=cfg.tau,
            return_terms=True,
        )
        self.model.train(was)
        self.maps[step] = terms["confidence"].float().cpu()
        checkpoint.atomic_save(self.maps, self.path)


def predict_labels(model: FeatureClassifier, images: torch.Tensor, cfg: Config, *, crf: bool) -> torch.Tensor:
    """(B, H, W) labels: the arg-max of the cosine classifier, or of the DenseCRF marginals on its softmax."""
    was = model.training
    model.eval()
    with torch.no_grad():
        phi = model(images.to(model.classifier.device))
        logits = boxloss.cosine_logits(phi, model.classifier, cfg.tau).float().cpu()
    if logits.shape[-2:] != images.shape[-2:]:
        logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
    model.train(was)
    if not crf:
        return logits.argmax(1)
    unary = -logits.log_softmax(1).clamp_min(math.log(1e-5))  # probabilities clipped at 1e-5, as pydensecrf's
    q = _crf(cfg)(unary, images.detach().cpu() * 255)
    return q.argmax(1)


# ----------------------------------------------------------------------------------------------------- pipeline


def run(ctx: Context, settings: list[str]) -> None:
    cfg: Config = ctx.config
    check_backend(cfg)
    splits: Splits = config_splits(cfg, log=ctx.log)
    ctx.log(f"data: {splits.description}; DenseCRF: {cfg.crf_backend}, {crf_settings(cfg)}")
    ctx.results.notes.append(f"DenseCRF ({cfg.crf_backend}): {crf_settings(cfg)}")
    L = splits.num_classes
    train = splits.train
    truth = [torch.from_numpy(s.mask) for s in train]
    want3 = [s for s in TABLE3 if s in settings]

    # Table 1 baselines that need no training
    labels: dict[str, list] = {}
    if "box" in settings:
        labels["box"] = box_labels(train, L)
    if "grabcut" in settings:
        labels["grabcut"] = ctx.run.cached("grabcut", lambda: grabcut_labels(ctx, train, L))

    # Sec. 3.1: classification networks; Sec. 3.2: their pseudo labels
    networks, pseudo = {}, {}
    if "gap" in settings:
        networks["gap"] = train_classifier(ctx, "gap", train, L)
        pseudo["gap"] = ctx.run.cached("pseudo/gap", lambda: pseudo_labels(ctx, networks["gap"], train, "cam"))
        labels["gap"] = pseudo["gap"]["y_crf"]
    if any(s in settings for s in ("bap-crf-no-u0", "bap-crf", "bap-ret")) or want3:
        networks["bap"] = train_classifier(ctx, "bap", train, L)
        pseudo["bap"] = ctx.run.cached("pseudo/bap", lambda: pseudo_labels(ctx, networks["bap"], train, "attention"))
        labels["bap-crf"], labels["bap-ret"] = pseudo["bap"]["y_crf"], pseudo["bap"]["y_ret"]
        if "bap-crf-no-u0" in settings:
            pseudo["bap-no-u0"] = ctx.run.cached(
                "pseudo/bap-no-u0", lambda: pseudo_labels(ctx, networks["bap"], train, "cam")
            )
            labels["bap-crf-no-u0"] = pseudo["bap-no-u0"]["y_crf"]
        fallback = pseudo["bap"]["fallback"]
        if fallback:
            ctx.log(
                f"pseudo labels: {fallback} of {len(train)} images had too little background for the attention "
                "(A = 0 inside their boxes)"
            )
    for setting in TABLE1:
        if setting in settings:
            miou = label_miou(labels[setting], truth, L)
            ctx.results.add("1", setting, "miou", miou)
            ctx.log(f"Table 1 {setting}: mIoU {miou:.2f} (training split)")
    if "bap" in pseudo:
        agree = torch.cat([(a == b).flatten() for a, b in zip(pseudo["bap"]["y_crf"], pseudo["bap"]["y_ret"])])
        note = f"Y_crf and Y_ret agree on {100 * agree.float().mean():.1f}% of the training pixels (S)"
        ctx.log(note)
        ctx.results.notes.append(note)
    for name, net in networks.items():
        precision = cam_precision(net, train, L, ctx.device)
        note = f"CAM precision of the {name.upper()} network (supplement Table 2): {precision:.1f}%"
        ctx.log(note)
        ctx.results.notes.append(note)
    _attention_figure(ctx, train, networks, pseudo, L)
    _pseudo_figure(ctx, train, labels, pseudo, L)

    # Sec. 3.3: segmentation networks on Y_crf and Y_ret (Table 3)
    n_fig = min(cfg.figures, len(train))
    figure_items = (
        [(train[i].image, pseudo["bap"]["y_crf"][i], pseudo["bap"]["y_ret"][i]) for i in range(n_fig)]
        if want3
        else None
    )
    segmenters = {}
    for setting in want3:
        model, snapshots = train_segmentation(
            ctx, setting, train, pseudo["bap"], L, figure_items if setting == "nal" else None
        )
        segmenters[setting] = model
        for crf in (False, True):
            cm = segmentation_confusion(
                model, splits.val, L, device=ctx.device, predict=functools.partial(predict_labels, cfg=cfg, crf=crf)
            )
            name = setting + ("-crf" if crf else "")
            ctx.results.add("3", name, "miou", miou_percent(cm))
            ctx.log(f"Table 3 {name}: validation mIoU {miou_percent(cm):.2f}")
        if snapshots is not None:
            _confidence_figure(ctx, train, figure_items, snapshots, L)
    _prediction_figure(ctx, splits, segmenters, L)
    if ctx.run.main and (ctx.run.path / "metrics.jsonl").is_file():
        save_loss_curves(ctx.run.file("figures", "loss_curves.png"), ctx.run.path / "metrics.jsonl")


# ----------------------------------------------------------------------------------------------------- figures


def _upsampled(maps: torch.Tensor, sample) -> torch.Tensor:
    """(C, h, w) maps at the feature resolution, bilinearly at the image's (the paper's footnote 3)."""
    return F.interpolate(maps[None].float(), size=(sample.height, sample.width), mode="bilinear", align_corners=False)[
        0
    ]


def _cam_map(model: FeatureClassifier, f: torch.Tensor, sample) -> np.ndarray:
    """max_c u_c (Eq. 5): each class's CAM over its maximum, upsampled, inside that class's boxes."""
    cams = torch.relu(torch.einsum("dhw,cd->chw", f, model.classifier.detach().cpu()))
    u = _upsampled(cams / cams.flatten(1).amax(1).clamp_min(1e-12)[:, None, None], sample)
    inside = boxloss.boxes_to_masks(
        torch.from_numpy(sample.boxes),
        torch.zeros(sample.num_boxes, dtype=torch.long),
        torch.from_numpy(sample.labels),
        (1, sample.height, sample.width),
        u.shape[0] - 1,
        form="union",
    )[0]
    inside[0] = False
    return (u * inside).amax(0).clamp(0, 1).numpy()


def _attention_figure(ctx: Context, train, networks: dict, pseudo: dict, L: int) -> None:
    """The paper's Fig. 4: CAMs (and background attention) of the GAP and the BAP networks."""
    if not ctx.run.main or not networks:
        return
    cfg: Config = ctx.config
    n = min(cfg.figures, len(train))
    samples = [train[i] for i in range(n)]
    columns = {}
    for name in ("gap", "bap"):
        if name not in networks:
            continue
        feats = features_of(networks[name], samples, ctx.device)
        columns[f"{name.upper()}: attention A"] = [
            _upsampled(pseudo[name]["attention"][i][None], s)[0].numpy() for i, s in enumerate(samples)
        ]
        columns[f"{name.upper()}: CAM u_c"] = [_cam_map(networks[name], f, s) for s, f in zip(samples, feats)]
    save_sample_panels(
        ctx.run.file("figures", "attention_and_cams.png"),
        samples,
        columns,
        num_classes=L,
        title=f"Fig. 4: background attention A (grid {cfg.label_grid_size}) and CAMs, GAP against BAP "
        "(training images)",
    )


def _with_unreliable(y_crf: torch.Tensor, y_ret: torch.Tensor) -> np.ndarray:
    return torch.where(y_crf == y_ret, y_crf, torch.full_like(y_crf, 255)).numpy()


def _pseudo_figure(ctx: Context, train, labels: dict, pseudo: dict, L: int) -> None:
    if not ctx.run.main or not labels:
        return
    n = min(ctx.config.figures, len(train))
    columns = {k: [labels[k][i].numpy() for i in range(n)] for k in TABLE1 if k in labels}
    if "bap" in pseudo:
        columns["unreliable (white)"] = [
            _with_unreliable(pseudo["bap"]["y_crf"][i], pseudo["bap"]["y_ret"][i]) for i in range(n)
        ]
    save_sample_panels(
        ctx.run.file("figures", "pseudo_labels.png"),
        [train[i] for i in range(n)],
        columns,
        num_classes=L,
        title="Table 1: pseudo labels of training images; Y_crf with ~S (Y_crf != Y_ret) in white",
    )


def _confidence_figure(ctx: Context, train, items, snapshots: ConfidenceSnapshots, L: int) -> None:
    if not ctx.run.main:
        return
    n = len(items)
    columns = {"Y_crf, ~S white": [_with_unreliable(a, b) for _, a, b in items]}
    steps = max(snapshots.at) or 1
    for step in sorted(snapshots.maps):
        maps = snapshots.maps[step][:, None]
        maps = F.interpolate(
            maps, size=(max(a.shape[0] for _, a, _ in items), max(a.shape[1] for _, a, _ in items)), mode="nearest"
        )[:, 0]
        columns[f"sigma at {100 * step // steps}%"] = [
            maps[i, : a.shape[0], : a.shape[1]].numpy() for i, (_, a, _) in enumerate(items)
        ]
    save_sample_panels(
        ctx.run.file("figures", "confidence.png"),
        [train[i] for i in range(n)],
        columns,
        num_classes=L,
        title="Fig. 5: the confidence map sigma (Eq. 12) during training with the NAL",
    )


def _prediction_figure(ctx: Context, splits: Splits, segmenters: dict, L: int) -> None:
    if not ctx.run.main or not segmenters:
        return
    cfg: Config = ctx.config
    n = min(cfg.figures, len(splits.val))
    val = [splits.val[i] for i in range(n)]
    images = boxloss.data.collate_samples(val).images.to(ctx.device)
    columns = {}
    for name, model in segmenters.items():
        columns[name] = list(predict_labels(model, images, cfg, crf=False).numpy())
    last = list(segmenters)[-1]
    columns[f"{last}-crf"] = list(predict_labels(segmenters[last], images, cfg, crf=True).numpy())
    save_sample_panels(
        ctx.run.file("figures", "predictions.png"),
        val,
        columns,
        num_classes=L,
        title="Table 3: segmentation networks on validation images",
    )
