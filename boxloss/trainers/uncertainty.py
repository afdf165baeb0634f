"""Learning label uncertainty: Neven, Neven, De Brabandere, Proesmans and Goedemé, "Weakly-Supervised Semantic
Segmentation by Learning Label Uncertainty" (2021).

Mixed supervision, as the paper's Sec. 3.2 and 4: a fixed subset of the training images keeps its pixel-perfect
masks (PP; ``pixel_perfect_fraction``, the paper's 500 of 2780), the others only their boxes (BB, the box painted as
the target). Mixed batches draw each image from the PP subset with probability ``pp_probability`` (25%, Sec.
4.1.1), else from the BB images. On a PP image every pixel gets the plain loss; on a BB image the pixels inside the
boxes get the loss with uncertainty, which learns a high variance where the box label is wrong (the PP images
contradict it there), and online bootstrapping flips the target where the variance exceeds tau (Sec. 3.3).

Binary (one class against the background, Sec. 4.1, Tables 1 and 2; network heads: the logit mean ``mu`` and its
log-variance): ``bce-all-pp`` (every image PP), ``bce-pp`` (the PP subset alone), ``bce-bb`` (boxes alone),
``bce-pp+bb`` (PP + BB, plain BCE), ``uncertainty`` (BCE with uncertainty, Eq. 8-9), ``uncertainty+bootstrap``
(plus Eq. 10-11) and ``regression-fg`` (the L2 loss with uncertainty inside the boxes, Eq. 2-3). Metric: the IoU
of the object class on the validation images.

Multi-class (Sec. 4.2, Table 3; per-class means and log-variances): ``ce-all-pp``, ``ce-pp``, ``ce-pp+bb`` and
``uncertainty-ce`` (Monte Carlo cross-entropy over T = 20 Gaussian logit samples with the flip of Eq. 16).
Metric: mIoU. The paper uses two classes (car, person) and reports instability beyond three classes;
``multi_classes`` chooses the synthetic classes (``--set multi_classes=1,2,3,4,5,6`` for all of them).

The paper trains ERFNet on 1024 x 512 CityScapes images; here the engine's small U-Net on the synthetic benchmark,
one class (``binary_class``) or a few (``multi_classes``) against a background that holds the other classes'
objects. The paper's loss needs its pixel-perfect images: without them nothing contradicts the box labels, and
the trainer refuses the settings that mix PP and BB unless ``allow_no_pixel_perfect`` is set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import boxloss
from boxloss.trainers.engine import distributed
from boxloss.trainers.engine.config import ConfigError, TrainerConfig
from boxloss.trainers.engine.context import Context, job_seed
from boxloss.trainers.engine.data import Batches, Splits, box_label_map
from boxloss.trainers.engine.evaluate import miou_percent
from boxloss.trainers.engine.figures import save_loss_curves, save_sample_panels
from boxloss.trainers.single_stage import (
    OPTIMIZERS,
    TrainBatch,
    collate_items,
    evaluate_confusion,
    flip_item,
    load_data,
    object_iou,
    predict_heads,
    restrict_splits,
    train_items,
    train_network,
)

NAME = "uncertainty"
SUMMARY = (
    "Learning label uncertainty (Neven et al.): BCE / CE with uncertainty and online bootstrapping on mixed "
    "pixel-perfect and box labels"
)
BINARY = ("bce-all-pp", "bce-pp", "bce-bb", "bce-pp+bb", "uncertainty", "uncertainty+bootstrap", "regression-fg")
MULTI = ("ce-all-pp", "ce-pp", "ce-pp+bb", "uncertainty-ce")
SETTINGS = {
    "bce-all-pp": "Table 2: BCE, every training image pixel-perfect",
    "bce-pp": "Table 2: BCE on the pixel-perfect subset alone",
    "bce-bb": "Table 2: BCE on the boxes alone",
    "bce-pp+bb": "Table 2: BCE on the pixel-perfect subset and the boxes (mixed batches)",
    "uncertainty": "Table 2: BCE with uncertainty (Eq. 8-9) inside the boxes, PP + BB",
    "uncertainty+bootstrap": "Table 2: BCE with uncertainty and online bootstrapping (Eq. 8-11, tau 2.5), PP + BB",
    "regression-fg": "Table 1: the regression loss with uncertainty inside the boxes only (Eq. 2-3), PP + BB",
    "ce-all-pp": "Table 3: cross-entropy, every training image pixel-perfect",
    "ce-pp": "Table 3: cross-entropy on the pixel-perfect subset alone",
    "ce-pp+bb": "Table 3: cross-entropy on the pixel-perfect subset and the boxes (mixed batches)",
    "uncertainty-ce": "Table 3: cross-entropy with uncertainty and bootstrapping (Eq. 12-16, T = 20), PP + BB",
}
#: how each setting is supervised: every image PP, the PP subset alone, every image BB, or mixed batches
SUPERVISION = {
    "bce-all-pp": "all-pp",
    "bce-pp": "pp",
    "bce-bb": "bb",
    "bce-pp+bb": "mixed",
    "uncertainty": "mixed",
    "uncertainty+bootstrap": "mixed",
    "regression-fg": "mixed",
    "ce-all-pp": "all-pp",
    "ce-pp": "pp",
    "ce-pp+bb": "mixed",
    "uncertainty-ce": "mixed",
}
WITH_VARIANCE = ("uncertainty", "uncertainty+bootstrap", "regression-fg", "uncertainty-ce")
TABLE = {**{s: "2" for s in BINARY}, "regression-fg": "1", **{s: "3" for s in MULTI}}


@dataclass
class Config(TrainerConfig):
    # Sec. 4.1: the network's training
    steps: int = 20000  # not in the paper
    lr: float = 5e-4  # Sec. 4.1: Adam, learning rate 5e-4
    optimizer: str = "adam"  # Sec. 4.1
    weight_decay: float = 0.0  # not in the paper
    batch_size: int = 8  # Sec. 4.1.1
    # Sec. 4.1: mixed supervision
    pixel_perfect_fraction: float = 500 / 2780  # Tables 1-3: 500 pixel-perfect and 2280 box images
    pp_probability: float = 0.25  # Sec. 4.1.1: each batch image is pixel-perfect with probability 25%
    #: run the PP + BB settings without pixel-perfect images (a warning instead of an error; see the docstring)
    allow_no_pixel_perfect: bool = False
    # Sec. 3.3 and 4.1.2: bootstrapping
    tau: float = 2.5  # Sec. 4.1.2: the threshold on sigma^2
    temperature: float = 0.2  # Eq. 11
    # Sec. 4.2: multi-class
    samples: int = 20  # Sec. 4.2 and 5: T = 20 samples
    tau_ce: float = 2.5  # Eq. 16's threshold; its value is not in the paper (the binary one)
    # The classes (the paper's are CityScapes cars, and cars and persons). Binary: a class of middling fill rate
    # (mask area / box area: 0.61 for class 3 where the benchmark's classes span 0.34-0.86), so that the box labels
    # are wrong on a fair share of their pixels. Multi-class: two object classes as Sec. 4.2, the blockiest and the
    # thinnest (fill rates 0.86 and 0.34), as cars and persons are.
    binary_class: int = 3
    multi_classes: tuple[int, ...] = (1, 2)
    figures: int = 6  # training images in the figures

    PRESET_OVERRIDES = {
        "paper": {"image_size": 512},
        "quick": {"image_size": 96, "train_images": 600, "val_images": 150, "batch_size": 16, "steps": 300},
    }


def check_config(cfg: Config, num_classes: int) -> None:
    """Raise :class:`ConfigError` naming the setting that cannot work."""
    if not 0 <= cfg.pixel_perfect_fraction <= 1:
        raise ConfigError(f"pixel_perfect_fraction must lie in [0, 1], got {cfg.pixel_perfect_fraction}")
    if not 0 <= cfg.pp_probability <= 1:
        raise ConfigError(f"pp_probability must lie in [0, 1], got {cfg.pp_probability}")
    if cfg.samples < 1:
        raise ConfigError(f"samples must be at least 1, got {cfg.samples}")
    if cfg.tau_ce <= 0 or cfg.temperature <= 0:
        raise ConfigError(f"tau_ce and temperature must be positive, got {cfg.tau_ce} and {cfg.temperature}")
    if not 1 <= cfg.binary_class <= num_classes:
        raise ConfigError(f"binary_class must be a class channel in 1..{num_classes}, got {cfg.binary_class}")
    if cfg.steps < 1:
        raise ConfigError(f"steps must be at least 1, got {cfg.steps}")
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")


# ----------------------------------------------------------------------------------------------------- batches


class MixedBatches:
    """The paper's mixed batches (Sec. 4.1.1): each image of a batch comes from the pixel-perfect items with
    probability ``probability``, else from the box items, drawn uniformly from its pool. A function of (seed, step)
    like :class:`~boxloss.trainers.engine.data.Batches`, so a resumed run sees the same batches; under ``torchrun``
    process r takes its share of the global batch. An empty pool is never drawn from."""

    def __init__(self, pixel_perfect, boxes, batch_size: int, seed: int, probability: float, *, collate, augment):
        if not pixel_perfect and not boxes:
            raise ValueError("MixedBatches: both pools are empty")
        self.pools = (list(pixel_perfect), list(boxes))
        self.batch_size, self.seed, self.collate, self.augment = int(batch_size), int(seed), collate, augment
        self.probability = 1.0 if not boxes else 0.0 if not pixel_perfect else float(probability)

    @property
    def global_batch(self) -> int:
        return self.batch_size * distributed.world_size()

    def items(self, step: int) -> list:
        rng = np.random.default_rng([self.seed, step])
        g = self.global_batch
        from_pp = rng.random(g) < self.probability
        picks = [rng.integers(len(pool), size=g) if pool else np.zeros(g, np.int64) for pool in self.pools]
        items = [self.pools[0][picks[0][i]] if from_pp[i] else self.pools[1][picks[1][i]] for i in range(g)]
        r = distributed.rank()
        return items[r * self.batch_size : (r + 1) * self.batch_size]

    def batch(self, step: int):
        items = self.items(step)
        r = distributed.rank()
        items = [
            self.augment(it, np.random.default_rng([self.seed, step, r * self.batch_size + i]))
            for i, it in enumerate(items)
        ]
        return self.collate(items)

    def iterate(self, start: int, stop: int):
        for step in range(start, stop):
            yield self.batch(step)


def pixel_perfect_subset(cfg: Config, n: int) -> np.ndarray:
    """(n,) bool: the training images that keep their masks, a fixed random subset of ``pixel_perfect_fraction``
    of them drawn from the training seed."""
    count = int(round(cfg.pixel_perfect_fraction * n))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(job_seed(cfg.seed, "pixel-perfect subset")))
    chosen = np.zeros(n, bool)
    chosen[order[:count].numpy()] = True
    return chosen


def batches_for(ctx: Context, setting: str, splits: Splits, chosen: np.ndarray, num_classes: int):
    """The training batches of ``setting``: PP images carry their true masks, BB images their boxes painted as
    labels (the smaller box in front)."""
    cfg: Config = ctx.config
    train = splits.train
    pp = train_items(train, [s.mask for s in train], True)
    bb = train_items(train, [box_label_map(s, num_classes) for s in train], False)
    kind = SUPERVISION[setting]
    common = dict(collate=collate_items, augment=flip_item)
    if kind == "all-pp":
        return Batches(pp, cfg.batch_size, cfg.seed, **common)
    if kind == "pp":
        return Batches([it for it, c in zip(pp, chosen) if c], cfg.batch_size, cfg.seed, **common)
    if kind == "bb":
        return Batches(bb, cfg.batch_size, cfg.seed, **common)
    return MixedBatches(
        [it for it, c in zip(pp, chosen) if c],
        [it for it, c in zip(bb, chosen) if not c],
        cfg.batch_size,
        cfg.seed,
        cfg.pp_probability,
        **common,
    )


# ----------------------------------------------------------------------------------------------------- losses


def binary_loss(setting: str, cfg: Config):
    """The loss of a binary row: ``loss(outputs, batch) -> (total, terms)``; ``batch.target`` holds 0, 1, 255."""

    def loss(out: dict, batch: TrainBatch):
        mu = out["logits"][:, 0]
        target = batch.target  # 0 background, 1 object, 255 void (the void band of the true masks)
        in_boxes = batch.in_boxes(1)
        if setting.startswith("bce-"):
            known = target != 255
            bce = F.binary_cross_entropy_with_logits(mu, target.clamp(max=1).to(mu.dtype), reduction="none")
            value = (bce * known).sum() / known.sum().clamp_min(1)
            return value, {"bce": value}
        log_var = out["log_var"][:, 0]
        variance = _mean_variance(log_var, in_boxes & ~batch.pixel_perfect[:, None, None])
        if setting == "regression-fg":
            value = boxloss.uncertainty_l2_loss(mu, log_var, target, in_boxes, pixel_perfect=batch.pixel_perfect)
            return value, {"l2": value, "var_in_boxes": variance}
        value = boxloss.uncertainty_bce_loss(
            mu,
            log_var,
            target,
            in_boxes,
            tau=cfg.tau,
            temperature=cfg.temperature,
            bootstrap=setting == "uncertainty+bootstrap",
            pixel_perfect=batch.pixel_perfect,
        )
        return value, {"bce_u": value, "var_in_boxes": variance}

    return loss


def multi_loss(setting: str, cfg: Config, num_classes: int):
    """The loss of a multi-class row; ``batch.target`` holds 0..K and 255."""

    def loss(out: dict, batch: TrainBatch):
        mu = out["logits"]
        if setting != "uncertainty-ce":
            value = F.cross_entropy(mu, batch.target, ignore_index=255)
            return value, {"ce": value}
        in_boxes = batch.in_boxes(num_classes)
        value = boxloss.uncertainty_ce_loss(
            mu,
            out["log_var"],
            batch.target,
            samples=cfg.samples,
            tau=cfg.tau_ce,
            bootstrap=True,
            box_mask=in_boxes,
            pixel_perfect=batch.pixel_perfect,
        )
        bb_boxes = in_boxes & ~batch.pixel_perfect[:, None, None]
        return value, {"ce_u": value, "var_in_boxes": _mean_variance(out["log_var"].amax(1), bb_boxes)}

    return loss


def _mean_variance(log_var: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """The mean sigma^2 over ``where`` (logged: it shows whether the variance learns)."""
    return (log_var.detach().exp() * where).sum() / where.sum().clamp_min(1)


def _binary_predict(setting: str):
    if setting == "regression-fg":
        return lambda out: (out["logits"][:, 0] > 0.5).long()  # the regressed value is the object probability
    return lambda out: (out["logits"][:, 0] > 0).long()


# ----------------------------------------------------------------------------------------------------- pipeline


def run(ctx: Context, settings: list[str]) -> None:
    cfg: Config = ctx.config
    full = load_data(ctx)
    ctx.log(f"data: {full.description}")
    check_config(cfg, full.num_classes)
    chosen = pixel_perfect_subset(cfg, len(full.train))
    n_pp = int(chosen.sum())
    ctx.log(
        f"pixel-perfect subset: {n_pp} of {len(full.train)} training images (pixel_perfect_fraction "
        f"{cfg.pixel_perfect_fraction:.3f}); the other {len(full.train) - n_pp} keep only their boxes"
    )
    _check_pixel_perfect(ctx, settings, n_pp)

    groups = [(BINARY, (cfg.binary_class,)), (MULTI, tuple(cfg.multi_classes))]
    for rows, classes in groups:
        chosen_rows = [s for s in rows if s in settings]
        if not chosen_rows:
            continue
        splits = restrict_splits(full, classes)
        K = splits.num_classes
        ctx.log(f"{'binary' if rows is BINARY else 'multi-class'} rows: {splits.description}")
        networks = {}
        for setting in chosen_rows:
            heads = {"logits": 1 if rows is BINARY else K + 1}
            if setting in WITH_VARIANCE:
                heads["log_var"] = heads["logits"]
            loss = binary_loss(setting, cfg) if rows is BINARY else multi_loss(setting, cfg, K)
            model = train_network(
                ctx,
                f"table{TABLE[setting]}/{setting}",
                heads,
                batches_for(ctx, setting, splits, chosen, K),
                loss,
                steps=cfg.steps,
                optimizer=cfg.optimizer,
                lr=cfg.lr,
                weight_decay=cfg.weight_decay,
            )
            if rows is BINARY:
                cm = evaluate_confusion(ctx, model, splits.val, 1, predict=_binary_predict(setting))
                value, metric = object_iou(cm), "iou"
            else:
                value, metric = miou_percent(evaluate_confusion(ctx, model, splits.val, K)), "miou"
            ctx.results.add(TABLE[setting], setting, metric, value)
            ctx.log(f"Table {TABLE[setting]} {setting}: validation {metric} {value:.2f}")
            if setting in WITH_VARIANCE:
                note = variance_diagnostics(ctx, setting, model, splits, chosen)
                if note:
                    ctx.log(note)
                    ctx.results.notes.append(note)
            networks[setting] = model
        if ctx.run.main:
            if rows is BINARY:
                bootstrap_figure(ctx, splits, chosen, networks)
            else:
                flip_figure(ctx, splits, chosen, networks)
    if ctx.run.main and (ctx.run.path / "metrics.jsonl").is_file():
        save_loss_curves(ctx.run.file("figures", "loss_curves.png"), ctx.run.path / "metrics.jsonl")


def _check_pixel_perfect(ctx: Context, settings, n_pp: int) -> None:
    """Without pixel-perfect images the PP-only rows have nothing to train on (an error), and the mixed rows see
    only boxes: nothing contradicts the box labels, so the uncertainty has nothing to learn (Sec. 3.2) and boxes
    alone teach boxes. They are refused unless ``allow_no_pixel_perfect`` is set, which runs them with a warning."""
    cfg: Config = ctx.config
    if n_pp > 0:
        return
    pp_only = [s for s in settings if SUPERVISION[s] == "pp"]
    mixed = [s for s in settings if SUPERVISION[s] == "mixed"]
    if pp_only:
        raise ConfigError(
            f"{', '.join(pp_only)}: no pixel-perfect training images (pixel_perfect_fraction "
            f"{cfg.pixel_perfect_fraction} of {cfg.train_images} images rounds to 0)"
        )
    if not mixed:
        return
    text = (
        f"{', '.join(mixed)} mix pixel-perfect and box labels, but pixel_perfect_fraction "
        f"{cfg.pixel_perfect_fraction} of {cfg.train_images} training images gives no pixel-perfect image: they "
        "would train on boxes alone, where nothing tells the uncertainty which box pixels are wrong"
    )
    if not cfg.allow_no_pixel_perfect:
        raise ConfigError(text + " (set allow_no_pixel_perfect=true to run them anyway)")
    warning = "WARNING: " + text + "; running them on boxes alone (allow_no_pixel_perfect)"
    ctx.log(warning)
    ctx.results.notes.append(warning)


def variance_diagnostics(
    ctx: Context, setting: str, model, splits: Splits, chosen: np.ndarray, limit: int = 64
) -> str | None:
    """Whether the variance learned the label uncertainty (Sec. 3.2): on box-labelled training images (up to
    ``limit``), the mean sigma^2 inside the boxes on the pixels whose true label is background (where the box label
    is wrong) and on the object, and the share of each above tau (where bootstrapping flips the target). The true
    masks are read here only, never in training."""
    cfg: Config = ctx.config
    index = _bb_examples(splits, chosen, limit)
    if not index:
        return None
    K = splits.num_classes
    samples = [splits.train[i] for i in index]
    var = predict_heads(ctx, model, samples)["log_var"].exp().amax(1)
    in_box = torch.from_numpy(np.stack([box_label_map(s, K) for s in samples])) > 0
    truth = torch.from_numpy(np.stack([s.mask for s in samples])).long()
    tau = cfg.tau_ce if K > 1 else cfg.tau
    parts = []
    for name, where in (("background", in_box & (truth == 0)), ("object", in_box & (truth > 0) & (truth != 255))):
        if bool(where.any()):
            above = 100 * float((var[where] > tau).float().mean())
            parts.append(f"{name} sigma^2 {float(var[where].mean()):.2f}, {above:.1f}% above tau {tau:g}")
    return f"{setting}: inside the boxes of {len(samples)} box-labelled training images: " + "; ".join(parts)


# ----------------------------------------------------------------------------------------------------- figures


def _bb_examples(splits: Splits, chosen: np.ndarray, n: int) -> list[int]:
    """Indices of the first ``n`` box-labelled training images that hold a box."""
    return [i for i, s in enumerate(splits.train) if not chosen[i] and s.num_boxes][:n]


def _variance_panel(var: torch.Tensor, tau: float) -> list[np.ndarray]:
    return list((var / (2 * tau)).clamp(0, 1).numpy())


def bootstrap_figure(ctx: Context, splits: Splits, chosen: np.ndarray, networks: dict) -> None:
    """The paper's Fig. 5: box-labelled training images, their target, the bootstrapping weight 1 - W (Eq. 11;
    1 where the target is flipped), the learned variance and the prediction."""
    cfg: Config = ctx.config
    which = [s for s in ("uncertainty+bootstrap", "uncertainty", "regression-fg") if s in networks]
    index = _bb_examples(splits, chosen, cfg.figures)
    if not which or not index:
        return
    samples = [splits.train[i] for i in index]
    boxes = [box_label_map(s, 1) for s in samples]
    columns = {"target (box)": boxes}
    for setting in which:
        out = predict_heads(ctx, networks[setting], samples)
        var = out["log_var"][:, 0].exp()
        in_box = torch.from_numpy(np.stack(boxes)) > 0
        if setting != "regression-fg":
            flip = 1 - torch.sigmoid((cfg.tau - var) / cfg.temperature)
            columns[f"{setting}: 1 - W"] = list((flip * in_box).numpy())
        columns[f"{setting}: sigma^2 / {2 * cfg.tau:g}"] = _variance_panel(var, cfg.tau)
        columns[f"{setting}: prediction"] = list(_binary_predict(setting)(out).numpy())
    save_sample_panels(
        ctx.run.file("figures", "bootstrap_weights.png"),
        samples,
        columns,
        num_classes=1,
        title="Binary rows on box-labelled training images (Fig. 5): 1 - W is the weight of the flipped target",
    )


def flip_figure(ctx: Context, splits: Splits, chosen: np.ndarray, networks: dict) -> None:
    """The paper's Fig. 6: box-labelled training images, their target, per class the flip mask (pixels of the
    class's boxes whose largest variance exceeds tau_ce: their target becomes the argmax of mu, Eq. 16), the
    largest learned variance and the prediction."""
    cfg: Config = ctx.config
    index = _bb_examples(splits, chosen, cfg.figures)
    if not index or not networks:
        return
    K = splits.num_classes
    samples = [splits.train[i] for i in index]
    target = torch.from_numpy(np.stack([box_label_map(s, K) for s in samples])).long()
    columns = {"target (boxes)": list(target.numpy())}
    if "uncertainty-ce" in networks:
        out = predict_heads(ctx, networks["uncertainty-ce"], samples)
        var = out["log_var"].exp().amax(1)
        for k, name in enumerate(splits.class_names, start=1):
            columns[f"flip {name}"] = list(((target == k) & (var > cfg.tau_ce)).float().numpy())
        columns[f"max sigma^2 / {2 * cfg.tau_ce:g}"] = _variance_panel(var, cfg.tau_ce)
        columns["uncertainty-ce"] = list(out["logits"].argmax(1).numpy())
    for setting in ("ce-pp+bb", "ce-pp"):
        if setting in networks:
            columns[setting] = list(predict_heads(ctx, networks[setting], samples)["logits"].argmax(1).numpy())
    save_sample_panels(
        ctx.run.file("figures", "flip_masks.png"),
        samples,
        columns,
        num_classes=K,
        title="Multi-class rows on box-labelled training images (Fig. 6): flip masks of uncertainty-ce",
    )
