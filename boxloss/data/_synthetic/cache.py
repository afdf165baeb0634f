"""Generated splits on disk: one folder per config (named by its key), written atomically, read back as memory maps.

A split of n images is three files, ``<split>-<n>.images.npy``, ``.instances.npy`` and ``.boxes.npz``; the boxes
file goes into place last and marks the split complete, so an interrupted or concurrent run never leaves a
half-written split that looks complete. A cached split serves every request for at most as many images.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from boxloss.data._synthetic.config import GENERATOR_VERSION, SyntheticConfig

CACHE_ENV = "BOXLOSS_DATA_CACHE"


@dataclass
class SyntheticArrays:
    """A generated split: ``images`` (N, H, W, 3) uint8, ``instances`` (N, H, W) uint8 (0 background, k + 1 for box k
    of that image), ``boxes`` (K, 4) float32 and ``labels`` (K,) int64 of all images, and ``offsets`` (N + 1,) int64:
    image i owns boxes ``offsets[i]:offsets[i + 1]``. Arrays may be read-only memory maps of the cache."""

    images: np.ndarray
    instances: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def head(self, n: int) -> SyntheticArrays:
        k = int(self.offsets[n])
        return SyntheticArrays(
            self.images[:n], self.instances[:n], self.boxes[:k], self.labels[:k], self.offsets[: n + 1]
        )


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where cached datasets live: ``cache_dir``, else ``$BOXLOSS_DATA_CACHE``, else
    ``$XDG_CACHE_HOME/boxloss/synthetic`` (``~/.cache/boxloss/synthetic``)."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "boxloss" / "synthetic"


def cache_path(config: SyntheticConfig, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of ``config``'s cached splits: ``cache_root(cache_dir) / config.key()``."""
    return cache_root(cache_dir) / config.key()


def split_files(folder: Path, split: str, n: int) -> dict[str, Path]:
    stem = f"{split}-{n}"
    return {
        "images": folder / f"{stem}.images.npy",
        "instances": folder / f"{stem}.instances.npy",
        "boxes": folder / f"{stem}.boxes.npz",
    }


def cached_sizes(folder: Path, split: str) -> list[int]:
    sizes = []
    for p in folder.glob(f"{split}-*.boxes.npz"):
        try:
            sizes.append(int(p.name[len(split) + 1 : -len(".boxes.npz")]))
        except ValueError:
            continue
    return sorted(sizes)


def cached_size_at_least(folder: Path, split: str, n: int) -> int:
    for m in cached_sizes(folder, split):
        if m >= n:
            return m
    raise FileNotFoundError(f"synthetic cache {folder} no longer holds {n} {split} images")


def load_cached(config: SyntheticConfig, files: dict[str, Path], n: int) -> SyntheticArrays:
    H, W = config.image_size
    with np.load(files["boxes"]) as z:
        boxes, labels, offsets = z["boxes"], z["labels"], z["offsets"]
    images = np.load(files["images"], mmap_mode="r")
    instances = np.load(files["instances"], mmap_mode="r")
    if (
        images.shape[1:] != (H, W, 3)
        or instances.shape != images.shape[:3]
        or offsets.shape != (len(images) + 1,)
        or len(images) < n
        or boxes.shape != (offsets[-1], 4)
        or labels.shape != (offsets[-1],)
    ):
        raise ValueError("arrays do not match each other or the config")
    return SyntheticArrays(images, instances, boxes, labels, offsets).head(n)


def load_or_write(
    config: SyntheticConfig,
    split: str,
    num_images: int,
    generate: Callable[[tuple[np.ndarray, np.ndarray]], SyntheticArrays],
    *,
    cache_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[SyntheticArrays, Path]:
    """The first ``num_images`` of ``split`` from the cache if any cached run of at least that many exists, else
    ``generate(out)`` into memory-mapped ``out = (images, instances)`` files and written there atomically. Returns
    the arrays and the cache folder."""
    folder = cache_path(config, cache_dir)
    for p in (folder, *folder.parents):
        if p.exists():
            if not p.is_dir():
                raise NotADirectoryError(
                    f"synthetic cache: {p} is a file, so the cache folder {folder} cannot be made there; give "
                    "cache_dir (--cache-dir) a folder, or cache=False (--no-cache) to write no cache"
                )
            break
    for m in cached_sizes(folder, split) if folder.is_dir() else []:
        if m >= num_images:
            files = split_files(folder, split, m)
            try:
                return load_cached(config, files, num_images), folder
            except Exception as e:  # noqa: BLE001 -- any unreadable cache is regenerated, loudly
                warnings.warn(f"synthetic cache {files['boxes']} is unreadable ({e}); regenerating it", stacklevel=3)
                for p in files.values():
                    p.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    params = folder / "params.json"
    if not params.exists():
        atomic_write_text(
            params, json.dumps({"generator_version": GENERATOR_VERSION, **config.to_dict()}, indent=1, sort_keys=True)
        )
    if log:
        log(f"generating {num_images} {split} images into {folder}")
    files = split_files(folder, split, num_images)
    H, W = config.image_size
    tmp = {k: p.with_name(f".{p.name}.{os.getpid()}.tmp") for k, p in files.items()}
    try:
        images = np.lib.format.open_memmap(tmp["images"], mode="w+", dtype=np.uint8, shape=(num_images, H, W, 3))
        instances = np.lib.format.open_memmap(tmp["instances"], mode="w+", dtype=np.uint8, shape=(num_images, H, W))
        arrays = generate((images, instances))
        images.flush()
        instances.flush()
        with open(tmp["boxes"], "wb") as f:
            np.savez(f, boxes=arrays.boxes, labels=arrays.labels, offsets=arrays.offsets)
        del images, instances, arrays
        # the boxes file marks a split complete, so it goes into place last
        for k in ("images", "instances", "boxes"):
            os.replace(tmp[k], files[k])
    finally:
        for p in tmp.values():
            p.unlink(missing_ok=True)
    return load_cached(config, files, num_images), folder


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
