"""COCO instances format: export a dataset to it and load COCO-format data (masks decoded with pycocotools).

Layout written by :func:`export_coco` (the same as COCO 2017's)::

    annotations/instances_<split>.json
    <split>/<image_id>.jpg

Box coordinates: COCO's ``bbox`` is ``[x, y, w, h]`` in the same continuous pixel coordinates as the library, so
``x0, y0, x1, y1 = x, y, x + w, y + h`` with no offset (unlike VOC's 1-based XML).

Masks: the class mask is painted from the non-crowd instance masks, largest first so that smaller objects stay on
top where annotations overlap; crowd regions (``iscrowd: 1``), which COCO marks as ambiguous, become void (255).
:func:`export_coco` writes each object's visible region as a non-crowd RLE and the void band as crowd RLEs, so a
VOC-style mask with void comes back exactly. ``Sample.instances`` gives box k's pixels as k + 1.

pycocotools is imported only when masks are encoded or decoded.

Example:
    >>> import tempfile
    >>> from boxloss.data import SyntheticConfig, generate_sample, export_coco, COCOBoxDataset
    >>> cfg = SyntheticConfig(image_size=48)
    >>> root = tempfile.mkdtemp()
    >>> files = export_coco({"val": [generate_sample(cfg, "val", 0)]}, root, cfg.class_names)
    >>> ds = COCOBoxDataset(files["val"], f"{root}/val")
    >>> bool((ds[0].mask == generate_sample(cfg, "val", 0).mask).all())
    True
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from torch.utils.data import Dataset

from boxloss.data._images import image_size, read_image, write_image
from boxloss.data._issues import InputIssues, check_box
from boxloss.data._output import staged_output
from boxloss.data.sample import VOID, Sample
from boxloss.ops.boxes import box_pixel_ranges

CROWD = ("void", "ignore")


def box_to_coco(box: Sequence[float]) -> list[float]:
    """Continuous ``(x0, y0, x1, y1)`` -> COCO ``[x, y, w, h]``."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def coco_to_box(bbox: Sequence[float]) -> tuple[float, float, float, float]:
    """COCO ``[x, y, w, h]`` -> continuous ``(x0, y0, x1, y1)``."""
    x, y, w, h = (float(v) for v in bbox)
    return x, y, x + w, y + h


def _mask_api():
    try:
        from pycocotools import mask as mask_api
    except ImportError as e:  # pragma: no cover - pycocotools is a dependency
        raise ImportError("boxloss.data.coco needs pycocotools for masks: pip install pycocotools") from e
    return mask_api


def encode_rle(region: np.ndarray) -> dict:
    """A (H, W) bool region as a compressed COCO RLE ``{"size": [H, W], "counts": str}``."""
    rle = _mask_api().encode(np.asfortranarray(region.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_segmentation(seg, height: int, width: int) -> np.ndarray:
    """(H, W) bool from a COCO ``segmentation``: polygons, uncompressed RLE (list counts) or compressed RLE."""
    api = _mask_api()
    if isinstance(seg, list):
        rle = api.merge(api.frPyObjects([list(map(float, p)) for p in seg], height, width)) if seg else None
        if rle is None:
            return np.zeros((height, width), bool)
    elif isinstance(seg["counts"], list):
        rle = api.frPyObjects(seg, height, width)
    else:
        counts = seg["counts"]
        rle = {"size": list(seg["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    with warnings.catch_warnings():  # pycocotools' compiled decoder predates numpy 2's __array__(copy=) protocol
        warnings.filterwarnings(
            "ignore", message=r"__array__ implementation doesn't accept a copy keyword", category=DeprecationWarning
        )
        return api.decode(rle).astype(bool)


def _tight(region: np.ndarray) -> list[float]:
    rows, cols = np.flatnonzero(region.any(1)), np.flatnonzero(region.any(0))
    if rows.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return box_to_coco((cols[0], rows[0], cols[-1] + 1, rows[-1] + 1))


def object_regions(sample: Sample) -> list[np.ndarray]:
    """Each box's visible pixels: ``instances == k + 1`` when known, else its class's pixels inside it (a pixel in
    several boxes of its class goes to the smallest)."""
    if sample.instances is not None:
        return [sample.instances == k + 1 for k in range(sample.num_boxes)]
    h, w = sample.height, sample.width
    owner = np.full((h, w), -1, np.int64)
    areas = (sample.boxes[:, 2] - sample.boxes[:, 0]) * (sample.boxes[:, 3] - sample.boxes[:, 1])
    for k in np.argsort(-areas, kind="stable"):
        r0, r1, c0, c1 = box_pixel_ranges(sample.boxes[k], h, w)
        sub = owner[r0:r1, c0:c1]
        sub[sample.mask[r0:r1, c0:c1] == sample.labels[k]] = k
    return [(owner == k) & (sample.mask == sample.labels[k]) for k in range(sample.num_boxes)]


def _void_regions(sample: Sample) -> dict[int, np.ndarray]:
    """Void pixels grouped by the class of the nearest object pixel (COCO crowd annotations need a category)."""
    from scipy import ndimage

    void = sample.mask == VOID
    if not void.any():
        return {}
    is_obj = (sample.mask > 0) & ~void
    if not is_obj.any():
        return {1: void}
    iy, ix = ndimage.distance_transform_edt(~is_obj, return_distances=False, return_indices=True)
    nearest = sample.mask[iy, ix]
    return {int(c): void & (nearest == c) for c in np.unique(nearest[void])}


def export_coco(
    splits: Mapping[str, Iterable[Sample]],
    root: str | os.PathLike,
    class_names: Sequence[str],
    *,
    image_format: str = "jpg",
    quality: int = 95,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write samples in COCO layout under ``root``; returns the annotation file of each split.

    Categories get ids 1..L in class-channel order. Each box becomes a non-crowd annotation with its ``bbox``, its
    visible region as a compressed RLE and its ``area``; void pixels become crowd RLEs. ``image_format="png"`` is
    lossless; JPEG (COCO's) returns images only approximately. Masks and boxes always come back exactly.

    ``root`` must be new or empty unless ``overwrite=True``, which replaces the files the export writes and keeps the
    others.  Files are written into a hidden staging folder beside ``root`` and moved into place at the end (the
    annotation files last), so an interrupted export leaves no dataset that looks complete
    (:mod:`boxloss.data._output`).

    Example:
        >>> import tempfile
        >>> from boxloss.data import SyntheticConfig, generate_sample, export_coco
        >>> cfg = SyntheticConfig(image_size=48)
        >>> files = export_coco({"train": [generate_sample(cfg, "train", 0)]}, tempfile.mkdtemp(), cfg.class_names)
        >>> files["train"].name
        'instances_train.json'
    """
    if image_format not in ("jpg", "png"):
        raise ValueError(f"export_coco: image_format must be 'jpg' or 'png', got {image_format!r}")
    with staged_output("export_coco", root, overwrite=overwrite, is_index=_is_coco_index) as staging:
        files = _write_coco(splits, staging, class_names, image_format, quality)
    return {split: Path(root) / path.relative_to(staging) for split, path in files.items()}


def _is_coco_index(relative: Path) -> bool:
    return relative.parts[0] == "annotations"


def _write_coco(splits, root: Path, class_names, image_format: str, quality: int) -> dict[str, Path]:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": k, "name": n, "supercategory": "object"} for k, n in enumerate(class_names, 1)]
    files = {}
    for split, samples in splits.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for s in samples:
            s.check(f"export_coco: sample {s.image_id!r}")
            if s.num_boxes and s.labels.max() > len(class_names):
                raise ValueError(
                    f"export_coco: sample {s.image_id!r} has label {int(s.labels.max())} but only "
                    f"{len(class_names)} class names"
                )
            if any(c in s.image_id for c in "/\\\n") or not s.image_id:
                raise ValueError(f"export_coco: image_id {s.image_id!r} cannot be a file name")
            image_id = len(images) + 1
            name = f"{s.image_id}.{image_format}"
            write_image(root / split / name, s.image, quality)
            images.append({"id": image_id, "file_name": name, "width": s.width, "height": s.height})
            regions = object_regions(s) if s.mask is not None else [None] * s.num_boxes
            for box, label, region in zip(s.boxes, s.labels, regions):
                ann = {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": [float(v) for v in box_to_coco(box)],
                    "iscrowd": 0,
                    "area": float(region.sum()) if region is not None else float((box[2] - box[0]) * (box[3] - box[1])),
                }
                if region is not None:
                    ann["segmentation"] = encode_rle(region)
                annotations.append(ann)
            if s.mask is not None:
                for label, region in sorted(_void_regions(s).items()):
                    annotations.append(
                        {
                            "id": len(annotations) + 1,
                            "image_id": image_id,
                            "category_id": label,
                            "bbox": _tight(region),
                            "iscrowd": 1,
                            "area": float(region.sum()),
                            "segmentation": encode_rle(region),
                        }
                    )
        doc = {
            "info": {"description": "written by boxloss.data.export_coco"},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        path = root / "annotations" / f"instances_{split}.json"
        path.write_text(json.dumps(doc))
        files[split] = path
    return files


# ----------------------------------------------------------------------------------------------------------------
# Loading.


@dataclass
class _Ann:
    channel: int  # class channel, or 0 for a category outside the selection (painted background)
    segmentation: object
    box_index: int | None  # index into the image's boxes, None if the box was skipped or crowd
    crowd: bool
    unknown: bool = False  # unknown category: its pixels are void


@dataclass
class _Entry:
    image_id: str
    coco_id: object
    path: Path
    height: int
    width: int
    boxes: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    anns: list = field(default_factory=list)


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: annotation file not found")
    try:
        with open(path, "rb") as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError(
            f"{path}: the top level must be an object with images, annotations and categories, got "
            f"a {type(doc).__name__}"
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise ValueError(f"{path}: '{key}' must be a list, got {type(doc.get(key)).__name__}")
    return doc


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _short(text: str, n: int = 24) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def _compressed_rle_runs(counts: str) -> list[int] | None:
    """The run lengths of a compressed COCO RLE string, or None if it is not one.

    The format of pycocotools' ``rleFrString``: each run is a little-endian sequence of 5-bit groups stored as
    ``chr(48 + group)``, bit 0x20 meaning "more groups follow" and bit 0x10 of the last group the sign; from the
    third run on, the value is a difference to the run two before.  pycocotools decodes a string whose runs do not
    cover the image into uninitialised memory instead of failing, so the loader checks this first."""
    runs: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                return None
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def _polygons_outside(seg, h: int, w: int) -> bool:
    """Every polygon's vertices lie beyond one edge of the image, so the polygons cover no pixel."""
    for p in seg:
        xs, ys = p[0::2], p[1::2]
        if not (max(xs) <= 0 or min(xs) >= w or max(ys) <= 0 or min(ys) >= h):
            return False
    return bool(seg)


def _segmentation_problem(seg, h: int, w: int) -> tuple[str, str] | None:
    """(reason, detail) if ``seg`` is not a valid polygon list or RLE for an h x w image."""
    if isinstance(seg, list):
        for p in seg:
            if not (isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(_is_number(v) for v in p)):
                return "malformed segmentation", "a polygon must be a list of at least 6 numbers, an even count"
        return None
    if isinstance(seg, dict) and "size" in seg and "counts" in seg:
        size = seg["size"]
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
            return "malformed segmentation", f"RLE size must be [height, width], got {size!r}"
        if tuple(size) != (h, w):
            return "mask size differs from image", f"RLE size is {size[1]}x{size[0]} but the image is {w}x{h}"
        counts = seg["counts"]
        if isinstance(counts, list):
            if not all(isinstance(v, int) and v >= 0 for v in counts) or sum(counts) != h * w:
                return "malformed segmentation", f"uncompressed RLE counts must be ints >= 0 summing to {h * w}"
        elif not isinstance(counts, str):
            return "malformed segmentation", "RLE counts must be a string or a list of ints"
        else:
            runs = _compressed_rle_runs(counts)
            if runs is None:
                return (
                    "malformed segmentation",
                    f"compressed RLE counts {_short(counts)} are not a valid COCO RLE string",
                )
            if any(r < 0 for r in runs) or sum(runs) != h * w:
                return (
                    "malformed segmentation",
                    f"compressed RLE counts {_short(counts)} decode to runs summing to {sum(runs)} (with "
                    f"{sum(r < 0 for r in runs)} negative), not the {h * w} pixels of a {w}x{h} image",
                )
        return None
    return "malformed segmentation", f"expected polygons or an RLE dict, got {type(seg).__name__}"


class COCOBoxDataset(Dataset):
    """COCO-format boxes, labels and class masks as :class:`~boxloss.data.Sample`.

    Args:
        annotation_file: an instances JSON (``annotations/instances_train2017.json``).
        image_dir: the folder ``file_name`` is relative to (``train2017``).
        masks: decode segmentations into ``Sample.mask`` and ``Sample.instances``; ``False`` gives ``mask=None``.
        categories: category names to use, in class-channel order (channel k + 1 = ``categories[k]``). Default: all
            categories sorted by id. Annotations of other categories are left out (no box; their pixels stay
            background) and counted in :attr:`excluded`.
        crowd: ``"void"`` paints crowd regions 255 (default); ``"ignore"`` leaves them unpainted. Crowd annotations
            never give boxes.
        on_error: ``"raise"`` raises at the first bad input, naming the file and the entry; ``"skip"`` skips bad
            images and boxes, counts them in :attr:`skipped` / :attr:`repaired`, keeps messages in :attr:`skip_log`
            and warns. In both modes a box whose polygons lie wholly outside the image (no object pixel) is kept,
            counted in :attr:`noticed` and warned about. A skipped box of a valid segmentation still paints its mask (no box); a segmentation of an
            unknown category paints void, so no pixel is silently mislabelled.
        check_files: check at construction that every image exists and has the size the JSON says (one header read
            per image); ``False`` defers that to loading, where a mismatch raises.
        transform: called as ``transform(sample)`` on each item.

    Example (COCO 2017)::

        ds = COCOBoxDataset("coco/annotations/instances_val2017.json", "coco/val2017", on_error="skip")
        s = ds[0]       # Sample(image, boxes (K, 4) float32, labels (K,) int64 in 1..80, mask (H, W) uint8, ...)
        ds.class_names  # ('person', 'bicycle', ...)
    """

    def __init__(
        self,
        annotation_file: str | os.PathLike,
        image_dir: str | os.PathLike,
        *,
        masks: bool = True,
        categories: Sequence[str] | None = None,
        crowd: str = "void",
        on_error: str = "raise",
        check_files: bool = True,
        transform: Callable[[Sample], Sample] | None = None,
    ):
        path = Path(annotation_file)
        self.annotation_file, self.image_dir = path, Path(image_dir)
        owner = f"COCOBoxDataset({str(path)!r})"
        if crowd not in CROWD:
            raise ValueError(f"{owner}: crowd must be 'void' or 'ignore', got {crowd!r}")
        issues = InputIssues(owner, on_error)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"{owner}: image_dir {self.image_dir} is not a folder")
        doc = _load_json(path)
        self.masks, self.crowd, self.transform = bool(masks), crowd, transform
        self.excluded: Counter = Counter()

        cats = {}
        for i, c in enumerate(doc["categories"]):
            if not (isinstance(c, dict) and isinstance(c.get("id"), int) and isinstance(c.get("name"), str)):
                raise ValueError(f"{path}: categories[{i}] must have an int 'id' and a str 'name', got {c!r}")
            if c["id"] in cats:
                raise ValueError(f"{path}: categories[{i}] repeats category id {c['id']}")
            cats[c["id"]] = c["name"]
        if categories is None:
            names = [cats[k] for k in sorted(cats)]
        else:
            names = list(categories)
            missing = [n for n in names if n not in cats.values()]
            if missing:
                raise ValueError(f"{owner}: categories {missing} are not in {path} (it has {sorted(cats.values())})")
        if len(set(names)) != len(names):
            raise ValueError(f"{owner}: category names must be distinct, got {names}")
        if len(names) > 254:
            raise ValueError(f"{owner}: at most 254 classes fit a uint8 mask with void 255, got {len(names)}")
        self.class_names = tuple(names)
        self.num_classes = len(names)
        channel = {cid: names.index(n) + 1 for cid, n in cats.items() if n in names}

        entries: dict = {}
        for i, im in enumerate(doc["images"]):
            where = f"{path}: images[{i}]"
            if not isinstance(im, dict) or not all(k in im for k in ("id", "file_name", "width", "height")):
                issues.problem("malformed image entry", f"{where} needs id, file_name, width and height, got {im!r}")
                continue
            if not (
                isinstance(im["width"], int)
                and isinstance(im["height"], int)
                and im["width"] > 0
                and im["height"] > 0
                and isinstance(im["file_name"], str)
            ):
                issues.problem(
                    "malformed image entry",
                    f"{where} has width={im['width']!r}, height={im['height']!r}, file_name={im['file_name']!r}",
                )
                continue
            if im["id"] in entries:
                issues.problem("duplicate image id", f"{where} repeats image id {im['id']!r}")
                continue
            file = self.image_dir / im["file_name"]
            if check_files:
                if not file.is_file():
                    issues.problem("missing image", f"{file}: image not found ({where})", FileNotFoundError)
                    continue
                try:
                    h, w = image_size(file)
                except Exception as e:  # noqa: BLE001 -- PIL raises several types for a broken file
                    issues.problem("unreadable image", f"{file}: cannot read the image header ({e})")
                    continue
                if (h, w) != (im["height"], im["width"]):
                    issues.problem(
                        "image size differs from annotation",
                        f"{file} is {w}x{h} but {where} says {im['width']}x{im['height']}",
                    )
                    continue
            entries[im["id"]] = _Entry(Path(im["file_name"]).stem, im["id"], file, im["height"], im["width"])

        listed = {im.get("id") for im in doc["images"] if isinstance(im, dict) and isinstance(im.get("id"), (int, str))}
        bad_images = set()
        for i, a in enumerate(doc["annotations"]):
            where = f"{path}: annotations[{i}]"
            if not isinstance(a, dict) or "image_id" not in a or "category_id" not in a:
                issues.problem("malformed annotation", f"{where} needs image_id and category_id, got {a!r}")
                continue
            e = entries.get(a["image_id"])
            if e is None:
                if not isinstance(a["image_id"], (int, str)) or a["image_id"] not in listed:
                    issues.problem(
                        "annotation of unknown image",
                        f"{where} refers to image_id {a['image_id']!r}, which is not in images",
                    )
                continue  # an annotation of an image skipped above goes with it
            crowd_ann = bool(a.get("iscrowd", 0))
            seg = a.get("segmentation")
            if self.masks:
                if seg is None:
                    issues.problem(
                        "missing segmentation", f"{where} has no segmentation (masks=False loads boxes only)"
                    )
                    bad_images.add(a["image_id"])
                    continue
                bad = _segmentation_problem(seg, e.height, e.width)
                if bad is not None:
                    issues.problem(bad[0], f"{where} (image {e.path.name}): {bad[1]}")
                    bad_images.add(a["image_id"])
                    continue
                if isinstance(seg, list) and not crowd_ann and _polygons_outside(seg, e.height, e.width):
                    issues.notice(
                        "segmentation outside the image",
                        f"{where} (image {e.path.name}): the polygon lies wholly outside the {e.width}x{e.height} "
                        f"image, so its box {a.get('bbox')!r} holds no object pixel",
                    )
            cid = a["category_id"]
            if cid not in cats:
                issues.problem("unknown category", f"{where} has category_id {cid!r}, which is not in categories")
                if self.masks:
                    e.anns.append(_Ann(0, seg, None, crowd_ann, unknown=True))
                continue
            if cid not in channel:
                self.excluded[f"annotations of category {cats[cid]!r}"] += 1
                continue
            if crowd_ann:
                if self.masks:
                    e.anns.append(_Ann(channel[cid], seg, None, True))
                continue
            box = self._box(a, e, where, issues)
            if box is not None:
                e.boxes.append(box)
                e.labels.append(channel[cid])
            if self.masks:
                e.anns.append(_Ann(channel[cid], seg, None if box is None else len(e.boxes) - 1, False))
        for image in bad_images:
            entries.pop(image, None)
        self.entries = list(entries.values())
        self.skipped, self.repaired, self.skip_log = issues.skipped, issues.repaired, issues.log
        self.noticed = issues.noticed
        issues.report()

    @staticmethod
    def _box(a: dict, e: _Entry, where: str, issues: InputIssues):
        bbox = a.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            issues.problem("malformed bbox", f"{where}: bbox must be [x, y, w, h] of 4 finite numbers, got {bbox!r}")
            return None
        if bbox[2] <= 0 or bbox[3] <= 0:
            issues.problem("zero-size box", f"{where} (image {e.path.name}): bbox {bbox} has w or h <= 0")
            return None
        return check_box(coco_to_box(bbox), e.width, e.height, f"{where} (image {e.path.name}): bbox", issues)

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, i: int) -> Sample:
        """Item ``i`` without the transform."""
        e = self.entries[i]
        image = read_image(e.path)
        if image.shape[:2] != (e.height, e.width):
            raise ValueError(
                f"{e.path}: image is {image.shape[1]}x{image.shape[0]} but {self.annotation_file} says "
                f"{e.width}x{e.height}"
            )
        boxes = np.asarray(e.boxes, np.float32).reshape(-1, 4)
        labels = np.asarray(e.labels, np.int64)
        mask = instances = None
        if self.masks:
            mask = np.zeros((e.height, e.width), np.uint8)
            instances = np.zeros((e.height, e.width), np.int32)
            void = np.zeros((e.height, e.width), bool)
            things = []
            for a in e.anns:
                try:
                    region = decode_segmentation(a.segmentation, e.height, e.width)
                except ValueError as err:
                    raise ValueError(
                        f"{self.annotation_file}: a segmentation of image {e.path.name} cannot be decoded ({err})"
                    ) from None
                if a.unknown or (a.crowd and self.crowd == "void"):
                    void |= region
                elif not a.crowd:
                    things.append((int(region.sum()), region, a))
            for _, region, a in sorted(things, key=lambda t: -t[0]):  # largest first: smaller objects stay on top
                mask[region] = a.channel
                instances[region] = 0 if a.box_index is None else a.box_index + 1
            mask[void] = VOID
        return Sample(image, boxes, labels, mask, e.image_id, instances)

    def __getitem__(self, i: int) -> Sample:
        s = self.load(i)
        return self.transform(s) if self.transform is not None else s
