"""Box to Tag and Back: Ji & Veksler, "Weakly Supervised Semantic Segmentation: From Box to Tag and Back", BMVC 2021.

The pipeline, as the paper's Sec. 4-5:

1. Sec. 4.1, single-class datasets: for each class, its boxes that overlap no box of another class and whose longer
   side exceeds ``crop_min_side``, cropped with a ``crop_border`` margin from the image around them (background,
   void where it lies in another box) and resized to ``crop_size`` squares.
2. Sec. 4.2, one single-class network per class, trained on its crops with the regularized loss
   (:class:`boxloss.RegularizedLoss`): ``ours`` (centre/border prior, Eq. 3), ``ours(T)`` (tight-box prior, Eq. 6),
   ``ours(T+N)`` (plus the negative loss, Eq. 5, on the other classes' crops). Table 1 scores every box's
   segmentation with F-beta (beta^2 = 0.3) against the true mask, beside the baselines ``box`` (the box is the
   mask), ``grabcut`` and ``densecrf``.
3. Sec. 4.3, pseudo ground truth: every training box segmented by its class's ``ours(T+N)`` network, pasted back and
   merged with ``overlap-small``, ``overlap-void`` and ``overlap-back-void`` (:func:`boxloss.merge_box_masks`);
   Table 2 gives their mIoU against the true masks and the percentage of new void pixels.
4. Sec. 5, the final semantic network: cross-entropy on the ``overlap-back-void`` pseudo ground truth (void ignored),
   plus the DenseCRF loss of Tang et al. for the second half of training (``final``), without it
   (``final-no-crf``), and on box-as-mask labels (``final-box-labels``); mIoU on the validation split.

Where the paper is silent the defaults follow the authors' public single-class code, and say so: the Sparse-CRF
colour weights are computed on ImageNet-normalised colours with sigma annealed from 0.05 to 0.15, 4-connected.
Two defaults are derived from the paper's numbers for other sizes: ``lambda_crf`` 100 is the paper's weight at
256-pixel crops, and Eq. 1 divides by the pixel count, so the weight is scaled by ``crop_size / 256`` to keep the
paper's balance between the Sparse-CRF and the other terms; and the DenseCRF loss's ``sigma_xy`` 80 is at 513-pixel
images, scaled with the image size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import boxloss
from boxloss.data import BoxCrop, CropBatch, collate_crops, crop_boxes, paste_crop
from boxloss.trainers.engine import distributed
from boxloss.trainers.engine.config import TrainerConfig
from boxloss.trainers.engine.context import Context
from boxloss.trainers.engine.data import Batches, Splits, box_label_map, config_splits, hflip_augment
from boxloss.trainers.engine.evaluate import label_miou, miou_percent, segmentation_confusion
from boxloss.trainers.engine.figures import save_loss_curves, save_sample_panels
from boxloss.trainers.engine.loop import poly_schedule
from boxloss.trainers.engine.models import IMAGENET_MEAN, IMAGENET_STD, head_outputs

NAME = "box2tagback"
SUMMARY = "Box to Tag and Back (Ji & Veksler, BMVC 2021): single-class regularized loss, pseudo GT, final network"
SINGLE = ("ours", "ours(T)", "ours(T+N)")
BASELINES = ("box", "grabcut", "densecrf")
MERGES = ("overlap-small", "overlap-void", "overlap-back-void")
FINAL = ("final", "final-no-crf", "final-box-labels")
SETTINGS = {
    "box": "Table 1: the box is the mask",
    "grabcut": "Table 1: GrabCut initialised with the box (OpenCV)",
    "densecrf": "Table 1: DenseCRF from box unaries",
    "ours": "Table 1: regularized loss, centre/border positional prior (Eq. 3)",
    "ours(T)": "Table 1: regularized loss, tight-box prior with border cross-entropy (Eq. 6)",
    "ours(T+N)": "Table 1: ours(T) plus the negative loss on other classes' crops (Eq. 5)",
    "overlap-small": "Table 2: overlaps go to the smaller box",
    "overlap-void": "Table 2: overlaps are void",
    "overlap-back-void": "Table 2: overlaps and in-box background are void",
    "final": "Sec. 5: final network, cross-entropy on overlap-back-void + DenseCRF loss",
    "final-no-crf": "Sec. 5: final network, cross-entropy on overlap-back-void only",
    "final-box-labels": "Sec. 5: final network, cross-entropy on box-as-mask labels",
}


@dataclass
class Config(TrainerConfig):
    # Sec. 4.1: single-class datasets
    crop_border: int = 3  # Sec. 4.1: a 3-pixel margin from outside the box
    crop_min_side: int = 50  # Sec. 4.1: longer side above 50 pixels
    crop_size: int = 256  # Sec. 4.1: crops resized to 256 x 256
    # Sec. 3 and 4.2: the regularized loss
    s_min: float = 0.3  # Sec. 4.2 (0.15 in Sec. 3)
    lambda_crf: float = 100.0  # Sec. 3, at 256-pixel crops; scaled by crop_size / 256 (module docstring)
    lambda_v: float = 1.0  # Sec. 3
    lambda_p: float = 1.0  # Sec. 3
    lambda_s: float = 5.0  # Sec. 3
    lambda_neg: float = 1.0  # Sec. 3
    sigma: float = 0.15  # Sec. 3 (on ImageNet-normalised colours, as the authors' code)
    sigma_start: float = 0.05  # authors' code: sigma annealed from 0.05 to `sigma`
    neighbourhood: int = 4  # authors' code: 4-connected
    tight_mode: str = "either"  # Sec. 4.2: every row or every column holds object
    negative_fraction: float = 0.25  # share of a ours(T+N) batch taken from other classes' crops (not in the paper)
    single_steps: int = 3000  # not in the paper
    single_lr: float = 1e-3  # not in the paper
    single_batch: int = 16  # not in the paper
    threshold: float = 0.5  # object where the single-class network's probability exceeds it
    # Sec. 5: the final network
    final_steps: int = 20000  # Sec. 5: 200 epochs of VOC's 10,582 images at batch 10 is about 200,000 steps
    final_lr: float = 1e-4  # Sec. 5: SGD, DeepLab's settings, initial learning rate 1e-4
    final_optimizer: str = "sgd"  # Sec. 5 (DeepLab: momentum 0.9, weight decay 5e-4, poly decay)
    dense_crf_weight: float = 0.1  # Tang et al.'s 2e-9 on the unnormalised loss, for the normalised one
    dense_sigma_rgb: float = 15.0  # Tang et al.
    dense_sigma_xy: float = 80.0  # Tang et al., at 513-pixel images; scaled with image_size
    dense_scale: float = 0.5  # Tang et al.
    crf_start: float = 0.5  # Sec. 5: cross-entropy alone for the first half, then with the DenseCRF loss
    figures: int = 6  # validation images in the figures

    PRESET_OVERRIDES = {
        "paper": {"image_size": 513},
        "quick": {
            "image_size": 128,
            "train_images": 600,
            "val_images": 150,
            "crop_min_side": 12,
            "crop_size": 64,
            "single_steps": 250,
            "single_batch": 16,
            "final_steps": 500,
            "final_lr": 1e-3,
            "final_optimizer": "adamw",
            "batch_size": 16,
        },
    }


# ----------------------------------------------------------------------------------------------------- crops


def make_crops(samples, class_id: int, cfg: Config, *, training_set: bool) -> list[BoxCrop]:
    """The single-class dataset of Sec. 4.1 (``training_set``), or every box of the class (for pseudo GT)."""
    crops = []
    for i, s in enumerate(samples):
        crops += crop_boxes(
            s.image,
            s.boxes,
            s.labels,
            class_id,
            image_index=i,
            border=cfg.crop_border,
            min_side=cfg.crop_min_side if training_set else 0,
            skip_other_classes=training_set,
            size=cfg.crop_size,
            mask=s.mask,
        )
    return crops


def _flip_crop(item, rng):
    crop, negative = item
    if rng.random() < 0.5:
        S = crop.image.shape[-1]
        x0, y0, x1, y1 = crop.box.tolist()
        crop = dataclasses.replace(
            crop,
            image=crop.image.flip(-1),
            valid=crop.valid.flip(-1),
            border=crop.border.flip(-1),
            box=torch.tensor([S - x1, y0, S - x0, y1]),
            mask=None if crop.mask is None else crop.mask.flip(-1),
        )
    return crop, negative


def _collate(items):
    crops, negative = zip(*items)
    return collate_crops(list(crops)), torch.tensor(negative, dtype=torch.bool)


class _Mixed:
    """Batches of positives, with a share of negatives (other classes' crops) for ours(T+N)."""

    def __init__(self, pos: Batches, neg: Batches | None):
        self.pos, self.neg = pos, neg
        self.global_batch = pos.global_batch + (neg.global_batch if neg else 0)

    def iterate(self, start, stop):
        for step in range(start, stop):
            crops, negative = self.pos.batch(step)
            if self.neg is not None:
                other, other_negative = self.neg.batch(step)
                crops = CropBatch(
                    *(
                        None if a is None or b is None else torch.cat([a, b])
                        for a, b in zip(dataclasses.astuple(crops), dataclasses.astuple(other))
                    )
                )
                negative = torch.cat([negative, other_negative])
            yield crops, negative


def _normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def train_single_class(ctx: Context, setting: str, class_id: int, crops: list[BoxCrop], negatives: list[BoxCrop]):
    """One single-class network of Table 1 (Sec. 4.2)."""
    cfg: Config = ctx.config
    job = f"single/{setting}/class-{class_id}"
    model = ctx.new_model(job, {"logits": 1})
    n_neg = round(cfg.single_batch * cfg.negative_fraction) if setting == "ours(T+N)" and negatives else 0
    pos = Batches(
        [(c, False) for c in crops],
        cfg.single_batch - n_neg,
        cfg.seed * 7919 + class_id,
        collate=_collate,
        augment=_flip_crop,
    )
    neg = None
    if n_neg:
        neg = Batches(
            [(c, True) for c in negatives],
            n_neg,
            cfg.seed * 7919 + 1000 + class_id,
            collate=_collate,
            augment=_flip_crop,
        )
    lambda_crf = cfg.lambda_crf * cfg.crop_size / 256
    steps = cfg.single_steps

    def step(m, batch, clock):
        crops, negative = batch
        t = clock.steps / max(1, steps - 1)
        sigma = cfg.sigma_start + (cfg.sigma - cfg.sigma_start) * min(1.0, t)
        loss_fn = boxloss.RegularizedLoss.paper(
            setting,
            s_min=cfg.s_min,
            lambda_crf=lambda_crf,
            lambda_v=cfg.lambda_v,
            lambda_p=cfg.lambda_p,
            lambda_s=cfg.lambda_s,
            lambda_neg=cfg.lambda_neg,
            sigma=sigma,
            neighbourhood=cfg.neighbourhood,
            tight_mode=cfg.tight_mode,
            distributed=distributed.world_size() > 1,
        )
        images = crops.images.to(ctx.device)
        with clock.model_forward():
            logits = head_outputs(m(images))["logits"]
        clock.watch(logits)
        with clock.loss_forward():
            loss, terms = loss_fn(
                torch.sigmoid(logits),
                _normalise(images),
                negative=negative.to(ctx.device),
                border_mask=crops.border.to(ctx.device),
                boxes=crops.boxes.to(ctx.device),
                valid_mask=crops.valid.to(ctx.device),
                return_terms=True,
            )
        return loss, terms

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.single_lr, weight_decay=1e-4)
    ctx.fit(job, model, step, _Mixed(pos, neg), steps=steps, optimizer=opt, scheduler=poly_schedule(opt, steps))
    return model


@torch.no_grad()
def segment_crops(ctx: Context, model, crops: list[BoxCrop], batch: int = 64) -> torch.Tensor:
    """(N, S, S) object probabilities of the crops."""
    model.eval()
    out = []
    for i in range(0, len(crops), batch):
        images = torch.stack([c.image for c in crops[i : i + batch]]).to(ctx.device)
        out.append(torch.sigmoid(head_outputs(model(images))["logits"][:, 0]).float().cpu())
    model.train()
    return torch.cat(out) if out else torch.zeros(0, 1, 1)


def _window_prediction(prob: torch.Tensor, crop: BoxCrop, threshold: float) -> np.ndarray:
    """A crop's probabilities resized to its window at image resolution, thresholded."""
    y0, x0, y1, x1 = crop.window
    full = F.interpolate(prob[None, None], size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)[0, 0]
    return (full > threshold).numpy()


def _inner(crop: BoxCrop, border: int) -> tuple[slice, slice]:
    y0, x0, y1, x1 = crop.window
    return slice(border, y1 - y0 - border), slice(border, x1 - x0 - border)


def _window_target(sample, crop: BoxCrop) -> np.ndarray:
    """The true mask of the crop's class in its window at image resolution: 1 object, 0 background, 255 void."""
    y0, x0, y1, x1 = crop.window
    H, W = sample.mask.shape
    out = np.full((y1 - y0, x1 - x0), 255, np.uint8)
    sy0, sx0, sy1, sx1 = max(y0, 0), max(x0, 0), min(y1, H), min(x1, W)
    m = sample.mask[sy0:sy1, sx0:sx1]
    out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = np.where(m == 255, 255, (m == crop.label).astype(np.uint8))
    return out


def fbeta_of_crops(samples, crops: list[BoxCrop], predictions: list[np.ndarray], border: int) -> float:
    """Mean F-beta (beta^2 = 0.3, percent) of box segmentations at image resolution, inside each box, void left out."""
    scores = []
    for crop, pred in zip(crops, predictions):
        rows, cols = _inner(crop, border)
        target = torch.from_numpy(_window_target(samples[crop.image_index], crop)[rows, cols])
        p = torch.from_numpy(np.asarray(pred)[rows, cols])
        valid = target != 255
        scores.append(float(boxloss.fbeta_score(p[None].bool(), (target == 1)[None], valid_mask=valid[None])[0]))
    return 100 * float(np.mean(scores)) if scores else float("nan")


# ----------------------------------------------------------------------------------------------------- pipeline


def run(ctx: Context, settings: list[str]) -> None:
    cfg: Config = ctx.config
    splits: Splits = config_splits(cfg, log=ctx.log)
    ctx.log(f"data: {splits.description}")
    L = splits.num_classes
    train = splits.train
    classes = list(range(1, L + 1))

    # Sec. 4.1: the single-class datasets
    single = {c: make_crops(train, c, cfg, training_set=True) for c in classes}
    ctx.log("single-class crops per class: " + ", ".join(f"{c}: {len(single[c])}" for c in classes))

    # Table 1
    networks = {}
    for setting in [s for s in BASELINES + SINGLE if s in settings or (s == "ours(T+N)" and _needs_pseudo(settings))]:
        per_class = []
        for c in classes:
            crops = single[c]
            if not crops:
                continue
            if setting in BASELINES:
                preds = _baseline_predictions(setting, train, crops, L, cfg)
            else:
                negatives = [k for other, cs in single.items() if other != c for k in cs]
                model = train_single_class(ctx, setting, c, crops, negatives)
                networks[(setting, c)] = model
                probs = segment_crops(ctx, model, crops)
                preds = [_window_prediction(p, k, cfg.threshold) for p, k in zip(probs, crops)]
            per_class.append(fbeta_of_crops(train, crops, preds, cfg.crop_border))
        if setting in settings:
            ctx.results.add("1", setting, "fbeta", float(np.mean(per_class)))
            ctx.log(
                f"Table 1 {setting}: F-beta {np.mean(per_class):.2f} (per class "
                f"{', '.join(f'{v:.1f}' for v in per_class)})"
            )

    # Table 2: pseudo ground truth from the best single-class setting trained
    pseudo = {}
    if _needs_pseudo(settings):
        chosen = next(s for s in reversed(SINGLE) if any(k[0] == s for k in networks))
        masks = _box_masks(ctx, train, networks, chosen, cfg, classes)
        for strategy in MERGES:
            labels = _merge(train, masks, strategy, L)
            pseudo[strategy] = labels
            if strategy in settings:
                truth = [torch.from_numpy(s.mask) for s in train]
                miou = label_miou(labels, truth, L)
                new_void = sum(int(((p == 255) & (t != 255)).sum()) for p, t in zip(labels, truth))
                total = sum(t.numel() for t in truth)
                ctx.results.add("2", strategy, "miou", miou)
                ctx.results.add("2", strategy, "void_percent", 100 * new_void / total)
                ctx.log(f"Table 2 {strategy}: mIoU {miou:.2f}, new void {100 * new_void / total:.2f}%")
        _pseudo_figure(ctx, train, pseudo, L)

    # Sec. 5: the final network
    for setting in [s for s in FINAL if s in settings]:
        if setting == "final-box-labels":
            labels = _box_labels(train, L)
        else:
            labels = pseudo["overlap-back-void"]
        model = train_final(ctx, setting, train, labels, L, with_crf=setting == "final")
        cm = segmentation_confusion(model, splits.val, L, device=ctx.device)
        ctx.results.add("final", setting, "miou", miou_percent(cm))
        ctx.log(f"final {setting}: validation mIoU {miou_percent(cm):.2f}")
        networks[setting] = model
    _final_figure(ctx, splits, networks, L)
    if ctx.run.main and (ctx.run.path / "metrics.jsonl").is_file():
        save_loss_curves(ctx.run.file("figures", "loss_curves.png"), ctx.run.path / "metrics.jsonl")


def _needs_pseudo(settings) -> bool:
    return any(s in settings for s in MERGES) or "final" in settings or "final-no-crf" in settings


def _baseline_predictions(setting: str, samples, crops: list[BoxCrop], L: int, cfg: Config) -> list[np.ndarray]:
    cache: dict[int, np.ndarray] = {}
    out = []
    for crop in crops:
        s = samples[crop.image_index]
        y0, x0, y1, x1 = crop.window
        if setting == "box":
            pred = np.zeros((y1 - y0, x1 - x0), bool)
            rows, cols = _inner(crop, cfg.crop_border)
            pred[rows, cols] = True
            out.append(pred)
            continue
        if setting == "grabcut":
            full = boxloss.grabcut_box_masks(s.image, s.boxes[crop.box_index : crop.box_index + 1])[0]
        else:
            if crop.image_index not in cache:
                cache[crop.image_index] = boxloss.dense_crf_box_masks(s.image, s.boxes, s.labels, L)
            full = cache[crop.image_index][crop.box_index]
        H, W = full.shape
        pred = np.zeros((y1 - y0, x1 - x0), bool)
        sy0, sx0, sy1, sx1 = max(y0, 0), max(x0, 0), min(y1, H), min(x1, W)
        pred[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = full[sy0:sy1, sx0:sx1]
        out.append(pred)
    return out


def _box_masks(ctx, samples, networks, setting, cfg, classes) -> list[torch.Tensor]:
    """Sec. 4.3: every box of every training image segmented by its class's network, in image pixels."""
    masks = [torch.zeros((s.num_boxes, s.height, s.width), dtype=torch.bool) for s in samples]
    for c in classes:
        if (setting, c) not in networks:
            continue
        crops = make_crops(samples, c, cfg, training_set=False)
        probs = segment_crops(ctx, networks[(setting, c)], crops)
        for p, crop in zip(probs, crops):
            s = samples[crop.image_index]
            values, covered = paste_crop(p, crop, (s.height, s.width))
            masks[crop.image_index][crop.box_index] = (values > cfg.threshold) & covered
    return masks


def _merge(samples, masks, strategy: str, L: int) -> list[torch.Tensor]:
    out = []
    for s, m in zip(samples, masks):
        if s.num_boxes == 0:
            out.append(torch.zeros(s.height, s.width, dtype=torch.long))
            continue
        boxes = torch.from_numpy(s.boxes)
        out.append(
            boxloss.merge_box_masks(
                m,
                boxes,
                torch.zeros(len(boxes), dtype=torch.long),
                torch.from_numpy(s.labels),
                (1, s.height, s.width),
                strategy=strategy,
                num_classes=L,
            )[0]
        )
    return out


def _box_labels(samples, L: int) -> list[torch.Tensor]:
    return [torch.from_numpy(box_label_map(s, L)).long() for s in samples]


def train_final(ctx: Context, setting: str, samples, labels: list[torch.Tensor], L: int, *, with_crf: bool):
    """Sec. 5: the semantic network on (pseudo) labels, cross-entropy with void ignored (+ the DenseCRF loss)."""
    cfg: Config = ctx.config
    job = f"final/{setting}"
    model = ctx.new_model(job, {"logits": L + 1})
    items = [dataclasses.replace(s, mask=lab.to(torch.uint8).numpy()) for s, lab in zip(samples, labels)]
    batches = Batches(items, cfg.batch_size, cfg.seed, augment=hflip_augment)
    dense = boxloss.DenseCRFLoss(
        sigma_rgb=cfg.dense_sigma_rgb, sigma_xy=cfg.dense_sigma_xy * cfg.image_size / 513, scale_factor=cfg.dense_scale
    )
    steps, crf_from = cfg.final_steps, int(cfg.crf_start * cfg.final_steps)

    def step(m, batch, clock):
        images = batch.images.to(ctx.device)
        target = batch.masks.to(ctx.device).masked_fill(~batch.valid.to(ctx.device), 255)
        with clock.model_forward():
            logits = head_outputs(m(images))["logits"]
        clock.watch(logits)
        with clock.loss_forward():
            ce = F.cross_entropy(logits, target, ignore_index=255)
            terms = {"ce": ce}
            loss = ce
            if with_crf and clock.steps >= crf_from:
                crf = dense(logits.softmax(1), images * 255, valid_mask=batch.valid.to(ctx.device))
                terms["dense_crf"] = crf
                loss = ce + cfg.dense_crf_weight * crf
        return loss, terms

    if cfg.final_optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.final_lr, momentum=0.9, weight_decay=5e-4)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.final_lr, weight_decay=1e-4)
    ctx.fit(job, model, step, batches, steps=steps, optimizer=opt, scheduler=poly_schedule(opt, steps))
    return model


def _pseudo_figure(ctx: Context, samples, pseudo: dict, L: int) -> None:
    if not ctx.run.main:
        return
    n = min(ctx.config.figures, len(samples))
    columns = {k: [v[i].numpy() for i in range(n)] for k, v in pseudo.items()}
    save_sample_panels(
        ctx.run.file("figures", "pseudo_ground_truth.png"),
        [samples[i] for i in range(n)],
        columns,
        num_classes=L,
        title="Table 2: pseudo ground truth on training images (white: void)",
    )


def _final_figure(ctx: Context, splits: Splits, networks: dict, L: int) -> None:
    finals = [k for k in FINAL if k in networks]
    if not ctx.run.main or not finals:
        return
    n = min(ctx.config.figures, len(splits.val))
    val = [splits.val[i] for i in range(n)]
    batch = boxloss.data.collate_samples(val)
    columns = {}
    for k in finals:
        model = networks[k].eval()
        with torch.no_grad():
            columns[k] = list(head_outputs(model(batch.images.to(ctx.device)))["logits"].argmax(1).cpu().numpy())
        model.train()
    save_sample_panels(
        ctx.run.file("figures", "final_predictions.png"),
        val,
        columns,
        num_classes=L,
        title="Sec. 5: final networks on validation images",
    )
