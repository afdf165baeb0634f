"""Box2Seg: Kulharia, Chandra, Agrawal, Torr and Tyagi, "Box2Seg: Attention Weighted Loss and Discriminative Feature
Learning for Weakly Supervised Segmentation", ECCV 2020.

The pipeline, as the paper's Sec. 3-4:

1. Sec. 3.1, the pseudo ground truth M: GrabCut inside every training box (:func:`boxloss.grabcut_box_masks`),
   the boxes' masks merged into one label map with the smaller box in front, as the box tensor B is
   (:func:`boxloss.merge_box_masks`, ``overlap-small``). Computed once per image and kept in a cache beside the run
   (:func:`grabcut_labels`), keyed by a hash of the images, boxes and GrabCut settings.
2. Sec. 3.1, one network with three outputs: the segmentation ``y`` (softmax over L + 1 classes), the per-class
   attention ``alpha`` (sigmoid, Sec. 3.3) and the pixel embeddings ``beta`` (Sec. 3.4). The paper puts three
   two-layer decoders on a ResNet-101 encoder; here the engine's small U-Net shares its decoder and each output is a
   1 x 1 head, so a CPU trains it in minutes.
3. Sec. 4.1, the embeddings are first pre-trained with the affinity loss on M (Eq. 10 with M in place of y), then
   the whole network is trained with the loss of its Table 3 row:

   ============  ==============================================================================
   ``box``       L_box (Eq. 1): cross-entropy on the box tensor B
   ``grabcut``   L_GC (Eq. 2): cross-entropy on M
   ``affinity``  L_GC + lambda_A L_A (Eq. 9-10), from the pre-trained embeddings
   ``aw-box``    L_GC + lambda_AW L_AW (Eq. 3-5) + lambda_alpha L^bbox_alpha (Eq. 6)
   ``aw-fr``     L_GC + lambda_AW L_AW + lambda_alpha L^fr_alpha (the fill-rate hinge, Eq. 7-8)
   ``box2seg``   all of Eq. 11 (:class:`boxloss.Box2SegLoss`), from the pre-trained embeddings
   ============  ==============================================================================

4. Table 3 scores each network's mIoU on the validation images, beside ``grabcut-no-train`` (GrabCut on the
   validation images' own boxes, no network: the paper's GrabCut-NoTrain-GT of Sec. 4.2).

Two choices where the paper leaves room: L_A is the library's mean over pixel pairs (the paper writes a sum over
pairs, whose size changes with the sample; its weight 1 can only apply to a normalised loss), over the paper's
class-balanced 10% sample; and L^bbox_alpha is the paper's sum over pixels and classes, so with weight 1 it
dominates the other terms, as the paper says it forces the attention to the box's shape.
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import boxloss
from boxloss.data import Sample
from boxloss.trainers.engine import checkpoint, distributed
from boxloss.trainers.engine.config import ConfigError, TrainerConfig
from boxloss.trainers.engine.context import Context
from boxloss.trainers.engine.data import Batches, box_label_map
from boxloss.trainers.engine.evaluate import label_miou, miou_percent
from boxloss.trainers.engine.figures import save_loss_curves, save_sample_panels
from boxloss.trainers.single_stage import (
    OPTIMIZERS,
    TrainBatch,
    collate_items,
    evaluate_confusion,
    flip_item,
    load_data,
    predict_heads,
    train_items,
    train_network,
)

NAME = "box2seg"
SUMMARY = "Box2Seg (Kulharia et al., ECCV 2020): GrabCut pseudo labels, attention-weighted and affinity losses"
TRAINED = ("box", "grabcut", "affinity", "aw-box", "aw-fr", "box2seg")
SETTINGS = {
    "grabcut-no-train": "Sec. 4.2: GrabCut on the validation boxes, no network (GrabCut-NoTrain-GT)",
    "box": "Table 3: L_box, cross-entropy on the boxes (Eq. 1)",
    "grabcut": "Table 3: L_GC, cross-entropy on the GrabCut pseudo labels (Eq. 2)",
    "affinity": "Table 3: L_GC + L_A, the pixel-embedding affinity loss (Eq. 9-10)",
    "aw-box": "Table 3: L_GC + L_AW (Eq. 3-5) + the box regulariser of the attention (Eq. 6)",
    "aw-fr": "Table 3: L_GC + L_AW + the fill-rate hinge on the attention (Eq. 7-8)",
    "box2seg": "Table 3: all of Eq. 11, L_GC + 10 L_AW + L_alpha(fill rate) + L_A",
}
#: the Table 3 rows that use the pixel embeddings (and so start from their pre-training, Sec. 4.1)
WITH_AFFINITY = ("affinity", "box2seg")
WITH_ATTENTION = ("aw-box", "aw-fr", "box2seg")
#: Bumped when this module changes the pseudo labels it makes from the same images, boxes and settings, so old
#: cache files are not reused (library changes are caught by :func:`library_fingerprint`).
GRABCUT_CACHE_VERSION = 2


@dataclass
class Config(TrainerConfig):
    # Sec. 4.1: training
    steps: int = 26455  # Sec. 4.1: 40 epochs of VOC's 10,582 images; the batch size is not in the paper (16 here)
    lr: float = 1e-4  # Sec. 4.1
    optimizer: str = "sgd"  # Sec. 4.1: SGD, momentum 0.9, polynomial decay as DeepLab
    weight_decay: float = 5e-4  # Sec. 4.1
    # Eq. 11 and Sec. 3.3-3.4
    lambda_aw: float = 10.0  # Sec. 4.1
    lambda_alpha: float = 1.0  # Sec. 4.1
    lambda_a: float = 1.0  # Sec. 4.1
    gamma: float = 0.7  # Sec. 3.3, the fill-rate margin
    affinity_mode: str = "sampled"  # Sec. 3.4: pixels sampled equally from each class ("exact": all pairs)
    sample_fraction: float = 0.1  # Sec. 4.1: 10% of the pixels
    embedding_dim: int = 32  # d of Sec. 3.1; not in the paper
    embedding_pretrain_steps: int = 2000  # Sec. 4.1 pre-trains the embeddings on M; its length is not in the paper
    # Sec. 3.1: GrabCut
    grabcut_iterations: int = 5  # not in the paper (OpenCV's usual count)
    #: folder of the GrabCut pseudo-label cache ("": a folder "grabcut-cache" beside the run directory)
    grabcut_cache: str = ""
    figures: int = 6  # validation images in the figures

    PRESET_OVERRIDES = {
        "paper": {"image_size": 513},
        # the sampled affinity loss costs O((fraction m)^2 d) per image: 5% of 96 x 96 pixels and d = 16 keep it
        # near the cost of the network (10% and d = 32 cost three times as much)
        "quick": {
            "image_size": 96,
            "train_images": 600,
            "val_images": 150,
            "batch_size": 16,
            "steps": 400,
            "lr": 1e-3,
            "optimizer": "adamw",
            "weight_decay": 1e-4,
            "embedding_pretrain_steps": 60,
            "sample_fraction": 0.05,
            "embedding_dim": 16,
        },
    }


def check_config(cfg: Config) -> None:
    """Raise :class:`ConfigError` naming a setting that cannot work (before any GrabCut or training)."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")
    if cfg.affinity_mode not in ("exact", "sampled"):
        raise ConfigError(f"affinity_mode must be 'exact' or 'sampled', got {cfg.affinity_mode!r}")
    if not 0 < cfg.sample_fraction <= 1:
        raise ConfigError(f"sample_fraction must lie in (0, 1], got {cfg.sample_fraction}")
    if not 0 <= cfg.gamma <= 1:
        raise ConfigError(f"gamma must lie in [0, 1] (Sec. 3.3), got {cfg.gamma}")
    if cfg.embedding_dim < 1 or cfg.grabcut_iterations < 1:
        raise ConfigError(
            f"embedding_dim and grabcut_iterations must be at least 1, got {cfg.embedding_dim} and "
            f"{cfg.grabcut_iterations}"
        )
    if cfg.steps < 1 or cfg.embedding_pretrain_steps < 0:
        raise ConfigError(
            f"steps must be at least 1 and embedding_pretrain_steps at least 0, got {cfg.steps} and "
            f"{cfg.embedding_pretrain_steps}"
        )


# ----------------------------------------------------------------------------------------------------- GrabCut


def _grabcut_image(sample, num_classes: int, iterations: int) -> tuple[np.ndarray, int]:
    """M of one image (Sec. 3.1) and the number of boxes GrabCut could not segment (filled instead)."""
    H, W = sample.height, sample.width
    if sample.num_boxes == 0:
        return np.zeros((H, W), np.uint8), 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        masks = boxloss.grabcut_box_masks(sample.image, sample.boxes, iterations=iterations)
    filled = 0
    for w in caught:
        text = str(w.message)
        if "were filled instead" in text:
            filled += int(text.split(": ", 1)[1].split(" of ")[0])
    labels = boxloss.merge_box_masks(
        masks,
        torch.from_numpy(sample.boxes),
        torch.zeros(sample.num_boxes, dtype=torch.long),
        torch.from_numpy(sample.labels),
        (1, H, W),
        strategy="overlap-small",
        num_classes=num_classes,
    )[0]
    return labels.to(torch.uint8).numpy(), filled


def _probe():
    """A fixed 48 x 48 scene for :func:`library_fingerprint`: a disc and a rectangle on a noisy gradient, boxes with
    fractional corners that overlap (the smaller in front) and one too small for GrabCut (filled)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:48]
    image = np.stack([xx * 3, yy * 3, (xx + yy) * 2], -1).astype(float) + rng.normal(0, 12, (48, 48, 3))
    image[(yy - 20) ** 2 + (xx - 18) ** 2 < 100] = (220, 40, 60)
    image[30:42, 24:44] = (40, 60, 210)
    sample = Sample(
        image=np.clip(image, 0, 255).astype(np.uint8),
        boxes=np.array([[5.5, 7.0, 31.5, 33.0], [20.0, 26.0, 47.0, 45.5], [40.0, 2.0, 42.0, 4.0]], np.float32),
        labels=np.array([1, 2, 1], np.int64),
        mask=None,
        image_id="grabcut-probe",
    )
    return sample


@functools.cache
def library_fingerprint(iterations: int) -> str:
    """What the pseudo labels depend on besides the images, boxes and settings: the versions of OpenCV and
    boxloss, and M of a fixed probe scene (:func:`_probe`), so that a change in either library that changes what
    GrabCut or the merge return misses the cache instead of reading labels the code no longer makes."""
    import cv2

    labels, filled = _grabcut_image(_probe(), 2, iterations)
    h = hashlib.sha256(f"{cv2.__version__} {boxloss.__version__} {filled}".encode())
    h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()[:16]


def _chunk_key(samples, num_classes: int, iterations: int) -> str:
    """A hash of what a chunk of pseudo labels depends on: the images, boxes and labels, the settings and the
    libraries (:func:`library_fingerprint`)."""
    h = hashlib.sha256(
        json.dumps(
            {
                "version": GRABCUT_CACHE_VERSION,
                "iterations": iterations,
                "num_classes": num_classes,
                "merge": "overlap-small",
                "libraries": library_fingerprint(iterations),
            },
            sort_keys=True,
        ).encode()
    )
    for s in samples:
        for a in (s.image, s.boxes, s.labels):
            a = np.ascontiguousarray(a)
            h.update(repr((a.dtype.str, a.shape)).encode())
            h.update(a.tobytes())
    return h.hexdigest()[:24]


def cache_folder(ctx: Context) -> Path:
    """Where the GrabCut pseudo labels are kept: ``grabcut_cache``, or a folder beside the run directory (shared by
    the seeds of a ``--seeds`` run and by later runs beside it)."""
    return Path(ctx.config.grabcut_cache) if ctx.config.grabcut_cache else ctx.run.path.parent / "grabcut-cache"


def grabcut_labels(ctx: Context, samples, num_classes: int, what: str, *, chunk: int = 100) -> list[np.ndarray]:
    """M for every sample ((H, W) uint8 label maps), from the cache where it holds them.

    The samples are cached in chunks of ``chunk`` images, each file named by a hash of what it depends on
    (:func:`_chunk_key`): a second run on the same data reuses every chunk, a changed image, box or setting misses.
    Only the main process computes; the others read its files."""
    cfg: Config = ctx.config
    folder = cache_folder(ctx)
    out: list[np.ndarray] = []
    computed = filled = 0
    for start in range(0, len(samples), chunk):
        part_samples = [samples[i] for i in range(start, min(start + chunk, len(samples)))]
        path = folder / f"{_chunk_key(part_samples, num_classes, cfg.grabcut_iterations)}.pt"
        part = _read_chunk(path, part_samples, num_classes)
        if part is None and distributed.is_main():
            results = [_grabcut_image(s, num_classes, cfg.grabcut_iterations) for s in part_samples]
            part = [m for m, _ in results]
            filled += sum(f for _, f in results)
            computed += len(part)
            checkpoint.atomic_save([torch.from_numpy(m) for m in part], path)
        distributed.barrier()
        if part is None:
            part = _read_chunk(path, part_samples, num_classes)
        out += part
    note = f", {filled} boxes too small for GrabCut filled" if filled else ""
    ctx.log(
        f"GrabCut pseudo labels of {len(samples)} {what} images: {computed} computed{note}, "
        f"{len(samples) - computed} read from {folder}"
    )
    return out


def _read_chunk(path: Path, samples, num_classes: int) -> list[np.ndarray] | None:
    """The label maps of a cache file, or None when it is missing or does not hold one uint8 map of labels
    0..num_classes per sample (a damaged or foreign file is recomputed, never trusted)."""
    if not path.is_file():
        return None
    try:
        part = checkpoint.load(path)
    except checkpoint.CheckpointError:
        return None
    if (
        not isinstance(part, list)
        or len(part) != len(samples)
        or any(
            not isinstance(m, torch.Tensor)
            or m.dtype != torch.uint8
            or tuple(m.shape) != (s.height, s.width)
            or (m.numel() and int(m.max()) > num_classes)
            for m, s in zip(part, samples)
        )
    ):
        return None
    return [m.numpy() for m in part]


# ----------------------------------------------------------------------------------------------------- losses


def heads_of(setting: str, cfg: Config, L: int) -> dict[str, int]:
    """The outputs a Table 3 row trains (the others would get no gradient)."""
    heads = {"logits": L + 1}
    if setting in WITH_ATTENTION:
        heads["attention"] = L
    if setting in WITH_AFFINITY:
        heads["embedding"] = cfg.embedding_dim
    return heads


def table3_loss(setting: str, cfg: Config, L: int):
    """The loss of a Table 3 row: ``loss(outputs, batch) -> (total, terms)``, with ``batch.target`` = M."""
    box2seg = boxloss.Box2SegLoss(
        lambda_aw=cfg.lambda_aw,
        lambda_alpha=cfg.lambda_alpha,
        lambda_a=cfg.lambda_a,
        gamma=cfg.gamma,
        alpha_regulariser="fill-rate",
        affinity_mode=cfg.affinity_mode,
        sample_fraction=cfg.sample_fraction,
    )

    def affinity(out, y, batch):
        return boxloss.affinity_loss(
            out["embedding"], y, mode=cfg.affinity_mode, sample_fraction=cfg.sample_fraction, valid_mask=batch.valid
        )

    def loss(out: dict, batch: TrainBatch):
        y = out["logits"].softmax(1)  # Sec. 3.1: y = Softmax(S(I))
        B = batch.box_tensor(L)  # Sec. 3.1: the box tensor, the smaller box in front
        M = batch.target  # Sec. 3.1: the GrabCut pseudo labels (void 255)
        if setting == "box":
            terms = {"box": boxloss.box_ce_loss(y, B)}
            return terms["box"], terms
        if setting == "box2seg":
            alpha = torch.sigmoid(out["attention"])  # Sec. 3.1: alpha = sigmoid(S(I))
            return box2seg(y, alpha, out["embedding"], B, M, valid_mask=batch.valid, return_terms=True)
        terms = {"gc": boxloss.pseudo_label_ce_loss(y, M)}
        total = terms["gc"]
        if setting == "affinity":
            terms["affinity"] = affinity(out, y, batch)
            total = total + cfg.lambda_a * terms["affinity"]
        elif setting in ("aw-box", "aw-fr"):
            alpha = torch.sigmoid(out["attention"])
            terms["aw"] = boxloss.attention_weighted_loss(y, alpha, B)
            terms["alpha"] = (
                boxloss.attention_box_regulariser(alpha, B)
                if setting == "aw-box"
                else boxloss.fill_rate_hinge_loss(alpha, M, B, gamma=cfg.gamma)
            )
            total = total + cfg.lambda_aw * terms["aw"] + cfg.lambda_alpha * terms["alpha"]
        return total, terms

    return loss


def pretrain_embeddings(ctx: Context, items, L: int):
    """Sec. 4.1: the encoder and the embedding branch trained with the affinity loss on M (Eq. 10, M in place of
    y), pixels sampled equally from each class of M."""
    cfg: Config = ctx.config

    def loss(out, batch: TrainBatch):
        known = batch.valid & (batch.target != 255)
        labels = batch.target.masked_fill(~known, 0)
        m = F.one_hot(labels, L + 1).permute(0, 3, 1, 2).float()
        value = boxloss.affinity_loss(
            out["embedding"],
            m,
            mode=cfg.affinity_mode,
            sample_fraction=cfg.sample_fraction,
            valid_mask=known,
            labels=labels,
        )
        return value, {"affinity": value}

    batches = Batches(items, cfg.batch_size, cfg.seed, collate=collate_items, augment=flip_item)
    return train_network(
        ctx,
        "embedding-pretrain",
        {"embedding": cfg.embedding_dim},
        batches,
        loss,
        steps=cfg.embedding_pretrain_steps,
        optimizer=cfg.optimizer,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
    )


def train_setting(ctx: Context, setting: str, items, L: int, pretrained_embedding=None):
    cfg: Config = ctx.config
    job = f"table3/{setting}"
    model = ctx.new_model(job, heads_of(setting, cfg, L))
    if pretrained_embedding is not None:
        missing, unexpected = model.load_state_dict(pretrained_embedding.state_dict(), strict=False)
        new = sorted({k.split(".")[1] for k in missing})
        if unexpected or any(not k.startswith("out.") for k in missing):
            raise RuntimeError(
                f"[{job}] the pre-trained embedding network does not match: missing {missing}, unexpected {unexpected}"
            )
        ctx.log(
            f"[{job}] encoder, decoder and embedding head from the embedding pre-training; new heads: {', '.join(new)}"
        )
    batches = Batches(items, cfg.batch_size, cfg.seed, collate=collate_items, augment=flip_item)
    return train_network(
        ctx,
        job,
        None,
        batches,
        table3_loss(setting, cfg, L),
        steps=cfg.steps,
        optimizer=cfg.optimizer,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        model=model,
    )


# ----------------------------------------------------------------------------------------------------- pipeline


def run(ctx: Context, settings: list[str]) -> None:
    cfg: Config = ctx.config
    check_config(cfg)
    splits = load_data(ctx)
    ctx.log(f"data: {splits.description}")
    L = splits.num_classes
    trained = [s for s in TRAINED if s in settings]
    truth_train = [torch.from_numpy(s.mask) for s in splits.train] if splits.train[0].mask is not None else None

    # Sec. 3.1: M on the training images (every trained row but "box" uses it; "box" trains on B alone)
    if any(s != "box" for s in trained):
        M = grabcut_labels(ctx, splits.train, L, "training")
        if truth_train is not None:
            miou = label_miou([torch.from_numpy(m) for m in M], truth_train, L)
            ctx.results.notes.append(f"GrabCut pseudo labels M on the training images: mIoU {miou:.2f}")
            ctx.log(f"GrabCut pseudo labels M on the training images: mIoU {miou:.2f}")
    else:
        M = [box_label_map(s, L) for s in splits.train]
    items = train_items(splits.train, M)

    # Sec. 4.2: GrabCut-NoTrain-GT on the validation images
    val_grabcut = None
    if "grabcut-no-train" in settings or (ctx.run.main and cfg.figures):
        val_grabcut = grabcut_labels(ctx, splits.val, L, "validation")
    if "grabcut-no-train" in settings:
        miou = label_miou([torch.from_numpy(m) for m in val_grabcut], [torch.from_numpy(s.mask) for s in splits.val], L)
        ctx.results.add("3", "grabcut-no-train", "miou", miou)
        ctx.log(f"Table 3 grabcut-no-train: validation mIoU {miou:.2f}")

    # Sec. 4.1: the embeddings pre-trained on M, for the rows that use them
    embedding = (
        pretrain_embeddings(ctx, items, L)
        if any(s in WITH_AFFINITY for s in trained) and cfg.embedding_pretrain_steps > 0
        else None
    )

    networks = {}
    for setting in trained:
        model = train_setting(ctx, setting, items, L, embedding if setting in WITH_AFFINITY else None)
        miou = miou_percent(evaluate_confusion(ctx, model, splits.val, L))
        ctx.results.add("3", setting, "miou", miou)
        ctx.log(f"Table 3 {setting}: validation mIoU {miou:.2f}")
        networks[setting] = model

    if ctx.run.main:
        attention_figure(ctx, splits, networks, val_grabcut, L)
        if (ctx.run.path / "metrics.jsonl").is_file():
            save_loss_curves(ctx.run.file("figures", "loss_curves.png"), ctx.run.path / "metrics.jsonl")


def attention_figure(ctx: Context, splits, networks: dict, val_grabcut, L: int) -> None:
    """The paper's Fig. 4 and 7: validation images with their boxes, GrabCut's M, and per trained row its attention
    alpha (at each pixel, alpha of the class of the box in front; 0 outside the boxes) beside its prediction."""
    n = min(ctx.config.figures, len(splits.val))
    if n == 0 or not (networks or val_grabcut is not None):
        return
    val = [splits.val[i] for i in range(n)]
    box_labels = torch.from_numpy(np.stack([box_label_map(s, L) for s in val])).long()
    columns = {}
    if val_grabcut is not None:
        columns["GrabCut M"] = [val_grabcut[i] for i in range(n)]
    for setting, model in networks.items():
        out = predict_heads(ctx, model, val)
        if "attention" in out:
            alpha = torch.sigmoid(out["attention"])
            at_box = alpha.gather(1, (box_labels - 1).clamp_min(0)[:, None])[:, 0] * (box_labels > 0)
            columns[f"{setting} alpha"] = list(at_box.numpy())
        columns[setting] = list(out["logits"].argmax(1).numpy())
    save_sample_panels(
        ctx.run.file("figures", "attention.png"),
        val,
        columns,
        num_classes=L,
        title="Box2Seg Table 3 rows on validation images: attention alpha (box class) beside the prediction",
    )
