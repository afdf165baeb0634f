"""Data for box-supervised segmentation: an embedded synthetic benchmark, VOC and COCO loaders, transforms, and the
single-class box crops of Box to Tag and Back.

Every dataset returns the same :class:`Sample` (image (H, W, 3) uint8, boxes (K, 4) float32 ``x0, y0, x1, y1`` in
continuous pixel coordinates, labels (K,) int64 in 1..L, mask (H, W) uint8 with 255 void or ``None``, image_id), and
:func:`collate_samples` packs a list of them into the library's packed form (images, boxes, box_batch, box_labels).

Example:
    >>> from torch.utils.data import DataLoader
    >>> from boxloss.data import SyntheticBoxDataset, SyntheticConfig, collate_samples
    >>> ds = SyntheticBoxDataset("train", 4, SyntheticConfig(image_size=64), cache=False)
    >>> batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate_samples)))
    >>> tuple(batch.images.shape), batch.boxes.shape[1], batch.box_batch.shape == batch.box_labels.shape
    ((4, 3, 64, 64), 4, True)

Command line: ``python -m boxloss.data generate | stats | export --format voc|coco`` (``--help`` for options).
"""

from boxloss.data.box_crops import BoxCrop, BoxCropDataset, CropBatch, collate_crops, crop_boxes, paste_crop
from boxloss.data.coco import COCOBoxDataset, box_to_coco, coco_to_box, export_coco
from boxloss.data.sample import VOID, BoxBatch, Sample, boxes_from_instances, collate_samples
from boxloss.data.stats import VOC_REFERENCE, DatasetStatistics, compute_statistics, format_report
from boxloss.data.synthetic import (
    DEFAULT_SPLIT_SIZES,
    GENERATOR_VERSION,
    SPLITS,
    SyntheticBoxDataset,
    SyntheticConfig,
    cache_path,
    cache_root,
    generate_sample,
    generate_split,
    synthetic_class_names,
)
from boxloss.data.voc import (
    VOC_CLASSES,
    VOCBoxDataset,
    box_to_voc,
    export_voc,
    read_mask_png,
    voc_palette,
    voc_to_box,
    write_mask_png,
)

__all__ = [
    "BoxBatch",
    "BoxCrop",
    "BoxCropDataset",
    "CropBatch",
    "COCOBoxDataset",
    "DEFAULT_SPLIT_SIZES",
    "DatasetStatistics",
    "GENERATOR_VERSION",
    "SPLITS",
    "Sample",
    "SyntheticBoxDataset",
    "SyntheticConfig",
    "VOC_CLASSES",
    "VOC_REFERENCE",
    "VOCBoxDataset",
    "VOID",
    "box_to_coco",
    "box_to_voc",
    "boxes_from_instances",
    "cache_path",
    "cache_root",
    "coco_to_box",
    "collate_crops",
    "collate_samples",
    "compute_statistics",
    "crop_boxes",
    "export_coco",
    "export_voc",
    "format_report",
    "generate_sample",
    "generate_split",
    "paste_crop",
    "read_mask_png",
    "synthetic_class_names",
    "voc_palette",
    "voc_to_box",
    "write_mask_png",
]
