"""Reading and writing images, shared by the VOC and COCO code."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image


def read_image(path: str | os.PathLike) -> np.ndarray:
    """(H, W, 3) uint8 RGB (grayscale, palette and RGBA images are converted).  A missing file raises
    ``FileNotFoundError``; a file that cannot be decoded (truncated, not an image) raises ``ValueError`` naming it."""
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"), np.uint8)
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot decode the image ({e})") from None


def write_image(path: str | os.PathLike, image: np.ndarray, quality: int = 95) -> None:
    """PNG (lossless) or JPEG (``quality``) by the file extension."""
    img = Image.fromarray(np.ascontiguousarray(image, np.uint8), mode="RGB")
    if str(path).lower().endswith((".jpg", ".jpeg")):
        img.save(path, quality=quality, subsampling=0)  # 4:4:4: no chroma blur on small, saturated objects
    else:
        img.save(path)


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the file header (no decoding)."""
    with Image.open(path) as img:
        return img.height, img.width
