"""The one sample form every dataset in :mod:`boxloss.data` returns, and the batch packing.

Why one form: the synthetic benchmark, VOC and COCO differ in files and coordinate conventions, but a trainer
should see the same thing from all three. Conventions (the library's):

- ``boxes`` are float ``x0, y0, x1, y1`` in continuous pixel coordinates: pixel (i, j) (row i, column j) covers
  [j, j+1) x [i, i+1), so the tight box around pixels with columns j_min..j_max and rows i_min..i_max is
  ``(j_min, i_min, j_max + 1, i_max + 1)``;
- ``labels`` are class channels 1..L (0 is the background channel and never a box label);
- ``mask`` holds 0 for background, 1..L for classes and 255 (:data:`VOID`) for pixels to ignore.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

VOID = 255
MAX_CLASSES = 254  # 255 is void in the uint8 masks


@dataclass
class Sample:
    """One image with its box supervision and, where known, its true mask.

    Shapes (K boxes, image H x W):

    - ``image``: (H, W, 3) uint8 RGB.
    - ``boxes``: (K, 4) float32 ``x0, y0, x1, y1`` (see the module docstring for the convention).
    - ``labels``: (K,) int64 class channels in 1..L.
    - ``mask``: (H, W) uint8 with 0 background, 1..L classes, 255 void; ``None`` when the dataset has no masks.
    - ``image_id``: a string naming the image (the file stem for VOC and COCO).
    - ``instances``: optional (H, W) int32, ``k + 1`` where the pixel belongs to box k (its visible extent, void band
      included), 0 elsewhere. Known for synthetic and COCO data; transforms use it to keep cropped boxes tight.
    - ``valid``: optional (H, W) bool, False on padding added by a transform; ``None`` means every pixel is real.
    - ``info``: counters transforms add (``boxes_clipped``, ``boxes_dropped``), summed by :func:`collate_samples`.

    Example:
        >>> import numpy as np
        >>> from boxloss.data import Sample
        >>> s = Sample(np.zeros((4, 6, 3), np.uint8), np.array([[1, 0, 3, 2]], np.float32), np.array([2]),
        ...            None, "img0")
        >>> s.check("example")
        >>> s.height, s.width, s.num_boxes
        (4, 6, 1)
    """

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    mask: np.ndarray | None
    image_id: str
    instances: np.ndarray | None = None
    valid: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def num_boxes(self) -> int:
        return int(self.boxes.shape[0])

    def check(self, where: str = "sample") -> None:
        """Raise ``ValueError``/``TypeError`` naming ``where`` and the field if the sample breaks the form above."""
        img = self.image
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise TypeError(f"{where}: image must be a (H, W, 3) uint8 array, got {_describe(img)}")
        h, w = img.shape[:2]
        if (
            not isinstance(self.boxes, np.ndarray)
            or self.boxes.dtype != np.float32
            or self.boxes.ndim != 2
            or self.boxes.shape[1] != 4
        ):
            raise TypeError(f"{where}: boxes must be a (K, 4) float32 array, got {_describe(self.boxes)}")
        k = self.boxes.shape[0]
        if not isinstance(self.labels, np.ndarray) or self.labels.dtype != np.int64 or self.labels.shape != (k,):
            raise TypeError(f"{where}: labels must be a ({k},) int64 array, got {_describe(self.labels)}")
        if k and (self.labels.min() < 1 or self.labels.max() > MAX_CLASSES):
            raise ValueError(f"{where}: labels must be class channels in 1..{MAX_CLASSES}, got {self.labels.tolist()}")
        if k and not (
            np.isfinite(self.boxes).all()
            and (self.boxes[:, 2] > self.boxes[:, 0]).all()
            and (self.boxes[:, 3] > self.boxes[:, 1]).all()
        ):
            raise ValueError(f"{where}: boxes must be finite with x1 > x0 and y1 > y0, got {self.boxes.tolist()}")
        for name, dtype in (("mask", np.uint8), ("instances", np.int32), ("valid", np.bool_)):
            a = getattr(self, name)
            if a is None:
                continue
            if not isinstance(a, np.ndarray) or a.dtype != dtype or a.shape != (h, w):
                raise TypeError(
                    f"{where}: {name} must be a ({h}, {w}) {np.dtype(dtype).name} array, got {_describe(a)}"
                )
        if self.instances is not None and k and self.instances.max() > k:
            raise ValueError(
                f"{where}: instances refers to box {int(self.instances.max()) - 1} but there are {k} boxes"
            )


def _describe(a) -> str:
    if isinstance(a, np.ndarray):
        return f"array of shape {a.shape} and dtype {a.dtype}"
    return type(a).__name__


def empty_boxes() -> tuple[np.ndarray, np.ndarray]:
    """``(boxes (0, 4) float32, labels (0,) int64)``."""
    return np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)


def boxes_from_instances(instances: np.ndarray, num_boxes: int) -> np.ndarray:
    """Tight boxes (num_boxes, 4) float32 around ``instances == k + 1``; NaN rows for boxes with no pixel.

    Example:
        >>> import numpy as np
        >>> inst = np.zeros((5, 7), np.int32); inst[1:3, 2:5] = 1
        >>> boxes_from_instances(inst, 1).tolist()
        [[2.0, 1.0, 5.0, 3.0]]
    """
    from scipy import ndimage

    out = np.full((num_boxes, 4), np.nan, np.float32)
    if num_boxes == 0:
        return out
    for k, sl in enumerate(ndimage.find_objects(instances, max_label=num_boxes)):
        if sl is not None:
            out[k] = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
    return out


@dataclass
class BoxBatch:
    """A batch in the library's packed form (B images, K boxes over the whole batch).

    - ``images``: (B, 3, H, W) float32 in [0, 1] (images smaller than the largest are padded bottom/right with 0).
    - ``masks``: (B, H, W) int64 with 255 on void and padding, or ``None`` when no sample has a mask.
    - ``has_mask``: (B,) bool, False for samples without a mask (their ``masks`` row is all 255).
    - ``valid``: (B, H, W) bool, False on padding; pass it as ``valid_mask`` to the pairwise losses.
    - ``boxes``: (K, 4) float32; ``box_batch``: (K,) int64 image index of each box; ``box_labels``: (K,) int64.
    - ``image_ids``: list of B strings; ``boxes_dropped``/``boxes_clipped``: transform counters summed over the batch.
    """

    images: torch.Tensor
    masks: torch.Tensor | None
    has_mask: torch.Tensor
    valid: torch.Tensor
    boxes: torch.Tensor
    box_batch: torch.Tensor
    box_labels: torch.Tensor
    image_ids: list[str]
    boxes_dropped: int = 0
    boxes_clipped: int = 0

    def to(self, device) -> BoxBatch:
        """The batch with every tensor moved to ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return BoxBatch(
            move(self.images),
            move(self.masks),
            move(self.has_mask),
            move(self.valid),
            move(self.boxes),
            move(self.box_batch),
            move(self.box_labels),
            list(self.image_ids),
            self.boxes_dropped,
            self.boxes_clipped,
        )


def collate_samples(samples: Sequence[Sample]) -> BoxBatch:
    """Pack samples into a :class:`BoxBatch`; use as ``DataLoader(..., collate_fn=collate_samples)``.

    Images of different sizes are padded bottom/right to the largest height and width; padding is 0 in ``images``,
    255 (void) in ``masks`` and False in ``valid``.

    Example:
        >>> import numpy as np
        >>> from boxloss.data import Sample, collate_samples
        >>> a = Sample(np.zeros((4, 6, 3), np.uint8), np.array([[1, 0, 3, 2]], np.float32), np.array([2]),
        ...            np.zeros((4, 6), np.uint8), "a")
        >>> b = Sample(np.zeros((5, 3, 3), np.uint8), np.zeros((0, 4), np.float32), np.zeros(0, np.int64), None, "b")
        >>> batch = collate_samples([a, b])
        >>> tuple(batch.images.shape), batch.box_batch.tolist(), batch.has_mask.tolist()
        ((2, 3, 5, 6), [0], [True, False])
    """
    if len(samples) == 0:
        raise ValueError("collate_samples: got an empty list of samples")
    for i, s in enumerate(samples):
        if not isinstance(s, Sample):
            raise TypeError(f"collate_samples: element {i} is a {type(s).__name__}, not a boxloss.data.Sample")
        s.check(f"collate_samples: sample {i} ({s.image_id})")
    b = len(samples)
    h = max(s.height for s in samples)
    w = max(s.width for s in samples)
    images = np.zeros((b, h, w, 3), np.uint8)
    valid = np.zeros((b, h, w), bool)
    any_mask = any(s.mask is not None for s in samples)
    masks = np.full((b, h, w), 255, np.uint8) if any_mask else None
    for i, s in enumerate(samples):
        images[i, : s.height, : s.width] = s.image
        valid[i, : s.height, : s.width] = True if s.valid is None else s.valid
        if s.mask is not None:
            masks[i, : s.height, : s.width] = s.mask
    boxes = np.concatenate([s.boxes for s in samples]) if b else np.zeros((0, 4), np.float32)
    box_batch = np.concatenate([np.full(s.num_boxes, i, np.int64) for i, s in enumerate(samples)])
    labels = np.concatenate([s.labels for s in samples])
    return BoxBatch(
        images=torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0).contiguous(),
        masks=None if masks is None else torch.from_numpy(masks).long(),
        has_mask=torch.tensor([s.mask is not None for s in samples], dtype=torch.bool),
        valid=torch.from_numpy(valid),
        boxes=torch.from_numpy(np.ascontiguousarray(boxes, np.float32)),
        box_batch=torch.from_numpy(box_batch),
        box_labels=torch.from_numpy(labels.astype(np.int64)),
        image_ids=[s.image_id for s in samples],
        boxes_dropped=sum(int(s.info.get("boxes_dropped", 0)) for s in samples),
        boxes_clipped=sum(int(s.info.get("boxes_clipped", 0)) for s in samples),
    )
