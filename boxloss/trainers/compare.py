"""The five methods on one benchmark: the comparison no paper makes.

Each paper compares itself with numbers copied from other papers, with other backbones, schedules and
post-processing. This trainer runs every method here on the same data split, the same segmentation network (the
config's ``model``, the engine's small U-Net by default), the same number of steps for the final segmentation network,
the same optimizer and learning rate for it (at the quick preset) and the same seeds, and puts their validation mIoU in
one table beside two references: the box-as-mask baseline and full supervision.

It holds no algorithm of its own: every row is one run of a trainer's pipeline (:func:`run_trainer`) with that
trainer's own preset plus the common budget, in ``<run>/<setting>/``, and the row's numbers are read from that run's
``results.json``:

========================== ================ ==========================================================================
row                        trainer          the trainer's setting (its ablation's row)
========================== ================ ==========================================================================
``box``                    box2tagback      ``final-box-labels``: cross-entropy on the boxes painted as masks
``full``                   uncertainty      ``ce-all-pp``: cross-entropy on the true masks of every training image
``box2tagback``            box2tagback      ``final`` (from the ``ours(T+N)`` networks' ``overlap-back-void`` pseudo GT)
``box2seg``                box2seg          ``box2seg``: all of Eq. 11 on GrabCut's pseudo labels
``bana``                   bana             ``nal``: the Table 3 network on Y_crf / Y_ret (no CRF post-processing)
``lpg``                    lpg              ``stage-3``: f after the third stage of the learned generator
``uncertainty``            uncertainty      ``uncertainty-ce`` with its pixel-perfect images (``pixel_perfect_fraction``)
``uncertainty-boxes-only`` uncertainty      ``uncertainty-ce`` with none: every image has boxes only
========================== ================ ==========================================================================

Metrics per row (table ``compare``): ``miou`` (validation), ``gap`` (``miou`` minus the ``full`` row's, when it ran),
``pseudo_miou`` (the training pseudo labels against the true masks, where the method makes them: Box to Tag and
Back's ``overlap-back-void`` with its void pixels left out, Box2Seg's GrabCut labels, BANA's Y_crf, LPG's stage-3
masks, and the boxes themselves for ``box``), ``train_s`` (training time of every network of the pipeline),
``wall_s`` (the whole pipeline: pseudo labels, CRFs and evaluation included), ``step_ms`` (the median training step
of the final network) and ``peak_mib`` (peak resident memory of the process while the pipeline ran, which includes
Python and torch themselves; on CUDA, ``torch.cuda.max_memory_allocated``). Only ``miou``, ``gap`` and
``pseudo_miou`` are results: the other three are measurements of the machine the run ran on.

The common budget (:func:`sub_config`): ``seed``, ``device``, ``data``, ``data_seed``, ``num_classes``, ``model``,
``widths``, ``pretrained``, ``threads``, ``workers``, ``log_every`` and ``checkpoint_every`` are always passed on;
``image_size``, ``train_images``, ``val_images``, ``batch_size``, ``final_steps``, ``final_optimizer`` and
``final_lr`` where set (the quick preset sets them; left ``None``, each trainer keeps its own). ``final_steps`` is
each final network's step count: Box to Tag and Back's ``final_steps``, Box2Seg's and label uncertainty's
``steps``, BANA's ``seg_steps``; LPG trains its f further at every stage (the boxes, then stages 1..S), so its
``seg_steps`` is ``final_steps / (S + 1)`` and its final f has as many steps in all as every other final network.
Each trainer's other settings (its stages before the final network) come from its own preset and the string
fields ``box2tagback``, ``box2seg``, ``bana``, ``lpg`` and ``uncertainty``: ``"key=value;key=value"`` overrides of
that trainer's config, applied last (the quick preset uses them to shorten those stages: fewer steps and images,
never fewer stages).

Figures: ``figures/miou.png``, mIoU per row with its spread over seeds (after ``--seeds``) and the gap to full
supervision above each bar; ``figures/segmentations.png``, validation image ``figure_image`` segmented by every row's
final network, beside its ground truth.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from boxloss.trainers.engine import checkpoint
from boxloss.trainers.engine.config import ConfigError, TrainerConfig, apply_overrides
from boxloss.trainers.engine.context import Context
from boxloss.trainers.engine.data import load_splits
from boxloss.trainers.engine.evaluate import label_miou, predict_logits
from boxloss.trainers.engine.figures import save_bars, save_panels
from boxloss.trainers.engine.loop import FitResult
from boxloss.trainers.engine.results import Results

NAME = "compare"
SUMMARY = (
    "All five methods, the box-as-mask baseline and full supervision on one benchmark: the same data, network, "
    "final-network budget and seeds"
)
SETTINGS = {
    "box": "the box-as-mask baseline: cross-entropy on the boxes painted as labels (box2tagback final-box-labels)",
    "full": "full supervision: cross-entropy on the true masks of every training image (uncertainty ce-all-pp)",
    "box2tagback": "Box to Tag and Back (Ji & Veksler): ours(T+N) pseudo GT, then the final network",
    "box2seg": "Box2Seg (Kulharia et al.): GrabCut labels with the attention-weighted and affinity losses",
    "bana": "BANA (Oh et al.): background-aware pooling, Y_crf / Y_ret, the noise-aware loss (nal)",
    "lpg": "LPG (Xie et al.): f after stage 3 of the learned class-agnostic pseudo-mask generator",
    "uncertainty": "label uncertainty (Neven et al.): uncertainty-ce with its pixel-perfect images",
    "uncertainty-boxes-only": "label uncertainty: uncertainty-ce on boxes only (no pixel-perfect image)",
}
#: the columns of the table, in order
METRICS = ("miou", "gap", "pseudo_miou", "train_s", "wall_s", "step_ms", "peak_mib")
TRAINER_OPTIONS = ("box2tagback", "box2seg", "bana", "lpg", "uncertainty")
FINAL_OPTIMIZERS = ("sgd", "adamw")  # what every trainer's final network can use
#: the weight decay each optimizer has where a trainer hard-codes it (Box2Seg and label uncertainty take it as a
#: setting, so it is set to the same)
WEIGHT_DECAY = {"sgd": 5e-4, "adamw": 1e-4}


@dataclass(frozen=True)
class Method:
    """How a row runs: the trainer, its settings, the result row that is the validation mIoU, the job that trains the
    final network, where the pseudo labels' mIoU is, and the config fields of the final network's budget."""

    trainer: str
    settings: tuple[str, ...]
    row: tuple[str, str]
    final_job: str
    #: (table, setting) of the pseudo labels' mIoU in the trainer's results, "note:<regex>" to read it from the
    #: results' notes, "boxes" (the box labels, computed here) or None
    pseudo: tuple[str, str] | str | None
    steps: str
    optimizer: str
    lr: tuple[str, ...]
    fixed: tuple[tuple[str, object], ...] = ()


def methods(cfg: Config) -> dict[str, Method]:
    """The rows' :class:`Method` s; LPG's rows follow its number of stages."""
    lpg_stages = _lpg_stages(cfg)
    return {
        "box": Method(
            "box2tagback",
            ("final-box-labels",),
            ("final", "final-box-labels"),
            "final/final-box-labels",
            "boxes",
            "final_steps",
            "final_optimizer",
            ("final_lr",),
        ),
        "full": Method(
            "uncertainty", ("ce-all-pp",), ("3", "ce-all-pp"), "table3/ce-all-pp", None, "steps", "optimizer", ("lr",)
        ),
        "box2tagback": Method(
            "box2tagback",
            ("overlap-back-void", "final"),
            ("final", "final"),
            "final/final",
            ("2", "overlap-back-void"),
            "final_steps",
            "final_optimizer",
            ("final_lr",),
        ),
        "box2seg": Method(
            "box2seg",
            ("box2seg",),
            ("3", "box2seg"),
            "table3/box2seg",
            r"note:GrabCut pseudo labels M on the training images: mIoU (-?[0-9.]+|nan)",
            "steps",
            "optimizer",
            ("lr",),
        ),
        "bana": Method(
            "bana",
            ("bap-crf", "nal"),
            ("3", "nal"),
            "stage2/nal",
            ("1", "bap-crf"),
            "seg_steps",
            "seg_optimizer",
            ("seg_lr", "seg_new_lr"),
        ),
        "lpg": Method(
            "lpg",
            (f"stage-{lpg_stages}", f"lpg-stage-{lpg_stages}"),
            ("II", f"stage-{lpg_stages}"),
            f"target/f/stage-{lpg_stages}",
            ("III", f"lpg-stage-{lpg_stages}"),
            "seg_steps",
            "seg_optimizer",
            ("seg_lr",),
        ),
        "uncertainty": Method(
            "uncertainty",
            ("uncertainty-ce",),
            ("3", "uncertainty-ce"),
            "table3/uncertainty-ce",
            None,
            "steps",
            "optimizer",
            ("lr",),
            (("pixel_perfect_fraction", cfg.pixel_perfect_fraction),),
        ),
        "uncertainty-boxes-only": Method(
            "uncertainty",
            ("uncertainty-ce",),
            ("3", "uncertainty-ce"),
            "table3/uncertainty-ce",
            None,
            "steps",
            "optimizer",
            ("lr",),
            (("pixel_perfect_fraction", 0.0), ("allow_no_pixel_perfect", True)),
        ),
    }


@dataclass
class Config(TrainerConfig):
    # The common budget. image_size None: each trainer's own on real data (there it only scales the CRFs' spatial
    # sigmas, as the images are not resized), 256 on the synthetic benchmark (one split for every row)
    image_size: int | None = None
    #: None: each trainer's own batch size (its paper's)
    batch_size: int | None = None
    #: steps of every final segmentation network (LPG: in all, over its stages; see the module docstring)
    final_steps: int | None = 20000
    #: optimizer of every final network: "sgd" (with momentum 0.9 and weight decay 5e-4, DeepLab's) or "adamw"
    #: (weight decay 1e-4); None: each trainer's own
    final_optimizer: str | None = None
    #: learning rate of every final network (BANA: its classifier's too); None: each trainer's own
    final_lr: float | None = None
    #: label uncertainty's pixel-perfect share (the paper's 500 of 2780 images)
    pixel_perfect_fraction: float = 500 / 2780
    #: the validation image of figures/segmentations.png
    figure_image: int = 0
    #: images in each trainer's own figures
    figures: int = 2
    # Each trainer's own settings, "key=value;key=value", applied after its preset and the common budget
    box2tagback: str = ""
    box2seg: str = ""
    bana: str = ""
    lpg: str = ""
    uncertainty: str = ""

    PRESET_OVERRIDES = {
        # each paper's schedule and sizes, one final-network length (about each paper's)
        "paper": {},
        # the eight rows in about 20 minutes on 2 CPU cores (docs/compare.md gives the measured shares): LPG's quick
        # image size for every row, and each trainer's stages before its final network shortened (its own quick
        # preset's values in brackets): Box to Tag and Back's single-class networks 120 steps each (250), Box2Seg's
        # embedding pre-training 40 steps (60), BANA's classification network 300 steps (1000), LPG's auxiliary set
        # 200 images (300) and its generators 100 steps per stage (300), its f 900 / 4 = 225 steps per stage (250)
        "quick": {
            "image_size": 64,
            "train_images": 400,
            "val_images": 150,
            "batch_size": 16,
            "final_steps": 900,
            "final_optimizer": "adamw",
            "final_lr": 1e-3,
            "box2tagback": "single_steps=120",
            "box2seg": "embedding_pretrain_steps=40",
            "bana": "stage1_steps=300",
            "lpg": "aux_images=200;generator_steps=100",
        },
    }

    def __post_init__(self):
        check_config(self)


def check_config(cfg: Config) -> None:
    """Clear errors for the compare trainer's own settings and for each trainer's overrides (every row's config is
    built once, so a wrong key or value fails before anything runs)."""
    if cfg.final_optimizer is not None and cfg.final_optimizer not in FINAL_OPTIMIZERS:
        raise ConfigError(
            f"compare: final_optimizer must be one of {', '.join(FINAL_OPTIMIZERS)} or none, got "
            f"{cfg.final_optimizer!r}"
        )
    for name in ("image_size", "train_images", "val_images", "batch_size", "final_steps"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ConfigError(f"compare: {name} must be at least 1 (or none), got {value}")
    if cfg.final_lr is not None and not cfg.final_lr > 0:
        raise ConfigError(f"compare: final_lr must be > 0 (or none), got {cfg.final_lr}")
    if not 0 <= cfg.pixel_perfect_fraction <= 1:
        raise ConfigError(f"compare: pixel_perfect_fraction must lie in [0, 1], got {cfg.pixel_perfect_fraction}")
    if cfg.figure_image < 0 or cfg.figures < 1:
        raise ConfigError(
            f"compare: figure_image must be >= 0 and figures >= 1, got {cfg.figure_image} and {cfg.figures}"
        )
    for setting in SETTINGS:
        sub_config(cfg, setting, cfg.num_classes)


def _overrides(cfg: Config, trainer: str) -> list[str]:
    text = getattr(cfg, trainer)
    items = [p.strip() for p in text.split(";") if p.strip()]
    bad = [p for p in items if "=" not in p]
    if bad:
        raise ConfigError(
            f"compare: {trainer} takes 'key=value;key=value' overrides of the {trainer} trainer, got {text!r}"
        )
    return items


def _lpg_stages(cfg: Config) -> int:
    from boxloss.trainers import lpg

    stages = lpg.Config.from_preset(cfg.preset, []).stages
    for item in _overrides(cfg, "lpg"):
        key, _, value = item.partition("=")
        if key.strip() == "stages":
            try:
                stages = int(value)
            except ValueError:
                raise ConfigError(f"compare: lpg stages must be an integer, got {value!r}") from None
    if stages < 1:
        raise ConfigError(f"compare: lpg stages must be >= 1, got {stages}")
    return stages


COMMON = (
    "seed",
    "device",
    "data",
    "data_seed",
    "num_classes",
    "train_images",
    "val_images",
    "model",
    "widths",
    "pretrained",
    "threads",
    "workers",
    "log_every",
    "checkpoint_every",
)
#: the synthetic benchmark's image size when ``image_size`` is None (TrainerConfig's)
SYNTHETIC_SIZE = TrainerConfig.image_size


def image_size(cfg: Config) -> int | None:
    """The common image size: the config's, or on the synthetic benchmark :data:`SYNTHETIC_SIZE`."""
    if cfg.image_size is None and cfg.data == "synthetic":
        return SYNTHETIC_SIZE
    return cfg.image_size


def sub_config(cfg: Config, setting: str, num_classes: int, grabcut_cache: str = ""):
    """The config of ``setting``'s trainer: its preset (the compare run's), the common budget, the row's own fixed
    settings, then the user's overrides of that trainer (``cfg.<trainer>``)."""
    from boxloss.trainers import trainer_module

    method = methods(cfg)[setting]
    module = trainer_module(method.trainer)
    values = {k: getattr(cfg, k) for k in COMMON}
    if image_size(cfg) is not None:
        values["image_size"] = image_size(cfg)
    if cfg.batch_size is not None:
        values["batch_size"] = cfg.batch_size
    values["figures"] = cfg.figures
    if cfg.final_steps is not None:
        steps = cfg.final_steps
        if method.trainer == "lpg":
            steps = max(1, cfg.final_steps // (_lpg_stages(cfg) + 1))
        values[method.steps] = steps
    if cfg.final_optimizer is not None:
        values[method.optimizer] = cfg.final_optimizer
        if method.trainer in ("box2seg", "uncertainty"):
            values["weight_decay"] = WEIGHT_DECAY[cfg.final_optimizer]
    if cfg.final_lr is not None:
        values.update({k: cfg.final_lr for k in method.lr})
    if method.trainer == "uncertainty":  # every class of the benchmark, as every other row
        values["multi_classes"] = tuple(range(1, num_classes + 1))
    if method.trainer == "box2seg" and grabcut_cache:
        values["grabcut_cache"] = grabcut_cache
    values.update(dict(method.fixed))
    try:
        sub = dataclasses.replace(module.Config.from_preset(cfg.preset), **values)
        return apply_overrides(sub, _overrides(cfg, method.trainer))
    except ConfigError as e:
        raise ConfigError(f"compare, row {setting} ({method.trainer} trainer): {e}") from None


# ----------------------------------------------------------------------------------------------------- memory


def _reset_peak(device: torch.device) -> None:
    """Starts a new peak-memory window: CUDA's peak statistics, or the process's peak resident set (Linux's
    ``/proc/self/clear_refs``; elsewhere the peak stays the process's since it started)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


# ----------------------------------------------------------------------------------------------------- pipeline


def _pseudo_miou(method: Method, results: Results, splits, num_classes: int) -> float | None:
    if method.pseudo is None:
        return None
    if method.pseudo == "boxes":
        from boxloss.trainers.engine.data import box_label_map

        if splits.train[0].mask is None:
            return None
        labels = [torch.from_numpy(box_label_map(s, num_classes)) for s in splits.train]
        return label_miou(labels, [torch.from_numpy(s.mask) for s in splits.train], num_classes)
    if isinstance(method.pseudo, str) and method.pseudo.startswith("note:"):
        pattern = re.compile(method.pseudo[len("note:") :])
        for note in results.notes:
            m = pattern.search(note)
            if m:
                return float(m.group(1))
        return None
    try:
        return results.value(*method.pseudo, "miou")
    except KeyError:
        return None


def _predict(trainer: str, model, images: torch.Tensor, sub_cfg, device) -> torch.Tensor:
    """(B, H, W) labels of a row's final network, as its trainer evaluates it."""
    if trainer == "bana":
        from boxloss.trainers import bana

        return bana.predict_labels(model, images, sub_cfg, crf=False)
    return predict_logits(model, images, device=device).argmax(1)


def run(ctx: Context, settings: list[str]) -> None:
    from boxloss.trainers import trainer_module
    from boxloss.trainers.__main__ import run_trainer

    cfg: Config = ctx.config
    splits = load_splits(
        cfg.data,
        num_classes=cfg.num_classes,
        image_size=image_size(cfg) or SYNTHETIC_SIZE,
        train_images=cfg.train_images,
        val_images=cfg.val_images,
        data_seed=cfg.data_seed,
        log=ctx.log,
    )
    L = splits.num_classes
    if cfg.figure_image >= len(splits.val):
        raise ConfigError(
            f"compare: figure_image must be below the {len(splits.val)} validation images, got {cfg.figure_image}"
        )
    ctx.log(f"data: {splits.description}")
    sample = splits.val[cfg.figure_image]
    from boxloss.data import collate_samples

    image = collate_samples([sample]).images
    grabcut_cache = str(ctx.run.path.parent / "grabcut-cache")
    table = methods(cfg)
    configs = {s: sub_config(cfg, s, L, grabcut_cache) for s in settings}
    ctx.results.notes.append(
        "common budget: "
        + ", ".join(
            f"{k} {getattr(cfg, k)}"
            for k in (
                "image_size",
                "train_images",
                "val_images",
                "batch_size",
                "final_steps",
                "final_optimizer",
                "final_lr",
            )
        )
    )

    predictions: dict[str, torch.Tensor] = {}
    metrics: dict[str, dict] = {}
    for setting in settings:
        method, sub_cfg = table[setting], configs[setting]
        module = trainer_module(method.trainer)
        out = ctx.run.path / setting
        kept: dict[str, torch.nn.Module] = {}

        def on_fit(result: FitResult, model, setting=setting, method=method, kept=kept):
            ctx.fits.append(dataclasses.replace(result, job=f"{setting}/{result.job}"))
            if result.job == method.final_job:
                kept["final"] = model

        ctx.log(f"[{setting}] the {method.trainer} trainer, settings {', '.join(method.settings)}, in {out}")
        _reset_peak(ctx.device)
        sub = run_trainer(
            module,
            sub_cfg,
            out,
            settings=list(method.settings),
            resume=ctx.run.resume and (out / "config.json").is_file(),
            progress=ctx.progress,
            log=ctx.log,
            on_fit=on_fit,
        )
        peak = _peak_mib(ctx.device)
        value = sub.value(*method.row, "miou")
        pseudo = _pseudo_miou(method, sub, splits, L)
        jobs = sub.timing.get("jobs", {})
        metrics[setting] = {
            "miou": value,
            "pseudo_miou": pseudo,
            "train_s": sub.timing.get("train_s"),
            "wall_s": sub.timing.get("wall_s"),
            "step_ms": jobs.get(method.final_job, {}).get("step_ms"),
            "peak_mib": peak,
        }
        if "final" not in kept:
            raise RuntimeError(
                f"compare, row {setting}: the {method.trainer} trainer trained no job "
                f"{method.final_job!r} (its jobs: {', '.join(jobs)})"
            )
        predictions[setting] = _predict(method.trainer, kept.pop("final"), image, sub_cfg, ctx.device)[0].cpu()
        ctx.log(
            f"[{setting}] validation mIoU {value:.2f}" + (f", pseudo labels {pseudo:.2f}" if pseudo is not None else "")
        )
    for setting, values in metrics.items():
        if "full" in metrics:
            values["gap"] = values["miou"] - metrics["full"]["miou"]
        for metric in METRICS:
            if values.get(metric) is not None:
                ctx.results.add("compare", setting, metric, values[metric])
    if ctx.run.main:
        checkpoint.atomic_save(
            {
                "image": torch.from_numpy(np.ascontiguousarray(sample.image)),
                "boxes": torch.from_numpy(sample.boxes),
                "labels": torch.from_numpy(sample.labels),
                "truth": None if sample.mask is None else torch.from_numpy(sample.mask),
                "num_classes": L,
                "image_id": str(sample.image_id),
                "predictions": {k: v.to(torch.uint8) for k, v in predictions.items()},
            },
            ctx.run.file("predictions.pt"),
        )
        draw_figures(ctx.run.path, ctx.results, ctx.run.path / "predictions.pt")


# ----------------------------------------------------------------------------------------------------- figures


def draw_figures(out: Path, results: Results, predictions: Path) -> None:
    """``figures/miou.png`` from ``results`` (their seeds' spread where they hold several) and
    ``figures/segmentations.png`` from a run's ``predictions.pt``."""
    rows = {r["setting"]: r for r in results.rows if r["table"] == "compare" and r["metric"] == "miou"}
    gaps = {r["setting"]: r for r in results.rows if r["table"] == "compare" and r["metric"] == "gap"}
    names = [s for s in SETTINGS if s in rows and rows[s]["value"] is not None]
    if names:
        seeds = results.seed if isinstance(results.seed, list) else [results.seed]
        full = rows["full"]["value"] if "full" in rows else None
        save_bars(
            Path(out) / "figures" / "miou.png",
            names,
            [rows[s]["value"] for s in names],
            [rows[s].get("std", 0.0) for s in names],
            ylabel="validation mIoU (%)",
            reference=full,
            reference_label="full supervision" if full is not None else "",
            annotations=[f"{gaps[s]['value']:+.1f}" if s in gaps and s != "full" else "" for s in names],
            title=(
                f"mean over seeds {', '.join(map(str, seeds))}, error bars: std"
                if len(seeds) > 1
                else f"seed {seeds[0]}"
            )
            + ("; above each bar: the gap to full supervision" if full is not None else ""),
        )
    if Path(predictions).is_file():
        saved = checkpoint.load(predictions)
        columns = {k: [v.numpy()] for k, v in saved["predictions"].items()}
        if saved["truth"] is not None:
            columns["ground truth"] = [saved["truth"].numpy()]
        save_panels(
            Path(out) / "figures" / "segmentations.png",
            [saved["image"].numpy()],
            columns,
            boxes=[saved["boxes"].numpy()],
            labels=[saved["labels"].numpy()],
            num_classes=int(saved["num_classes"]),
            title=f"validation image {saved['image_id']} segmented by every row's final network",
        )


def summarize_seeds(out: Path, aggregated: Results, seed_runs: list[Path]) -> None:
    """After ``--seeds``: the figures of ``out`` from the mean and spread over the seeds (the segmentations are the
    first seed's)."""
    draw_figures(Path(out), aggregated, Path(seed_runs[0]) / "predictions.pt")
