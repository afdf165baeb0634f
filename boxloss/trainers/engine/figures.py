"""PNG figures of a run: images with their boxes beside label maps (pseudo labels, predictions, ground truth) or
continuous maps (attention, variance), and loss curves from ``metrics.jsonl``. Written with matplotlib's Agg
backend (no display needed)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def palette(num_classes: int) -> np.ndarray:
    """(256, 3) uint8 colours: black background, distinct hues for classes, white void (255)."""
    rng = np.random.default_rng(7)
    pal = rng.integers(40, 256, size=(256, 3)).astype(np.uint8)
    pal[0] = 0
    pal[255] = 255
    base = np.array(
        [
            [230, 25, 75],
            [60, 180, 75],
            [255, 225, 25],
            [0, 130, 200],
            [245, 130, 48],
            [145, 30, 180],
            [70, 240, 240],
            [240, 50, 230],
            [210, 245, 60],
            [250, 190, 212],
            [0, 128, 128],
            [220, 190, 255],
            [170, 110, 40],
            [255, 250, 200],
            [128, 0, 0],
            [170, 255, 195],
            [128, 128, 0],
            [255, 215, 180],
            [0, 0, 128],
            [128, 128, 128],
        ],
        np.uint8,
    )
    pal[1 : 1 + len(base)] = base
    return pal


def save_panels(
    path: str | Path,
    images: Sequence[np.ndarray],
    columns: dict[str, Sequence],
    *,
    boxes: Sequence[np.ndarray] | None = None,
    labels: Sequence[np.ndarray] | None = None,
    num_classes: int = 20,
    title: str | None = None,
) -> None:
    """One row per image: the image (with its boxes), then one panel per column.

    ``columns`` maps a title to per-image arrays: integer (H, W) label maps are drawn with :func:`palette`,
    float (H, W) maps with a colour scale in [0, 1] (values outside are clipped)."""
    plt = _plt()
    pal = palette(num_classes)
    n, m = len(images), 1 + len(columns)
    fig, axes = plt.subplots(n, m, figsize=(2.1 * m, 2.1 * n), squeeze=False)
    for i, image in enumerate(images):
        ax = axes[i, 0]
        ax.imshow(image)
        if boxes is not None:
            for k, (x0, y0, x1, y1) in enumerate(np.asarray(boxes[i]).reshape(-1, 4)):
                colour = pal[int(labels[i][k])] / 255 if labels is not None else (1, 1, 0)
                ax.add_patch(
                    plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=1.2, edgecolor=colour)
                )
        for j, maps in enumerate(columns.values(), start=1):
            a = np.asarray(maps[i])
            if np.issubdtype(a.dtype, np.integer) or a.dtype == bool:
                axes[i, j].imshow(pal[a.astype(np.int64).clip(0, 255)], interpolation="nearest")
            else:
                axes[i, j].imshow(a, vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
    for j, name in enumerate(["image"] + list(columns)):
        axes[0, j].set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def save_loss_curves(
    path: str | Path, metrics_file: str | Path, *, jobs: Sequence[str] | None = None, keys: Sequence[str] = ("loss",)
) -> None:
    """Loss curves of the jobs in a ``metrics.jsonl`` (all jobs, or those named), one line per job and key."""
    plt = _plt()
    series: dict[str, tuple[list, list]] = {}
    for line in Path(metrics_file).read_text().splitlines():
        rec = json.loads(line)
        if "job" not in rec or (jobs is not None and rec["job"] not in jobs):
            continue
        for k in keys:
            if k in rec and rec[k] is not None:
                xs, ys = series.setdefault(f"{rec['job']} {k}" if len(keys) > 1 else rec["job"], ([], []))
                xs.append(rec["step"])
                ys.append(rec[k])
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, lw=1, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(", ".join(keys))
    if 0 < len(series) <= 12:
        ax.legend(fontsize=6)
    fig.tight_layout()
    _save(fig, path)


def save_bars(
    path: str | Path,
    names: Sequence[str],
    means: Sequence[float],
    spreads: Sequence[float],
    *,
    ylabel: str,
    reference: float | None = None,
    reference_label: str = "",
    annotations: Sequence[str] | None = None,
    title: str | None = None,
) -> None:
    """A bar per name with its spread as an error bar, an optional horizontal reference line, and an optional
    text above each bar (``annotations``)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(names) + 1), 3.5))
    bars = ax.bar(range(len(names)), means, yerr=spreads, capsize=3, color="#4c72b0")
    if annotations is not None:
        for bar, spread, text in zip(bars, spreads, annotations):
            ax.annotate(
                text,
                (bar.get_x() + bar.get_width() / 2, bar.get_height() + (spread or 0)),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=7,
            )
        ax.set_ylim(top=ax.get_ylim()[1] * 1.08)
    if title:
        ax.set_title(title, fontsize=9)
    if reference is not None:
        ax.axhline(reference, color="k", ls="--", lw=1, label=reference_label)
        ax.legend(fontsize=7)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path) -> None:
    import os
    import tempfile

    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def save_sample_panels(
    path: str | Path, samples: Sequence, columns: dict[str, Sequence], *, num_classes: int, title: str | None = None
) -> None:
    """:func:`save_panels` for dataset samples: each sample's image with its boxes and their labels, the ``columns``,
    then the sample's true mask (``"ground truth"``)."""
    samples = list(samples)
    columns = {**columns, "ground truth": [s.mask for s in samples]}
    save_panels(
        path,
        [s.image for s in samples],
        columns,
        boxes=[s.boxes for s in samples],
        labels=[s.labels for s in samples],
        num_classes=num_classes,
        title=title,
    )
