"""What the single-stage trainers share (Box2Seg, learning label uncertainty): one semantic network trained from
boxes in one stage, on per-image training targets fixed before training.

- :func:`load_data`: the config's splits, optionally restricted to a subset of the classes
  (:func:`restrict_classes`: other classes become background, their boxes are dropped, labels renumbered 1..K);
- :class:`TrainItem` and :func:`collate_items`: a sample whose ``mask`` is its training target (labels, 255 void),
  with a flag saying whether that target is pixel-perfect; batches come as :class:`TrainBatch` on the device;
- :func:`train_network`: a network with the given heads trained by a loss function of its outputs and the batch
  (the engine's loop, optimizer and poly schedule);
- :func:`evaluate_confusion`, :func:`object_iou`: scores on held-out images against their true masks;
- :func:`predict_heads`: every head of a network on a few images, for the figures.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

import boxloss
from boxloss.data import Sample, collate_samples
from boxloss.data.transforms import hflip
from boxloss.trainers.engine.config import ConfigError
from boxloss.trainers.engine.context import Context
from boxloss.trainers.engine.data import Splits, config_splits
from boxloss.trainers.engine.evaluate import segmentation_confusion
from boxloss.trainers.engine.loop import poly_schedule
from boxloss.trainers.engine.models import head_outputs

OPTIMIZERS = ("sgd", "adam", "adamw")

# ----------------------------------------------------------------------------------------------------- data


def load_data(ctx: Context, class_ids: Sequence[int] | None = None) -> Splits:
    """The config's training and validation splits; with ``class_ids``, restricted to those classes."""
    cfg = ctx.config
    splits = config_splits(cfg, log=ctx.log)
    if class_ids is None:
        return splits
    return restrict_splits(splits, class_ids)


def restrict_splits(splits: Splits, class_ids: Sequence[int]) -> Splits:
    """``splits`` with only the classes ``class_ids`` (channels of ``splits``), renumbered 1..K in that order."""
    ids = list(class_ids)
    if not ids or len(set(ids)) != len(ids) or not all(1 <= c <= splits.num_classes for c in ids):
        raise ConfigError(
            f"classes must be distinct class channels in 1..{splits.num_classes} "
            f"({', '.join(splits.class_names)}), got {tuple(class_ids)}"
        )
    names = tuple(splits.class_names[c - 1] for c in ids)
    return Splits(
        restrict_classes(splits.train, ids),
        restrict_classes(splits.val, ids),
        names,
        f"{splits.description}, classes {', '.join(names)} (the others are background)",
    )


def restrict_classes(samples: Sequence[Sample], class_ids: Sequence[int]) -> list[Sample]:
    """The samples with only the classes ``class_ids``, renumbered 1..K in that order: other objects become
    background in the masks (void stays void) and their boxes are dropped."""
    lut = np.zeros(256, np.uint8)
    lut[255] = 255
    for k, c in enumerate(class_ids, start=1):
        lut[c] = k
    out = []
    for s in samples:
        keep = np.isin(s.labels, np.asarray(class_ids, np.int64))
        out.append(
            dataclasses.replace(
                s,
                boxes=np.ascontiguousarray(s.boxes[keep]),
                labels=lut[s.labels[keep]].astype(np.int64),
                mask=None if s.mask is None else lut[s.mask],
                instances=None if s.instances is None else _renumber_instances(s.instances, keep),
            )
        )
    return out


def _renumber_instances(instances: np.ndarray, keep: np.ndarray) -> np.ndarray:
    lut = np.zeros(len(keep) + 1, np.int32)
    lut[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[instances]


# ----------------------------------------------------------------------------------------------------- batches


@dataclass
class TrainItem:
    """A training image: ``sample.mask`` is its training target (labels 0..L, 255 void), and ``pixel_perfect``
    says whether that target is a true mask (True) or derived from the boxes (False)."""

    sample: Sample
    pixel_perfect: bool = False


@dataclass
class TrainBatch:
    """A batch on the device: ``images`` (B, 3, H, W) in [0, 1]; ``target`` (B, H, W) int64 with 255 on void and
    padding; ``valid`` (B, H, W) bool (False on padding); the packed boxes; ``pixel_perfect`` (B,) bool."""

    images: torch.Tensor
    target: torch.Tensor
    valid: torch.Tensor
    boxes: torch.Tensor
    box_batch: torch.Tensor
    box_labels: torch.Tensor
    pixel_perfect: torch.Tensor

    def box_tensor(self, num_classes: int, form: str = "onehot") -> torch.Tensor:
        """Box2Seg's B of the batch (:func:`boxloss.boxes_to_masks`, smaller box in front): (B, L+1, H, W) one-hot,
        or with ``form="labels"`` the (B, H, W) label map."""
        B, H, W = self.target.shape
        return boxloss.boxes_to_masks(self.boxes, self.box_batch, self.box_labels, (B, H, W), num_classes, form=form)

    def in_boxes(self, num_classes: int) -> torch.Tensor:
        """(B, H, W) bool: the pixels inside at least one box."""
        return self.box_tensor(num_classes, "labels") > 0


def train_items(
    samples: Sequence[Sample], targets: Sequence[np.ndarray], pixel_perfect: Sequence[bool] | bool = False
) -> list[TrainItem]:
    """One :class:`TrainItem` per sample with ``targets[i]`` ((H, W) uint8) as its training target."""
    flags = [pixel_perfect] * len(samples) if isinstance(pixel_perfect, bool) else list(pixel_perfect)
    if len(targets) != len(samples) or len(flags) != len(samples):
        raise ValueError(f"train_items: {len(samples)} samples, {len(targets)} targets, {len(flags)} flags")
    return [
        TrainItem(dataclasses.replace(s, mask=np.asarray(t, np.uint8)), bool(f))
        for s, t, f in zip(samples, targets, flags)
    ]


def flip_item(item: TrainItem, rng: np.random.Generator) -> TrainItem:
    """A horizontal flip with probability 1/2 (image, target and boxes together)."""
    return TrainItem(hflip(item.sample), item.pixel_perfect) if rng.random() < 0.5 else item


def collate_items(items: Sequence[TrainItem]) -> TrainBatch:
    """Packs :class:`TrainItem` s (on the CPU; :func:`to_device` moves them)."""
    batch = collate_samples([i.sample for i in items])
    target = batch.masks.masked_fill(~batch.valid, 255)
    return TrainBatch(
        batch.images,
        target,
        batch.valid,
        batch.boxes,
        batch.box_batch,
        batch.box_labels,
        torch.tensor([i.pixel_perfect for i in items], dtype=torch.bool),
    )


def to_device(batch: TrainBatch, device) -> TrainBatch:
    return TrainBatch(*(getattr(batch, f.name).to(device) for f in dataclasses.fields(TrainBatch)))


# ----------------------------------------------------------------------------------------------------- training


def make_optimizer(name: str, params, lr: float, *, weight_decay: float) -> torch.optim.Optimizer:
    """SGD (momentum 0.9, DeepLab's), Adam or AdamW."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


LossFn = Callable[[dict, TrainBatch], "tuple[torch.Tensor, dict]"]


def train_network(
    ctx: Context,
    job: str,
    heads: dict[str, int] | None,
    batches,
    loss_fn: LossFn,
    *,
    steps: int,
    optimizer: str,
    lr: float,
    weight_decay: float,
    model: nn.Module | None = None,
) -> nn.Module:
    """Trains a new network with ``heads`` (or the given ``model``) for ``steps`` steps of ``loss_fn(outputs, batch) ->
    (loss, terms)`` on ``batches`` (yielding :class:`TrainBatch` es), with ``optimizer`` and DeepLab's poly decay
    of ``lr``; returns it. A finished job is loaded from its checkpoint, not trained again."""
    if model is None:
        model = ctx.new_model(job, heads)

    def step(m, batch: TrainBatch, clock):
        batch = to_device(batch, ctx.device)
        with clock.model_forward():
            outputs = head_outputs(m(batch.images))
        clock.watch(outputs)
        with clock.loss_forward():
            loss, terms = loss_fn(outputs, batch)
        return loss, terms

    opt = make_optimizer(optimizer, model.parameters(), lr, weight_decay=weight_decay)
    ctx.fit(job, model, step, batches, steps=steps, optimizer=opt, scheduler=poly_schedule(opt, steps))
    return model


# ----------------------------------------------------------------------------------------------------- evaluation


def evaluate_confusion(
    ctx: Context,
    model: nn.Module,
    samples: Sequence[Sample],
    num_classes: int,
    *,
    predict: Callable[[dict], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(L+1, L+1) confusion matrix on ``samples`` against their true masks (void left out). ``predict(outputs)``
    maps the network's heads to (B, H, W) labels (default: the argmax of ``"logits"``)."""
    if predict is None:
        return segmentation_confusion(model, samples, num_classes, device=ctx.device)

    def labels(m, images):
        was = m.training
        m.eval()
        with torch.no_grad():
            out = predict(head_outputs(m(images.to(ctx.device))))
        m.train(was)
        return out

    return segmentation_confusion(model, samples, num_classes, device=ctx.device, predict=labels)


def object_iou(cm: torch.Tensor, channel: int = 1) -> float:
    """IoU in percent of one class of a confusion matrix (rows: truth, columns: prediction)."""
    tp = float(cm[channel, channel])
    union = float(cm[channel].sum() + cm[:, channel].sum()) - tp
    return round(100 * tp / union, 2) if union else float("nan")


@torch.no_grad()
def predict_heads(ctx: Context, model: nn.Module, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
    """Every head of ``model`` on ``samples`` (eval mode, on the CPU)."""
    was = model.training
    model.eval()
    batch = collate_samples(list(samples))
    out = {k: v.float().cpu() for k, v in head_outputs(model(batch.images.to(ctx.device))).items()}
    model.train(was)
    return out
