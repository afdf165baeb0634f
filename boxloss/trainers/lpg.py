"""LPG: Xie, Ren, Wang & Zuo, "Learning Class-Agnostic Pseudo Mask Generation for Box-Supervised Semantic
Segmentation" (IEEE Transactions on Multimedia).

The pipeline, as the paper's Sec. III-IV:

1. Two class-disjoint datasets: an auxiliary set with pixel masks and a target set with boxes only. On the synthetic
   benchmark the target is, by default, the L-class benchmark every trainer uses (classes 1..L, ``num_classes``,
   ``image_size``, ``train_images``, ``val_images`` and ``data_seed`` as theirs) and the auxiliary set is
   ``aux_images`` images of every other synthetic class (L + 1..20: 14 classes against 6, as the paper's 60 COCO
   classes against VOC's 20), drawn with their own seed ``aux_data_seed``. ``target_classes`` and ``aux_classes``
   choose other class channels (e.g. the target 4..6 and the auxiliary set 1..3). With
   ``aux="coco:ANNOTATIONS:IMAGES"`` and ``data="voc:PATH"`` the auxiliary classes are COCO's minus those whose
   names the target has (the paper's COCO-60 / VOC split). Each set is relabelled to class channels 1..L of its
   own, in the order of its source's channels; objects of dropped classes become background in the masks.
2. The generator g (Sec. III-B, "Network Architectures"): class-agnostic, one box at a time. For every box, a window
   around it (``crop_context`` of its size on each side) is sampled to ``crop_size`` squares from three maps: the
   image, the class's box map (the union of the boxes of the box's class, Sec. III's y^b) and f's softmax
   probability of that class. All boxes of a batch of images are cropped by one ``grid_sample`` call; g (a small
   hourglass, or a ResNet-18-like network) outputs two channels, background and object.
3. Bi-level EM on the auxiliary set (Eq. 3-6, Fig. 1): the pseudo masks start as the boxes. Stage s runs the M-step
   (train f on the current pseudo masks, Eq. 4) and the E-step (train g_s on f's current predictions with the
   auxiliary masks as the target, Eq. 6), then regenerates the pseudo masks with g_s. Each stage's generator is
   saved in ``generators/lpg-stage-<s>.pt``; the last one is the "fixed" generator of the ablation.
4. Deployment on the target set (Fig. 2, Sec. III-C, III-D): f trained on the boxes (row ``box``); then at stage s
   the generator g_s turns f's predictions into per-box masks (psi = argmax of g's two channels), merged into
   multi-class pseudo labels by the overlapping rate (Eq. 7, :func:`boxloss.merge_box_masks` ``"overlap-rate"``),
   and f is trained further on them (rows ``stage-s``). The ablation uses the final generator at every stage
   (``fixed-stage-s``). Table III scores the pseudo masks on the target's training split against DenseCRF pseudo
   labels from the boxes.

Where the paper is silent the choices say so in the config. The main ones: the paper's g sees the whole image per
class, here a window per box (so every box is one sample of a batched network call); f continues from the previous
stage's weights with its schedule restarted (Sec. III-C: f is "further trained"); g_s starts from g_{s-1}.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import boxloss
from boxloss.data import Sample, collate_samples
from boxloss.trainers.engine import checkpoint
from boxloss.trainers.engine.config import ConfigError, TrainerConfig
from boxloss.trainers.engine.context import Context
from boxloss.trainers.engine.data import Batches, InMemory, Splits, box_label_map, hflip_augment, load_splits
from boxloss.trainers.engine.evaluate import label_miou, miou_percent, segmentation_confusion
from boxloss.trainers.engine.figures import save_loss_curves, save_panels, save_sample_panels
from boxloss.trainers.engine.loop import poly_schedule
from boxloss.trainers.engine.models import IMAGENET_MEAN, IMAGENET_STD, head_outputs

NAME = "lpg"
SUMMARY = "LPG (Xie et al.): a class-agnostic pseudo-mask generator learned by bi-level EM on an auxiliary set"
PAPER_STAGES = 3
SETTINGS = {
    "box": "Table II: f trained on the boxes only",
    **{f"stage-{s}": f"Table II: f after stage {s}, pseudo masks from the stage-wise generators" for s in (1, 2, 3)},
    **{
        f"fixed-stage-{s}": f"Table II: f after stage {s}, pseudo masks from the final generator at every stage"
        for s in (1, 2, 3)
    },
    **{f"lpg-stage-{s}": f"Table III: the stage-{s} pseudo masks on the target's training split" for s in (1, 2, 3)},
    "densecrf": "Table III: DenseCRF pseudo masks from the boxes",
}
GENERATORS = ("hourglass", "resnet18")


@dataclass
class Config(TrainerConfig):
    # Sec. IV-A: the two datasets
    #: the auxiliary set with pixel masks: "synthetic", "coco:ANNOTATIONS:IMAGES" or "voc:PATH"
    aux: str = "synthetic"
    #: auxiliary class channels (default: synthetic, every synthetic class the target lacks; real data, every class
    #: whose name the target lacks)
    aux_classes: tuple[int, ...] = ()
    #: target class channels (default: all, 1..num_classes on the synthetic benchmark)
    target_classes: tuple[int, ...] = ()
    aux_images: int = 2000  # synthetic auxiliary training images (real data: the whole training split)
    aux_data_seed: int = 1  # seed of the synthetic auxiliary images (the target's is data_seed)
    # Sec. IV-B: three stages (Table II)
    stages: int = PAPER_STAGES
    # Table I (DeepLab-LargeFOV): f, SGD with DeepLab's settings and poly decay, each stage
    batch_size: int = 30  # Table I
    seg_steps: int = 20000  # Table I, Max_iter per stage
    seg_lr: float = 1e-3  # Table I, head_params; biases 2x, last layer 10x (head_bias, last_params, last_bias)
    seg_optimizer: str = "sgd"  # Sec. IV-A: SGD, momentum 0.9, weight decay 5e-4 (DeepLab's settings)
    seg_continue: bool = True  # Sec. III-C: f is "further trained" stage by stage, its schedule restarted
    # Sec. III-B: the generator (HgNet, Table II's best)
    generator: str = "hourglass"  # Table II: hourglass (HgNet) or resnet18
    # not in the paper: width 152, Newell et al.'s four poolings and two stacks give Table II's 12.1M parameters
    # (generator=resnet18 at width 64 has ResNet-18's widths and 11.3M parameters, Table II: 11.1M)
    generator_width: int = 152
    generator_depth: int = 4
    generator_stacks: int = 2
    generator_stride: int = 2  # not in the paper: the stem works at half the crop resolution
    crop_size: int = 128  # not in the paper (its g sees whole images per class)
    crop_context: float = 0.25  # not in the paper: window = box grown by this share of its size on each side
    # Table I (LPG): Adam, betas (0.9, 0.999), poly decay, each stage
    generator_batch: int = 32  # Table I (here: images per step; every box of them is a crop)
    generator_steps: int = 100000  # Table I, Max_iter per stage
    generator_lr: float = 1e-4  # Table I
    generator_warm_start: bool = True  # not in the paper: g_s starts from g_{s-1}
    #: a folder of generators saved by an earlier run (``<run>/generators``): deploy them, skip the auxiliary EM
    generators: str = ""
    # Table III's DenseCRF baseline (Krähenbühl & Koltun, "Efficient Inference in Fully Connected CRFs with Gaussian
    # Edge Potentials", NeurIPS 2011). Not in the paper: the settings are boxloss.dense_crf_box_masks's defaults
    # (pydensecrf's example pairwise settings and its box unaries)
    crf_bilateral_sxy: float = 80.0  # at 513-pixel images (VOC's crop size); scaled with the image size
    crf_bilateral_srgb: float = 13.0
    crf_bilateral_weight: float = 10.0  # pydensecrf's compat
    crf_gaussian_sxy: float = 3.0  # in pixels at every image size
    crf_gaussian_weight: float = 3.0
    crf_iterations: int = 10
    crf_box_confidence: float = 0.6  # inside boxes: the boxes' classes share this probability
    crf_outside_confidence: float = 0.9  # outside every box: the background's probability
    figures: int = 6  # training images in the figures
    #: not in the paper: also train f further on the boxes alone, stage by stage, so that each stage-s row has a
    #: control of equal training length (its mIoU goes to the run's notes)
    box_chain: bool = False

    PRESET_OVERRIDES = {
        "paper": {"image_size": 321},
        "quick": {
            "image_size": 64,
            "train_images": 300,
            "val_images": 150,
            "aux_images": 300,
            "batch_size": 16,
            "seg_steps": 250,
            "seg_lr": 1e-3,
            "seg_optimizer": "adamw",
            "generator_width": 32,
            "generator_depth": 3,
            "generator_stacks": 1,
            "crop_size": 48,
            "generator_batch": 12,
            "generator_steps": 300,
            "generator_lr": 1e-3,
        },
    }


def check_config(cfg: Config) -> None:
    """Raises :class:`ConfigError` naming the setting for values the pipeline cannot use."""
    if cfg.stages < 1:
        raise ConfigError(f"stages must be >= 1, got {cfg.stages}")
    if cfg.generator not in GENERATORS:
        raise ConfigError(f"generator must be one of {', '.join(GENERATORS)}, got {cfg.generator!r}")
    if cfg.seg_optimizer not in ("sgd", "adamw"):
        raise ConfigError(f"seg_optimizer must be sgd or adamw, got {cfg.seg_optimizer!r}")
    for name in ("crop_size", "generator_width", "generator_batch", "batch_size", "generator_stride"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.generator_depth < 0 or cfg.generator_stacks < 1:
        raise ConfigError(
            f"generator_depth must be >= 0 and generator_stacks >= 1, got {cfg.generator_depth} and "
            f"{cfg.generator_stacks}"
        )
    if cfg.crop_size % (cfg.generator_stride * 2**cfg.generator_depth):
        raise ConfigError(
            f"crop_size ({cfg.crop_size}) must be a multiple of generator_stride * 2 ** "
            f"generator_depth ({cfg.generator_stride * 2**cfg.generator_depth})"
        )
    if not 0 <= cfg.crop_context <= 4:
        raise ConfigError(f"crop_context must be in [0, 4], got {cfg.crop_context}")
    for name in ("crf_box_confidence", "crf_outside_confidence"):
        if not 0 < getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be a probability in (0, 1), got {getattr(cfg, name)}")
    for name in (
        "crf_bilateral_sxy",
        "crf_bilateral_srgb",
        "crf_bilateral_weight",
        "crf_gaussian_sxy",
        "crf_gaussian_weight",
    ):
        if not 0 < getattr(cfg, name) < float("inf"):
            raise ConfigError(f"{name} must be a positive finite number, got {getattr(cfg, name)}")
    if cfg.crf_iterations < 1:
        raise ConfigError(f"crf_iterations must be >= 1, got {cfg.crf_iterations}")
    if cfg.seg_steps < 0 or cfg.generator_steps < 0:
        raise ConfigError(f"seg_steps and generator_steps must be >= 0, got {cfg.seg_steps}, {cfg.generator_steps}")


# ----------------------------------------------------------------------------------------------------------------
# Sec. IV-A: two class-disjoint datasets

#: COCO names of the VOC classes that VOC spells differently (compared after lower-casing and dropping spaces)
NAME_SYNONYMS = {"airplane": "aeroplane", "motorcycle": "motorbike", "couch": "sofa", "tv": "tvmonitor"}


def canonical_class_name(name: str) -> str:
    """A class name for comparing datasets: lower case, no spaces, dashes or underscores, COCO's spellings of the
    VOC classes mapped to VOC's ("dining table" and "diningtable" are the same class)."""
    n = name.strip().lower()
    n = NAME_SYNONYMS.get(n, n)
    return "".join(c for c in n if c not in " _-")


class ClassSubset(Sequence):
    """The samples of ``source`` keeping only the boxes of ``classes`` (channels of the source), relabelled to
    1..len(classes) in that order; pixels of the other classes become background (0), void stays void."""

    def __init__(self, source: Sequence[Sample], classes: Sequence[int], class_names: Sequence[str]):
        self.source, self.classes = source, tuple(int(c) for c in classes)
        self.class_names = tuple(class_names)
        self.lut = np.zeros(256, np.uint8)
        self.lut[255] = 255
        for i, c in enumerate(self.classes):
            self.lut[c] = i + 1

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Sample:
        s = self.source[i]
        keep = np.isin(s.labels, self.classes)
        instances = s.instances
        if instances is not None and not keep.all():
            renumber = np.zeros(len(keep) + 1, np.int32)
            renumber[1 + np.flatnonzero(keep)] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
            instances = renumber[instances]
        return Sample(
            s.image,
            s.boxes[keep],
            self.lut[s.labels[keep]].astype(np.int64),
            None if s.mask is None else self.lut[s.mask],
            s.image_id,
            instances,
            s.valid,
            dict(s.info),
        )


#: class channels of the synthetic benchmark (an object's look depends on its channel only, not on num_classes)
SYNTHETIC_CLASSES = 20


def _check_classes(what: str, ids: Sequence[int], L: int) -> tuple[int, ...]:
    ids = tuple(int(c) for c in ids)
    if not ids or len(set(ids)) != len(ids) or not all(1 <= c <= L for c in ids):
        raise ConfigError(f"{what} must be distinct class channels in 1..{L}, got {ids}")
    return ids


def load_datasets(cfg: Config, log=print) -> tuple[Sequence[Sample], tuple[str, ...], Splits]:
    """(auxiliary training samples, their class names, the target splits), each relabelled to 1..L of its own."""
    synthetic_target = cfg.data == "synthetic"
    L = cfg.num_classes
    if synthetic_target:
        target_ids = _check_classes("target_classes", cfg.target_classes or range(1, L + 1), L)
        raw = load_splits(
            "synthetic",
            num_classes=L,
            image_size=cfg.image_size,
            train_images=cfg.train_images,
            val_images=cfg.val_images,
            data_seed=cfg.data_seed,
            # all L classes: the benchmark (and cache) every trainer uses; a subset draws only those classes
            class_ids=None if sorted(target_ids) == list(range(1, L + 1)) else target_ids,
            log=log,
        )
    else:
        raw = load_splits(
            cfg.data,
            num_classes=L,
            image_size=cfg.image_size,
            train_images=cfg.train_images,
            val_images=cfg.val_images,
            data_seed=cfg.data_seed,
            log=log,
        )
        target_ids = _check_classes(
            "target_classes", cfg.target_classes or range(1, raw.num_classes + 1), raw.num_classes
        )
    target_names = tuple(raw.class_names[c - 1] for c in target_ids)
    subset = InMemory if synthetic_target else (lambda x: x)
    target = Splits(
        subset(ClassSubset(raw.train, target_ids, target_names)),
        subset(ClassSubset(raw.val, target_ids, target_names)),
        target_names,
        f"{raw.description}; target classes {', '.join(target_names)}",
    )

    if cfg.aux == "synthetic":
        from boxloss.data import SyntheticBoxDataset, SyntheticConfig

        others = [c for c in range(1, SYNTHETIC_CLASSES + 1) if not (synthetic_target and c in target_ids)]
        if not cfg.aux_classes and not others:
            raise ConfigError(
                f"the target takes all {SYNTHETIC_CLASSES} synthetic classes and none is left for the auxiliary set; "
                "set target_classes or aux_classes"
            )
        aux_ids = _check_classes("aux_classes", cfg.aux_classes or others, SYNTHETIC_CLASSES)
        if synthetic_target and set(aux_ids) & set(target_ids):
            raise ConfigError(
                f"aux_classes {aux_ids} and target_classes {target_ids} share "
                f"{sorted(set(aux_ids) & set(target_ids))}: the two sets must be class-disjoint"
            )
        syn = SyntheticConfig(
            seed=cfg.aux_data_seed, num_classes=SYNTHETIC_CLASSES, image_size=cfg.image_size, class_ids=aux_ids
        )
        names = tuple(syn.class_names[c - 1] for c in aux_ids)
        aux = InMemory(ClassSubset(SyntheticBoxDataset("train", cfg.aux_images, syn, log=log), aux_ids, names))
    else:
        aux_raw = load_splits(cfg.aux, log=log)
        taken = {canonical_class_name(n) for n in target_names}
        aux_ids = _check_classes(
            "aux_classes",
            cfg.aux_classes
            or tuple(
                c
                for c in range(1, aux_raw.num_classes + 1)
                if canonical_class_name(aux_raw.class_names[c - 1]) not in taken
            ),
            aux_raw.num_classes,
        )
        names = tuple(aux_raw.class_names[c - 1] for c in aux_ids)
        aux = ClassSubset(aux_raw.train, aux_ids, names)
    if len(aux) == 0 or aux[0].mask is None:
        raise ConfigError(
            f"aux={cfg.aux}: the auxiliary set needs images with pixel masks, got "
            f"{'no images' if len(aux) == 0 else 'images without masks'}"
        )
    shared = sorted({canonical_class_name(n) for n in names} & {canonical_class_name(n) for n in target_names})
    if shared:
        raise ConfigError(f"the auxiliary and target classes must not intersect; both have {', '.join(shared)}")
    return aux, names, target


# ----------------------------------------------------------------------------------------------------------------
# Sec. III-B: the generator networks


def _gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(next(g for g in (8, 4, 2, 1) if c % g == 0), c)


class Residual(nn.Module):
    """Pre-activation residual block (GroupNorm, ReLU, 3 x 3 convolution, twice), ``cin`` -> ``cout`` channels."""

    def __init__(self, cin: int, cout: int | None = None, stride: int = 1):
        super().__init__()
        cout = cout or cin
        self.body = nn.Sequential(
            _gn(cin),
            nn.ReLU(),
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            _gn(cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
        )
        self.skip = nn.Identity() if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        return self.skip(x) + self.body(x)


class Hourglass(nn.Module):
    """Newell, Yang & Deng's hourglass ("Stacked Hourglass Networks for Human Pose Estimation", ECCV 2016): a
    residual branch at this resolution plus a pooled branch (``depth`` - 1 hourglass) upsampled back."""

    def __init__(self, depth: int, width: int):
        super().__init__()
        self.up = Residual(width)
        self.down = Residual(width)
        self.inner = Hourglass(depth - 1, width) if depth > 1 else Residual(width)
        self.out = Residual(width)

    def forward(self, x):
        low = self.out(self.inner(self.down(F.max_pool2d(x, 2))))
        return self.up(x) + F.interpolate(low, size=x.shape[-2:], mode="nearest")


class _InputNorm(nn.Module):
    """ImageNet normalisation of the image channels; the box map and the probability map go to [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        return torch.cat([(x[:, :3] - self.mean) / self.std, 2 * x[:, 3:] - 1], 1)


class HourglassGenerator(nn.Module):
    """LPG's HgNet: a strided stem, ``stacks`` hourglasses with a prediction after each (Newell et al.'s
    intermediate supervision; later stacks see the earlier prediction), two output channels (background, object).
    Returns the list of every stack's logits at the input resolution; the last is the generator's output."""

    def __init__(self, in_channels: int = 5, width: int = 32, depth: int = 3, stacks: int = 1, stride: int = 2):
        super().__init__()
        self.norm = _InputNorm()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, stride, 1, bias=False), Residual(width))
        self.hourglasses = nn.ModuleList(Hourglass(depth, width) if depth else Residual(width) for _ in range(stacks))
        self.features = nn.ModuleList(nn.Sequential(Residual(width), _gn(width), nn.ReLU()) for _ in range(stacks))
        self.heads = nn.ModuleList(nn.Conv2d(width, 2, 1) for _ in range(stacks))
        self.merge_features = nn.ModuleList(nn.Conv2d(width, width, 1) for _ in range(stacks - 1))
        self.merge_predictions = nn.ModuleList(nn.Conv2d(2, width, 1) for _ in range(stacks - 1))

    def forward(self, x):
        size = x.shape[-2:]
        y = self.stem(self.norm(x))
        outs = []
        for i, (hg, feat, head) in enumerate(zip(self.hourglasses, self.features, self.heads)):
            f = feat(hg(y))
            p = head(f)
            outs.append(F.interpolate(p, size=size, mode="bilinear", align_corners=False))
            if i + 1 < len(self.hourglasses):
                y = y + self.merge_features[i](f) + self.merge_predictions[i](p)
        return outs


class ResNetGenerator(nn.Module):
    """A ResNet-18-like generator (Table II's other architecture): a strided stem, four stages of two residual
    blocks at widths w, 2w, 4w, 8w (strides 1, 2, 2, 2 after the stem) and a feature-pyramid decoder (lateral 1 x 1
    convolutions added top-down) to the stem's resolution. Returns ``[logits]`` at the input resolution."""

    def __init__(self, in_channels: int = 5, width: int = 32, stride: int = 2):
        super().__init__()
        self.norm = _InputNorm()
        self.stem = nn.Conv2d(in_channels, width, 3, stride, 1, bias=False)
        widths = [width, 2 * width, 4 * width, 8 * width]
        stages, cin = [], width
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(Residual(cin, w, stride=1 if i == 0 else 2), Residual(w)))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.lateral = nn.ModuleList(nn.Conv2d(w, width, 1) for w in widths)
        self.head = nn.Sequential(Residual(width), _gn(width), nn.ReLU(), nn.Conv2d(width, 2, 1))

    def forward(self, x):
        size = x.shape[-2:]
        y = self.stem(self.norm(x))
        feats = []
        for stage in self.stages:
            y = stage(y)
            feats.append(y)
        top = self.lateral[-1](feats[-1])
        for lat, f in zip(reversed(self.lateral[:-1]), reversed(feats[:-1])):
            top = lat(f) + F.interpolate(top, size=f.shape[-2:], mode="nearest")
        return [F.interpolate(self.head(top), size=size, mode="bilinear", align_corners=False)]


def build_generator(cfg: Config) -> nn.Module:
    if cfg.generator == "hourglass":
        return HourglassGenerator(
            5, cfg.generator_width, cfg.generator_depth, cfg.generator_stacks, cfg.generator_stride
        )
    return ResNetGenerator(5, cfg.generator_width, cfg.generator_stride)


# ----------------------------------------------------------------------------------------------------------------
# Box windows: every box of a batch cropped (and pasted back) by one grid_sample call


def box_windows(boxes: torch.Tensor, context: float) -> torch.Tensor:
    """(K, 4) ``x0, y0, x1, y1`` windows: each box grown by ``context`` times its width / height on each side."""
    w = (boxes[:, 2] - boxes[:, 0]).clamp_min(1.0)
    h = (boxes[:, 3] - boxes[:, 1]).clamp_min(1.0)
    return torch.stack(
        [boxes[:, 0] - context * w, boxes[:, 1] - context * h, boxes[:, 2] + context * w, boxes[:, 3] + context * h], 1
    )


def _slots(box_batch: torch.Tensor, batch: int) -> tuple[torch.Tensor, int]:
    """Each box's position among the boxes of its image, and the largest count of boxes in one image."""
    K = box_batch.shape[0]
    counts = torch.bincount(box_batch, minlength=batch)
    order = torch.argsort(box_batch, stable=True)
    first = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(box_batch)
    slot[order] = torch.arange(K, device=box_batch.device) - first[box_batch[order]]
    return slot, int(counts.max()) if K else 0


def _window_grid(windows: torch.Tensor, n: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (K, n, n, 2) ``grid_sample`` grid of n x n sample centres over each window, and (K, n, n) whether each
    sample lies inside the image."""
    K = windows.shape[0]
    t = (torch.arange(n, device=windows.device, dtype=windows.dtype) + 0.5) / n  # sample centres in [0, 1]
    x = windows[:, 0:1] + t[None] * (windows[:, 2:3] - windows[:, 0:1])  # (K, n) image x
    y = windows[:, 1:2] + t[None] * (windows[:, 3:4] - windows[:, 1:2])
    gx = (2 * x / width - 1)[:, None, :].expand(K, n, n)  # align_corners=False: -1 and +1 are the image edges
    gy = (2 * y / height - 1)[:, :, None].expand(K, n, n)
    inside = ((y >= 0) & (y < height))[:, :, None] & ((x >= 0) & (x < width))[:, None, :]
    return torch.stack([gx, gy], -1), inside


def sample_windows(maps: torch.Tensor, windows: torch.Tensor, box_batch: torch.Tensor, size: int) -> torch.Tensor:
    """(K, C, size, size): the maps (B, C, H, W) of each box's image resampled over its window (bilinear, zero
    outside the image). A window more than ``size`` pixels across is supersampled (up to 4 x 4 points per crop
    pixel, averaged) so that shrinking it does not alias.

    The boxes of each image are laid side by side in one sampling grid, so one ``grid_sample`` serves all the boxes
    of a batch that share a supersampling factor (at most four calls)."""
    B, C, H, W = maps.shape
    K = windows.shape[0]
    out = maps.new_zeros(K, C, size, size)
    if K == 0:
        return out
    span = torch.maximum(windows[:, 2] - windows[:, 0], windows[:, 3] - windows[:, 1])
    factors = torch.ceil(span / size).clamp(1, 4).long()
    for factor in factors.unique().tolist():
        pick = (factors == factor).nonzero()[:, 0]
        n = size * int(factor)
        grid, inside = _window_grid(windows[pick].to(maps.dtype), n, H, W)
        slot, most = _slots(box_batch[pick], B)
        packed = maps.new_zeros((B, most, n, n, 2))
        packed[box_batch[pick], slot] = grid
        # border padding keeps samples near the edge exact; samples outside the image are zeroed afterwards
        crops = F.grid_sample(
            maps, packed.view(B, most * n, n, 2), mode="bilinear", padding_mode="border", align_corners=False
        ).view(B, C, most, n, n)[box_batch[pick], :, slot]
        crops = crops * inside[:, None].to(maps.dtype)
        out[pick] = F.avg_pool2d(crops, int(factor)) if factor > 1 else crops
    return out


def sample_box_maps(maps: torch.Tensor, windows: torch.Tensor, size: int) -> torch.Tensor:
    """(K, C, size, size): per-box maps (K, C, H, W) resampled over each box's window (bilinear at the crop's
    resolution, zero outside the image). For smooth maps (probabilities, box and class masks)."""
    K, C, H, W = maps.shape
    if K == 0:
        return maps.new_zeros(0, C, size, size)
    grid, inside = _window_grid(windows.to(maps.dtype), size, H, W)
    out = F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out * inside[:, None].to(maps.dtype)


def paste_windows(
    crops: torch.Tensor, windows: torch.Tensor, box_batch: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """(K, height, width): each (S, S) crop resampled back over its window in its image (0 outside the window)."""
    K = crops.shape[0]
    if K == 0:
        return crops.new_zeros(0, height, width)
    px = (torch.arange(width, device=crops.device, dtype=crops.dtype) + 0.5)[None]
    py = (torch.arange(height, device=crops.device, dtype=crops.dtype) + 0.5)[None]
    gx = 2 * (px - windows[:, 0:1]) / (windows[:, 2:3] - windows[:, 0:1]) - 1  # (K, W)
    gy = 2 * (py - windows[:, 1:2]) / (windows[:, 3:4] - windows[:, 1:2]) - 1  # (K, H)
    grid = torch.stack([gx[:, None, :].expand(K, height, width), gy[:, :, None].expand(K, height, width)], -1)
    out = F.grid_sample(crops[:, None], grid, mode="bilinear", padding_mode="border", align_corners=False)[:, 0]
    inside = ((gy > -1) & (gy < 1))[:, :, None] & ((gx > -1) & (gx < 1))[:, None, :]
    return out * inside.to(out.dtype)


def class_box_maps(
    boxes: torch.Tensor, box_batch: torch.Tensor, box_labels: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """(K, H, W) bool: for each box, the union of the boxes of its class in its image (the channel of its class in
    :func:`boxloss.boxes_to_masks` ``form="union"``, for its box alone), by the library's box convention: a box
    covers the pixels whose centres lie inside it."""
    cols = torch.arange(width, device=boxes.device, dtype=boxes.dtype) + 0.5
    rows = torch.arange(height, device=boxes.device, dtype=boxes.dtype) + 0.5
    in_x = (cols[None] >= boxes[:, 0:1]) & (cols[None] < boxes[:, 2:3])
    in_y = (rows[None] >= boxes[:, 1:2]) & (rows[None] < boxes[:, 3:4])
    inside = (in_y[:, :, None] & in_x[:, None, :]).flatten(1).float()  # (K, H * W)
    same = (box_batch[:, None] == box_batch[None]) & (box_labels[:, None] == box_labels[None])
    return (same.float() @ inside > 0).view(-1, height, width)


def generator_inputs(
    images: torch.Tensor,
    probs: torch.Tensor,
    boxes: torch.Tensor,
    box_batch: torch.Tensor,
    box_labels: torch.Tensor,
    num_classes: int,
    size: int,
    context: float,
) -> torch.Tensor:
    """(K, 5, S, S): per box, its window of the image (3), its class's box map (1) and f's probability of its
    class (1): g's inputs y^b, x and f(x; theta) for one box (Sec. III-B)."""
    B, _, H, W = images.shape
    K = boxes.shape[0]
    if K == 0:
        return images.new_zeros(0, 5, size, size)
    windows = box_windows(boxes, context)
    own = torch.stack(
        [class_box_maps(boxes, box_batch, box_labels, H, W).to(images.dtype), probs[box_batch, box_labels]], 1
    )
    return torch.cat([sample_windows(images, windows, box_batch, size), sample_box_maps(own, windows, size)], 1)


def generator_targets(
    masks: torch.Tensor,
    boxes: torch.Tensor,
    box_batch: torch.Tensor,
    box_labels: torch.Tensor,
    size: int,
    context: float,
) -> torch.Tensor:
    """(K, S, S) int64: 1 where the crop pixel is mostly the box's class in the true mask (B, H, W), 0 elsewhere,
    255 (ignored) where most of it is void or outside the image."""
    K = boxes.shape[0]
    if K == 0:
        return masks.new_zeros(0, size, size)
    own = masks[box_batch]
    maps = torch.stack([own == box_labels[:, None, None], own == 255, torch.ones_like(own, dtype=torch.bool)], 1)
    obj, void, inside = sample_box_maps(maps.float(), box_windows(boxes, context), size).unbind(1)
    known = inside - void
    return (obj > known / 2).long().masked_fill(known < 0.5, 255)


# ----------------------------------------------------------------------------------------------------------------
# Pseudo masks: the box masks, g's masks merged by Eq. 7, and DenseCRF's


@torch.no_grad()
def class_probabilities(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """f's softmax (B, L + 1, H, W) in eval mode."""
    was = model.training
    model.eval()
    out = head_outputs(model(images))["logits"].float().softmax(1)
    model.train(was)
    return out


@torch.no_grad()
def lpg_pseudo_labels(
    generator: nn.Module,
    segmenter: nn.Module,
    samples: Sequence[Sample],
    num_classes: int,
    cfg: Config,
    device,
    *,
    batch_size: int = 16,
) -> list[torch.Tensor]:
    """Eq. 7: per image, g's object masks of its boxes (psi = argmax of the two channels), merged into one (H, W)
    uint8 label map by the overlapping rate; pixels in no box are background."""
    was = generator.training
    generator.eval()
    out = []
    for i in range(0, len(samples), batch_size):
        chunk = [samples[j] for j in range(i, min(i + batch_size, len(samples)))]
        b = collate_samples(chunk).to(device)
        B, _, H, W = b.images.shape
        probs = class_probabilities(segmenter, b.images)
        x = generator_inputs(
            b.images, probs, b.boxes, b.box_batch, b.box_labels, num_classes, cfg.crop_size, cfg.crop_context
        )
        fg = (
            torch.cat([generator(x[j : j + 64])[-1].softmax(1)[:, 1] for j in range(0, x.shape[0], 64)])
            if x.shape[0]
            else x.new_zeros(0, cfg.crop_size, cfg.crop_size)
        )
        masks = paste_windows(fg, box_windows(b.boxes, cfg.crop_context), b.box_batch, H, W) > 0.5
        labels = boxloss.merge_box_masks(
            masks, b.boxes, b.box_batch, b.box_labels, (B, H, W), strategy="overlap-rate", num_classes=num_classes
        )
        out += [labels[j, : s.height, : s.width].to(torch.uint8).cpu() for j, s in enumerate(chunk)]
    generator.train(was)
    return out


def box_pseudo_labels(samples: Sequence[Sample], num_classes: int) -> list[torch.Tensor]:
    """The boxes as masks (the EM's initial pseudo masks, Sec. III-B): smaller boxes in front."""
    return [torch.from_numpy(box_label_map(s, num_classes)) for s in samples]


def densecrf_pseudo_labels(samples: Sequence[Sample], num_classes: int, cfg: Config) -> list[torch.Tensor]:
    """Table III's baseline: DenseCRF (Krähenbühl & Koltun) from box unaries, per image; each box's mask (its
    pixels the CRF labels with its class) merged by Eq. 7, as the generator's are.

    The one place the DenseCRF implementation is chosen: :func:`boxloss.dense_crf_inference` (batched, on the
    library's lattices) when the library has it, else :func:`boxloss.dense_crf_box_masks` (pydensecrf, one image at
    a time). Both start from the unaries of :func:`boxloss.dense_crf_box_masks` (:func:`box_unary`)."""
    settings = _crf_settings(cfg)
    out: list[torch.Tensor | None] = [None] * len(samples)
    if hasattr(boxloss, "dense_crf_inference"):
        masks = _dense_crf_inference_masks(samples, num_classes, settings)
    else:
        masks = {}
        for i, s in enumerate(samples):
            if s.num_boxes:
                scaled = dict(settings, bilateral_sxy=settings["bilateral_sxy"] * min(s.height, s.width) / 513)
                masks[i] = torch.from_numpy(
                    boxloss.dense_crf_box_masks(s.image, s.boxes, s.labels, num_classes, **scaled)
                )
    for i, s in enumerate(samples):
        if s.num_boxes == 0:
            out[i] = torch.zeros(s.height, s.width, dtype=torch.uint8)
            continue
        boxes = torch.from_numpy(s.boxes)
        out[i] = boxloss.merge_box_masks(
            masks[i],
            boxes,
            torch.zeros(len(boxes), dtype=torch.long),
            torch.from_numpy(s.labels),
            (1, s.height, s.width),
            strategy="overlap-rate",
            num_classes=num_classes,
        )[0].to(torch.uint8)
    return out


def _crf_settings(cfg: Config) -> dict:
    """The keyword arguments of :func:`boxloss.dense_crf_box_masks` (bilateral_sxy at 513 pixels)."""
    return {
        "box_confidence": cfg.crf_box_confidence,
        "outside_confidence": cfg.crf_outside_confidence,
        "iterations": cfg.crf_iterations,
        "gaussian_sxy": cfg.crf_gaussian_sxy,
        "gaussian_compat": cfg.crf_gaussian_weight,
        "bilateral_sxy": cfg.crf_bilateral_sxy,
        "bilateral_srgb": cfg.crf_bilateral_srgb,
        "bilateral_compat": cfg.crf_bilateral_weight,
    }


def box_unary(covered: torch.Tensor, box_confidence: float, outside_confidence: float) -> torch.Tensor:
    """(B, C, H, W) float32 unaries ``-log P`` of :func:`boxloss.dense_crf_box_masks` from ``covered`` (B, C, H, W)
    bool, the union of each class's boxes (channel 0 unused): outside every box the background has probability
    ``outside_confidence``; inside boxes ``box_confidence`` is shared by the classes whose boxes cover the pixel and
    the background gets ``1 - box_confidence``; the other classes a tenth of that, shared; then normalised and
    clipped at 1e-5 as pydensecrf's ``unary_from_softmax``."""
    C = covered.shape[1]
    cov = covered[:, 1:].float()
    n_box = cov.sum(1, keepdim=True)
    inside = n_box > 0
    probs = torch.full(covered.shape, (1 - outside_confidence) / max(C - 1, 1), dtype=torch.float32)
    probs[:, 0] = outside_confidence
    other = (1 - box_confidence) * 0.1 / max(C - 1, 1)
    objects = torch.where(cov > 0, box_confidence / n_box.clamp_min(1), torch.where(inside, other, probs[:, 1:]))
    probs = torch.cat([torch.where(inside, 1 - box_confidence, probs[:, :1]), objects], 1)
    probs = probs / probs.sum(1, keepdim=True)
    return -probs.clamp(1e-5, 1.0).log()


def _dense_crf_inference_masks(samples: Sequence[Sample], num_classes: int, settings: dict) -> dict:
    """Per-box masks (K, H, W) bool by :func:`boxloss.dense_crf_inference`, images of one size in batches."""
    out = {}
    todo = [i for i, s in enumerate(samples) if s.num_boxes]
    while todo:
        size = (samples[todo[0]].height, samples[todo[0]].width)
        chunk = [i for i in todo if (samples[i].height, samples[i].width) == size][:16]
        todo = [i for i in todo if i not in chunk]
        b = collate_samples([samples[i] for i in chunk])
        H, W = size
        covered = boxloss.boxes_to_masks(
            b.boxes, b.box_batch, b.box_labels, (len(chunk), H, W), num_classes, form="union"
        )
        unary = box_unary(covered, settings["box_confidence"], settings["outside_confidence"])
        image = torch.from_numpy(np.stack([samples[i].image for i in chunk])).permute(0, 3, 1, 2).contiguous()
        sxy = settings["bilateral_sxy"] * min(H, W) / 513
        with torch.no_grad():
            q = boxloss.dense_crf_inference(
                unary,
                image,
                bilateral=(settings["bilateral_compat"], sxy, settings["bilateral_srgb"]),
                gaussian=(settings["gaussian_compat"], settings["gaussian_sxy"]),
                iterations=settings["iterations"],
            )
        labels = q.argmax(1)  # (B, H, W)
        K = b.boxes.shape[0]
        own = boxloss.boxes_to_masks(
            b.boxes, torch.arange(K), torch.ones(K, dtype=torch.long), (K, H, W), 1, form="union"
        )[:, 1]  # each box's pixels
        box_masks = own & (labels[b.box_batch] == b.box_labels[:, None, None])
        for j, i in enumerate(chunk):
            out[i] = box_masks[b.box_batch == j]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Training: f (the M-step, Eq. 4) and g (the E-step, Eq. 6)


def _safe_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the non-void pixels (0 with a gradient when there are none)."""
    total = F.cross_entropy(logits, target, ignore_index=255, reduction="sum")
    return total / (target != 255).sum().clamp_min(1)


class WithMasks(Sequence):
    """The samples with their masks replaced by pseudo masks, sample by sample (nothing is copied up front)."""

    def __init__(self, samples: Sequence[Sample], masks: Sequence[torch.Tensor]):
        if len(samples) != len(masks):
            raise ValueError(f"WithMasks: {len(samples)} samples but {len(masks)} masks")
        self.samples, self.masks = samples, masks

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return dataclasses.replace(self.samples[i], mask=self.masks[i].numpy())


def _seg_optimizer(model: nn.Module, cfg: Config):
    if cfg.seg_optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.seg_lr, weight_decay=1e-4)
    # Table I: the last layer (the last convolution registered, the logits) at 10x, biases at 2x
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    last = {id(p) for p in convs[-1].parameters()} if convs else set()
    groups = {(a, b): [] for a in (False, True) for b in (False, True)}
    for name, p in model.named_parameters():
        groups[(id(p) in last, name.endswith("bias"))].append(p)
    return torch.optim.SGD(
        [
            {"params": ps, "lr": cfg.seg_lr * (10 if is_last else 1) * (2 if bias else 1)}
            for (is_last, bias), ps in groups.items()
            if ps
        ],
        lr=cfg.seg_lr,
        momentum=0.9,
        weight_decay=5e-4,
    )


def train_segmenter(
    ctx: Context,
    job: str,
    samples: Sequence[Sample],
    labels: Sequence[torch.Tensor],
    num_classes: int,
    *,
    init: nn.Module | None = None,
) -> nn.Module:
    """The M-step (Eq. 4): f trained with cross-entropy on the pseudo masks ``labels`` (void ignored); it starts
    from ``init``'s weights when given (Sec. III-C), else from the run's initial weights."""
    cfg: Config = ctx.config
    model = ctx.new_model(job, {"logits": num_classes + 1})
    if init is not None:
        model.load_state_dict(init.state_dict())
    batches = Batches(WithMasks(samples, labels), cfg.batch_size, cfg.seed, augment=hflip_augment)

    def step(m, batch, clock):
        images = batch.images.to(ctx.device)
        target = batch.masks.to(ctx.device).masked_fill(~batch.valid.to(ctx.device), 255)
        with clock.model_forward():
            logits = head_outputs(m(images))["logits"]
        clock.watch(logits)
        with clock.loss_forward():
            ce = _safe_ce(logits, target)
        return ce, {"ce": ce}

    opt = _seg_optimizer(model, cfg)
    ctx.fit(job, model, step, batches, steps=cfg.seg_steps, optimizer=opt, scheduler=poly_schedule(opt, cfg.seg_steps))
    return model


class GeneratorBatches(Batches):
    """Batches of generator crops: ``generator_batch`` images (flipped at random), f's probabilities on them, and
    every box's window as one crop with its target from the true mask. f's forward pass counts as data time."""

    def __init__(self, samples, segmenter: nn.Module, num_classes: int, cfg: Config, device):
        def collate(items):
            b = collate_samples(items).to(device)
            probs = class_probabilities(segmenter, b.images)
            x = generator_inputs(
                b.images, probs, b.boxes, b.box_batch, b.box_labels, num_classes, cfg.crop_size, cfg.crop_context
            )
            masks = b.masks.masked_fill(~b.valid, 255)
            y = generator_targets(masks, b.boxes, b.box_batch, b.box_labels, cfg.crop_size, cfg.crop_context)
            return x, y

        super().__init__(samples, cfg.generator_batch, cfg.seed, collate=collate, augment=hflip_augment)


def train_generator(
    ctx: Context,
    job: str,
    samples: Sequence[Sample],
    segmenter: nn.Module,
    num_classes: int,
    *,
    init: nn.Module | None = None,
) -> nn.Module:
    """The E-step (Eq. 6): g trained with cross-entropy against the true masks, its inputs the boxes, the images
    and f's current predictions (every stack's output supervised, as Newell et al.)."""
    cfg: Config = ctx.config
    ctx.seed(job)
    model = build_generator(cfg).to(ctx.device)
    how = "from scratch"
    if init is not None:
        model.load_state_dict(init.state_dict())
        how = "from the previous stage's generator"
    ctx.log(
        f"[{job}] {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {how}"
    )

    def step(m, batch, clock):
        x, y = batch
        with clock.model_forward():
            outs = m(x) if x.shape[0] else []
        clock.watch(outs)
        with clock.loss_forward():
            if not outs:  # no box in these images: a zero loss that still reaches every parameter
                loss = sum(p.sum() for p in m.parameters()) * 0.0
                return loss, {"ce": loss, "crops": 0}
            loss = sum(_safe_ce(o, y) for o in outs)
        return loss, {"ce": loss, "crops": x.shape[0]}

    opt = torch.optim.Adam(model.parameters(), lr=cfg.generator_lr, betas=(0.9, 0.999))
    ctx.fit(
        job,
        model,
        step,
        GeneratorBatches(samples, segmenter, num_classes, cfg, ctx.device),
        steps=cfg.generator_steps,
        optimizer=opt,
        scheduler=poly_schedule(opt, cfg.generator_steps),
    )
    model.eval()
    return model


def save_generator(ctx: Context, stage: int, model: nn.Module) -> None:
    """``generators/lpg-stage-<s>.pt``: the generator's weights and the settings that rebuild it."""
    if not ctx.run.main:
        return
    cfg: Config = ctx.config
    arch = {
        k: getattr(cfg, k)
        for k in (
            "generator",
            "generator_width",
            "generator_depth",
            "generator_stacks",
            "generator_stride",
            "crop_size",
            "crop_context",
        )
    }
    checkpoint.atomic_save(
        {"stage": stage, "model": model.state_dict(), "architecture": arch},
        ctx.run.file("generators", f"lpg-stage-{stage}.pt"),
    )


def load_generators(ctx: Context, folder: str, stages: int) -> dict[int, nn.Module]:
    """The generators of stages 1..``stages`` saved by :func:`save_generator` in ``folder``."""
    from pathlib import Path

    cfg: Config = ctx.config
    out = {}
    for s in range(1, stages + 1):
        path = Path(folder) / f"lpg-stage-{s}.pt"
        if not path.is_file():
            raise FileNotFoundError(
                f"generators={folder}: {path.name} is missing (a run with stages={stages} "
                "writes lpg-stage-1.pt .. lpg-stage-<stages>.pt)"
            )
        state = checkpoint.load(path)
        arch = state["architecture"]
        mine = {k: getattr(cfg, k) for k in arch}
        if arch != mine:
            diff = ", ".join(f"{k}={v!r}" for k, v in arch.items() if mine[k] != v)
            raise ConfigError(f"generators={folder}: {path.name} was built with {diff}; pass the same settings")
        model = build_generator(cfg).to(ctx.device)
        model.load_state_dict(state["model"])
        out[s] = model.eval()
    return out


# ----------------------------------------------------------------------------------------------------------------
# The pipeline


def _stage_of(setting: str) -> int:
    return int(setting.rsplit("-", 1)[1])


def table_rows(settings: Sequence[str], stages: int) -> list[str]:
    """The rows a run with ``stages`` stages fills for the chosen ``settings``: rows of stages beyond ``stages`` are
    dropped, and beyond the paper's three a row of stage 3 brings the same row of the later stages."""
    rows = []
    for name in settings:
        if not name[-1].isdigit():
            rows.append(name)
            continue
        s, prefix = _stage_of(name), name.rsplit("-", 1)[0]
        if s <= stages:
            rows.append(name)
        if s == PAPER_STAGES:
            rows += [f"{prefix}-{j}" for j in range(PAPER_STAGES + 1, stages + 1)]
    return rows


class StageClock:
    """Wall time of the parts of each stage (training, pseudo masks, evaluation), for the run's notes."""

    def __init__(self):
        self.parts: dict[str, dict[str, float]] = {}

    @contextlib.contextmanager
    def time(self, stage: str, part: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            parts = self.parts.setdefault(stage, {})
            parts[part] = round(parts.get(part, 0.0) + time.perf_counter() - t0, 2)

    def lines(self) -> list[str]:
        return [
            f"time {stage}: {sum(parts.values()):.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in parts.items()) + ")"
            for stage, parts in self.parts.items()
        ]


def run(ctx: Context, settings: list[str]) -> None:
    cfg: Config = ctx.config
    check_config(cfg)
    S = cfg.stages
    rows = table_rows(settings, S)
    stage_rows = [_stage_of(r) for r in rows if r.startswith("stage-")]
    fixed_rows = [_stage_of(r) for r in rows if r.startswith("fixed-stage-")]
    mask_rows = [_stage_of(r) for r in rows if r.startswith("lpg-stage-")]
    # stage-wise chain: f is trained up to the last stage-s row and up to s - 1 for the last lpg-stage-s row
    chain_f = max(stage_rows + [s - 1 for s in mask_rows] + [0])
    chain_masks = max(stage_rows + mask_rows + [0])
    need_generators = S if fixed_rows else chain_masks
    clock = StageClock()

    with clock.time("data", "load"):
        aux, aux_names, target = load_datasets(cfg, log=ctx.log)
    Lt, La = target.num_classes, len(aux_names)
    train, val = target.train, target.val
    ctx.log(f"auxiliary set: {len(aux)} images, classes {', '.join(aux_names)} (channels 1..{La})")
    ctx.log(f"target set: {target.description} (relabelled to channels 1..{Lt})")
    truth = [torch.from_numpy(s.mask) for s in train] if len(train) and train[0].mask is not None else None
    if truth is None and (mask_rows or "densecrf" in rows):
        raise ConfigError(
            "Table III scores pseudo masks against the target's training masks, and this target "
            "set has none; leave out lpg-stage-* and densecrf (--settings)"
        )

    # Sec. III-B, Fig. 1: the bi-level EM on the auxiliary set
    generators: dict[int, nn.Module] = {}
    if need_generators and cfg.generators:
        generators = load_generators(ctx, cfg.generators, need_generators)
        ctx.log(f"generators of stages 1..{need_generators} loaded from {cfg.generators}")
    elif need_generators:
        generators = auxiliary_em(ctx, aux, La, need_generators, clock)

    # Fig. 2: deployment on the target set
    finals: dict[str, nn.Module] = {}
    figure = {"box": box_pseudo_labels(train, Lt)}
    if truth is not None:
        ctx.results.notes.append(
            f"target pseudo masks from the boxes alone: mIoU {label_miou(figure['box'], truth, Lt):.2f}"
        )

    def evaluate(setting: str, model: nn.Module, stage: str) -> None:
        with clock.time(stage, "evaluation"):
            score = miou_percent(segmentation_confusion(model, val, Lt, device=ctx.device))
        ctx.results.add("II", setting, "miou", score)
        ctx.log(f"Table II {setting}: validation mIoU {score:.2f}")

    if "densecrf" in rows:
        with clock.time("target densecrf", "pseudo masks"):
            figure["densecrf"] = densecrf_pseudo_labels(train, Lt, cfg)
        ctx.results.add("III", "densecrf", "miou", label_miou(figure["densecrf"], truth, Lt))
        ctx.log(f"Table III densecrf: pseudo-mask mIoU {ctx.results.value('III', 'densecrf', 'miou'):.2f}")

    f_box = None
    if "box" in rows or chain_masks or fixed_rows:
        with clock.time("target stage 0", "M-step f"):
            f_box = train_segmenter(ctx, "target/f/box", train, figure["box"], Lt)
        finals["box"] = f_box
        if "box" in rows:
            evaluate("box", f_box, "target stage 0")

    f = f_box
    for s in range(1, chain_masks + 1):  # the stage-wise generators
        stage = f"target stage {s}"
        with clock.time(stage, "pseudo masks"):
            labels = lpg_pseudo_labels(generators[s], f, train, Lt, cfg, ctx.device)
        figure[f"lpg-stage-{s}"] = labels
        if s in mask_rows:
            ctx.results.add("III", f"lpg-stage-{s}", "miou", label_miou(labels, truth, Lt))
            ctx.log(
                f"Table III lpg-stage-{s}: pseudo-mask mIoU {ctx.results.value('III', f'lpg-stage-{s}', 'miou'):.2f}"
            )
        if s > chain_f:
            break
        with clock.time(stage, "M-step f"):
            f = train_segmenter(ctx, f"target/f/stage-{s}", train, labels, Lt, init=f if cfg.seg_continue else None)
        finals[f"stage-{s}"] = f
        if s in stage_rows:
            evaluate(f"stage-{s}", f, stage)

    if cfg.box_chain and f_box is not None:
        f = f_box
        for s in range(1, max(stage_rows + [0]) + 1):  # the control: as many steps, on the boxes
            stage = f"target stage {s} (boxes)"
            with clock.time(stage, "M-step f"):
                f = train_segmenter(ctx, f"target/f/box-stage-{s}", train, figure["box"], Lt, init=f)
            with clock.time(stage, "evaluation"):
                score = miou_percent(segmentation_confusion(f, val, Lt, device=ctx.device))
            ctx.results.notes.append(
                f"control, f trained further on the boxes alone to stage {s}: validation mIoU {score:.2f}"
            )
            ctx.log(f"control box-stage-{s}: validation mIoU {score:.2f}")

    f = f_box
    for s in range(1, max(fixed_rows + [0]) + 1):  # the final generator at every stage
        stage = f"target stage {s} (fixed)"
        with clock.time(stage, "pseudo masks"):
            labels = lpg_pseudo_labels(generators[S], f, train, Lt, cfg, ctx.device)
        if truth is not None:
            ctx.results.notes.append(
                f"fixed-generator pseudo masks at stage {s}: mIoU {label_miou(labels, truth, Lt):.2f}"
            )
        with clock.time(stage, "M-step f"):
            f = train_segmenter(
                ctx, f"target/f/fixed-stage-{s}", train, labels, Lt, init=f if cfg.seg_continue else None
            )
        finals[f"fixed-stage-{s}"] = f
        if s in fixed_rows:
            evaluate(f"fixed-stage-{s}", f, stage)

    if truth is not None:
        figure["ground truth"] = truth
    _pseudo_figure(
        ctx,
        train,
        figure,
        Lt,
        "fig3_target_pseudo_masks.png",
        "Fig. 3: pseudo masks of target training images by stage (white: void)",
    )
    _prediction_figure(ctx, val, finals, Lt)
    ctx.results.notes += clock.lines()
    ctx.run.write_json("stage_times.json", clock.parts)
    for line in clock.lines():
        ctx.log(line)
    if ctx.run.main and (ctx.run.path / "metrics.jsonl").is_file():
        save_loss_curves(ctx.run.file("figures", "loss_curves.png"), ctx.run.path / "metrics.jsonl")


def auxiliary_em(
    ctx: Context, aux: Sequence[Sample], num_classes: int, stages: int, clock: StageClock
) -> dict[int, nn.Module]:
    """Fig. 1: the pseudo masks start as the boxes; stage s trains f on them (M-step, Eq. 4), then g_s on f's
    predictions against the true masks (E-step, Eq. 6), and regenerates them with g_s (Eq. 3). Returns the
    generators by stage, each also saved in ``generators/``."""
    cfg: Config = ctx.config
    truth = [torch.from_numpy(s.mask) for s in aux]
    with clock.time("aux stage 0", "pseudo masks"):
        pseudo = box_pseudo_labels(aux, num_classes)
    figure = {"box": pseudo}
    generators: dict[int, nn.Module] = {}
    f, g = None, None
    for s in range(1, stages + 1):
        stage = f"aux stage {s}"
        with clock.time(stage, "M-step f"):
            f = train_segmenter(ctx, f"aux/f/stage-{s}", aux, pseudo, num_classes, init=f if cfg.seg_continue else None)
        with clock.time(stage, "E-step g"):
            g = train_generator(
                ctx, f"aux/g/stage-{s}", aux, f, num_classes, init=g if cfg.generator_warm_start else None
            )
        save_generator(ctx, s, g)
        generators[s] = g
        with clock.time(stage, "pseudo masks"):
            pseudo = lpg_pseudo_labels(g, f, aux, num_classes, cfg, ctx.device)
        figure[f"lpg-stage-{s}"] = pseudo
        score = label_miou(pseudo, truth, num_classes)
        ctx.results.notes.append(f"auxiliary pseudo masks of stage {s}: mIoU {score:.2f}")
        ctx.log(f"aux stage {s}: pseudo-mask mIoU {score:.2f} on the auxiliary training set")
    _pseudo_figure(
        ctx,
        aux,
        figure,
        num_classes,
        "fig3_aux_pseudo_masks.png",
        "auxiliary set: pseudo masks of the EM stages (white: void)",
    )
    return generators


def _pseudo_figure(ctx: Context, samples, columns: dict, L: int, name: str, title: str) -> None:
    if not ctx.run.main or not columns:
        return
    n = min(ctx.config.figures, len(samples))
    if n == 0:
        return
    cols = {k: [v[i].numpy() if isinstance(v[i], torch.Tensor) else v[i] for i in range(n)] for k, v in columns.items()}
    if "ground truth" not in cols and samples[0].mask is not None:
        cols["ground truth"] = [samples[i].mask for i in range(n)]
    save_panels(
        ctx.run.file("figures", name),
        [samples[i].image for i in range(n)],
        cols,
        boxes=[samples[i].boxes for i in range(n)],
        labels=[samples[i].labels for i in range(n)],
        num_classes=L,
        title=title,
    )


def _prediction_figure(ctx: Context, val, finals: dict, L: int) -> None:
    if not ctx.run.main or not finals or len(val) == 0:
        return
    n = min(ctx.config.figures, len(val))
    samples = [val[i] for i in range(n)]
    images = collate_samples(samples).images.to(ctx.device)
    cols = {k: list(class_probabilities(m, images).argmax(1).cpu().numpy()) for k, m in finals.items()}
    save_sample_panels(
        ctx.run.file("figures", "target_predictions.png"),
        samples,
        cols,
        num_classes=L,
        title="Table II: f on target validation images",
    )
