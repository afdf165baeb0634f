"""PASCAL VOC layout: export a dataset to it and load VOC 2012 (with or without SBD's ``SegmentationClassAug``).

Layout (``root`` is the folder holding ``JPEGImages``, e.g. ``VOCdevkit/VOC2012``)::

    JPEGImages/<id>.jpg                   RGB images
    Annotations/<id>.xml                  boxes: <object><name>, <bndbox><xmin>..<ymax>, <difficult>, <truncated>
    SegmentationClass/<id>.png            class masks, "P" mode with the VOC palette (index = class, 255 = void)
    SegmentationClassAug/<id>.png         SBD-augmented masks (10,582 train_aug images), usually "L" mode indices
    ImageSets/Segmentation/<split>.txt    one id per line

Box coordinates: VOC's XML uses 1-based, inclusive pixel indices, so an object whose columns span j_min..j_max
(0-based) has ``xmin = j_min + 1`` and ``xmax = j_max + 1``. In the library's continuous convention its box is
``x0 = j_min = xmin - 1`` and ``x1 = j_max + 1 = xmax``; the same holds for y. So reading subtracts 1 from
``xmin``/``ymin`` and keeps ``xmax``/``ymax``, and writing adds 1 to ``x0``/``y0``.

Example:
    >>> import tempfile
    >>> from boxloss.data import SyntheticConfig, generate_sample, export_voc, VOCBoxDataset
    >>> cfg = SyntheticConfig(image_size=48)
    >>> root = tempfile.mkdtemp()
    >>> _ = export_voc({"train": [generate_sample(cfg, "train", i) for i in range(2)]}, root, cfg.class_names)
    >>> ds = VOCBoxDataset(root, "train")
    >>> bool((ds[1].mask == generate_sample(cfg, "train", 1).mask).all())
    True
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from boxloss.data._images import image_size, read_image, write_image
from boxloss.data._issues import InputIssues, check_box
from boxloss.data._output import staged_output
from boxloss.data.sample import VOID, Sample

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
CLASS_NAMES_FILE = "class_names.txt"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def voc_palette() -> np.ndarray:
    """The (256, 3) uint8 VOC colour map: index c gets the bits of c spread over R, G, B from the top bit down
    (0 black, 1 (128, 0, 0), ..., 255 (224, 224, 192) for void)."""
    pal = np.zeros((256, 3), np.uint8)
    for i in range(256):
        c, rgb = i, [0, 0, 0]
        for j in range(8):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << (7 - j)
            c >>= 3
        pal[i] = rgb
    return pal


def box_to_voc(box: Sequence[float]) -> tuple[float, float, float, float]:
    """Continuous ``(x0, y0, x1, y1)`` -> VOC 1-based inclusive ``(xmin, ymin, xmax, ymax)``."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return x0 + 1.0, y0 + 1.0, x1, y1


def voc_to_box(xmin: float, ymin: float, xmax: float, ymax: float) -> tuple[float, float, float, float]:
    """VOC 1-based inclusive ``(xmin, ymin, xmax, ymax)`` -> continuous ``(x0, y0, x1, y1)``."""
    return float(xmin) - 1.0, float(ymin) - 1.0, float(xmax), float(ymax)


def _fmt(v: float) -> str:
    v = float(v)
    return str(int(v)) if v.is_integer() else repr(v)


# ----------------------------------------------------------------------------------------------------------------
# Files.


def write_mask_png(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Write a (H, W) uint8 class mask as a "P" mode PNG with the VOC palette (as VOC's SegmentationClass)."""
    img = Image.fromarray(np.ascontiguousarray(mask, np.uint8), mode="P")
    img.putpalette(voc_palette().ravel().tolist())
    img.save(path)


def read_mask_png(path: str | os.PathLike, num_classes: int | None = None) -> np.ndarray:
    """Read a class mask PNG as (H, W) uint8: "P" (VOC) and "L" (SBD SegmentationClassAug) give their indices,
    RGB masks are mapped back through the VOC palette. Values other than 0..num_classes and 255 raise."""
    path = Path(path)
    try:
        mask = _decode_mask(path)
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot decode the mask ({e})") from None
    if num_classes is not None and mask.size:
        bad = (mask > num_classes) & (mask != VOID)
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise ValueError(
                f"{path}: mask value {int(mask[i, j])} at row {i}, column {j} is neither a class "
                f"(0..{num_classes}) nor void (255)"
            )
    return mask


def _decode_mask(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        mode = img.mode
        if mode in ("P", "L"):
            mask = np.array(img, np.uint8)
        elif mode in ("RGB", "RGBA"):
            rgb = np.array(img.convert("RGB"), np.int64)
            code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
            pal = voc_palette().astype(np.int64)
            pal_code = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
            order = np.argsort(pal_code)
            pos = np.clip(np.searchsorted(pal_code[order], code), 0, 255)
            found = pal_code[order][pos] == code
            if not found.all():
                i, j = np.argwhere(~found)[0]
                raise ValueError(
                    f"{path}: RGB mask colour {tuple(int(v) for v in rgb[i, j])} at row {i}, column {j} is not in "
                    "the VOC palette"
                )
            mask = order[pos].astype(np.uint8)
        elif mode in ("I", "I;16", "1"):
            arr = np.array(img)
            if arr.size and (arr.min() < 0 or arr.max() > 255):
                raise ValueError(f"{path}: {mode} mask has values outside 0..255 ({arr.min()}..{arr.max()})")
            mask = arr.astype(np.uint8)
        else:
            raise ValueError(f"{path}: unsupported mask image mode {mode!r} (expected P, L or RGB)")
    return mask


@dataclass
class VOCObject:
    name: str
    bndbox: tuple[float, float, float, float]  # VOC's own 1-based inclusive xmin, ymin, xmax, ymax
    difficult: bool = False
    truncated: bool = False


@dataclass
class VOCAnnotation:
    filename: str | None
    width: int | None
    height: int | None
    objects: list[VOCObject] = field(default_factory=list)


def write_voc_xml(
    path: str | os.PathLike,
    filename: str,
    width: int,
    height: int,
    boxes: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    segmented: bool = True,
) -> None:
    """Write a VOC annotation; ``boxes`` (K, 4) are continuous ``x0, y0, x1, y1`` and ``labels`` (K,) class channels
    1..L named by ``class_names[label - 1]``. A box touching the image border is marked truncated."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "boxloss"
    ET.SubElement(root, "filename").text = filename
    size = ET.SubElement(root, "size")
    for tag, v in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(int(v))
    ET.SubElement(root, "segmented").text = "1" if segmented else "0"
    for box, label in zip(np.asarray(boxes, np.float64), np.asarray(labels)):
        if not 1 <= int(label) <= len(class_names):
            raise ValueError(
                f"write_voc_xml({path}): label {int(label)} has no name in class_names ({len(class_names)} classes)"
            )
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = class_names[int(label) - 1]
        ET.SubElement(obj, "pose").text = "Unspecified"
        touches = box[0] <= 0 or box[1] <= 0 or box[2] >= width or box[3] >= height
        ET.SubElement(obj, "truncated").text = "1" if touches else "0"
        ET.SubElement(obj, "difficult").text = "0"
        bb = ET.SubElement(obj, "bndbox")
        for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), box_to_voc(box)):
            ET.SubElement(bb, tag).text = _fmt(v)
    ET.indent(root)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=False)


def read_voc_xml(path: str | os.PathLike) -> VOCAnnotation:
    """Parse a VOC annotation. Malformed XML, a missing ``<name>``/``<bndbox>`` coordinate or a non-numeric value
    raises ``ValueError`` naming the file and the object."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{path}: malformed XML: {e}") from None
    if root.tag != "annotation":
        raise ValueError(f"{path}: the root element is <{root.tag}>, expected <annotation>")

    def number(elem, tag, what, kind=float):
        node = elem.find(tag)
        if node is None or node.text is None or not node.text.strip():
            raise ValueError(f"{path}: {what} has no <{tag}>")
        try:
            return kind(float(node.text.strip())) if kind is int else kind(node.text.strip())
        except ValueError:
            raise ValueError(f"{path}: {what} has <{tag}>{node.text.strip()}</{tag}>, not a number") from None

    width = height = None
    size = root.find("size")
    if size is not None and size.find("width") is not None:
        width = number(size, "width", "<size>", int)
        height = number(size, "height", "<size>", int)
    fn = root.find("filename")
    ann = VOCAnnotation(filename=fn.text.strip() if fn is not None and fn.text else None, width=width, height=height)
    for i, obj in enumerate(root.findall("object")):
        what = f"<object> {i}"
        name = obj.find("name")
        if name is None or not (name.text or "").strip():
            raise ValueError(f"{path}: {what} has no <name>")
        bb = obj.find("bndbox")
        if bb is None:
            raise ValueError(f"{path}: {what} ({name.text.strip()}) has no <bndbox>")
        coords = tuple(number(bb, t, f"<bndbox> of {what}") for t in ("xmin", "ymin", "xmax", "ymax"))
        flag = lambda tag: obj.find(tag) is not None and (obj.find(tag).text or "0").strip() in ("1", "true")  # noqa
        ann.objects.append(VOCObject(name.text.strip(), coords, flag("difficult"), flag("truncated")))
    return ann


# ----------------------------------------------------------------------------------------------------------------
# Export.


def export_voc(
    splits: Mapping[str, Iterable[Sample]],
    root: str | os.PathLike,
    class_names: Sequence[str],
    *,
    image_format: str = "jpg",
    quality: int = 95,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write samples in VOC layout under ``root``; returns the number of images written per split.

    ``splits`` maps split names (``"train"``, ``"val"``, ...) to samples; each split gets
    ``ImageSets/Segmentation/<split>.txt``. ``image_format="jpg"`` is what VOC uses (lossy, so images come back only
    approximately); ``"png"`` is lossless. Masks and boxes always come back exactly. ``class_names.txt`` records the
    class order, and :class:`VOCBoxDataset` reads it when given no ``class_names``.

    ``root`` must be new or empty unless ``overwrite=True``, which replaces the files the export writes and keeps the
    others.  Files are written into a hidden staging folder beside ``root`` and moved into place at the end (the
    split lists last), so an interrupted export leaves no dataset that looks complete (:mod:`boxloss.data._output`).

    Example:
        >>> import tempfile
        >>> from boxloss.data import SyntheticBoxDataset, SyntheticConfig, export_voc
        >>> cfg = SyntheticConfig(image_size=48)
        >>> ds = SyntheticBoxDataset("val", 3, cfg, cache=False)
        >>> export_voc({"val": ds}, tempfile.mkdtemp(), cfg.class_names)
        {'val': 3}
    """
    if image_format not in ("jpg", "png"):
        raise ValueError(f"export_voc: image_format must be 'jpg' or 'png', got {image_format!r}")
    with staged_output("export_voc", root, overwrite=overwrite, is_index=_is_voc_index) as staging:
        return _write_voc(splits, staging, class_names, image_format, quality)


def _is_voc_index(relative: Path) -> bool:
    return relative.parts[0] == "ImageSets" or relative.name == CLASS_NAMES_FILE


def _write_voc(splits, root: Path, class_names, image_format: str, quality: int) -> dict[str, int]:
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / CLASS_NAMES_FILE).write_text("".join(f"{n}\n" for n in class_names))
    counts = {}
    for split, samples in splits.items():
        ids = []
        for s in samples:
            s.check(f"export_voc: sample {s.image_id!r}")
            if any(c in s.image_id for c in "/\\ \n") or not s.image_id:
                raise ValueError(f"export_voc: image_id {s.image_id!r} cannot be a VOC file name")
            name = f"{s.image_id}.{image_format}"
            write_image(root / "JPEGImages" / name, s.image, quality)
            write_voc_xml(
                root / "Annotations" / f"{s.image_id}.xml",
                name,
                s.width,
                s.height,
                s.boxes,
                s.labels,
                class_names,
                segmented=s.mask is not None,
            )
            if s.mask is not None:
                write_mask_png(root / "SegmentationClass" / f"{s.image_id}.png", s.mask)
            ids.append(s.image_id)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        counts[split] = len(ids)
    return counts


# ----------------------------------------------------------------------------------------------------------------
# Loading.


def read_id_list(path: Path) -> list[str]:
    """Ids from a VOC image-set file: the first token of each non-empty line; a token that is a path (SBD's
    ``train_aug.txt`` lines read ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png``) gives its file stem."""
    ids = []
    for line in path.read_text().splitlines():
        tok = line.split()
        if not tok or tok[0].startswith("#"):
            continue
        ids.append(Path(tok[0]).stem if ("/" in tok[0] or "." in tok[0]) else tok[0])
    return ids


def resolve_class_names(root: Path, class_names) -> tuple[str, ...]:
    if class_names is None:
        f = root / CLASS_NAMES_FILE
        class_names = [n.strip() for n in f.read_text().splitlines() if n.strip()] if f.is_file() else VOC_CLASSES
    names = tuple(class_names)
    if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"class_names must be distinct non-empty strings, got {list(names)!r}")
    if len(names) > 254:
        raise ValueError(f"class_names: at most 254 classes fit a uint8 mask with void 255, got {len(names)}")
    return names


@dataclass
class _Entry:
    image_id: str
    image_path: Path
    mask_path: Path | None
    boxes: np.ndarray
    labels: np.ndarray


class VOCBoxDataset(Dataset):
    """PASCAL VOC (or VOC-layout) boxes, labels and class masks as :class:`~boxloss.data.Sample`.

    Args:
        root: the folder holding ``JPEGImages``, ``Annotations``, ... (``VOCdevkit/VOC2012``).
        split: a split name, read from ``root/image_set_dir/<split>.txt``, or a path to an id list.
        masks: the mask folder under ``root`` (``"SegmentationClass"``, or ``"SegmentationClassAug"`` for SBD), an
            absolute folder, or ``None`` to load boxes only (``Sample.mask`` is then ``None``).
        class_names: class channel k + 1 is ``class_names[k]``. Default: ``root/class_names.txt`` if present (written
            by :func:`export_voc`), else the 20 VOC classes.
        image_set_dir: where split files live (``"ImageSets/SegmentationAug"`` for the usual SBD ``train_aug.txt``).
        keep_difficult: keep objects marked ``<difficult>1`` (VOC's masks include them).
        on_error: ``"raise"`` (default) raises at the first bad input, naming the file; ``"skip"`` skips bad images
            and boxes, counts them in :attr:`skipped` / :attr:`repaired`, keeps messages in :attr:`skip_log` and warns.
        transform: called as ``transform(sample)`` on each item (see :mod:`boxloss.data.transforms`).

    Everything but pixel data is read and checked when the dataset is built (annotations, file presence, image and
    mask sizes from the file headers), so ``len`` counts only usable images. Mask values are checked on load.

    Example (VOC 2012 with SBD)::

        ds = VOCBoxDataset("VOCdevkit/VOC2012", "train_aug", masks="SegmentationClassAug",
                           image_set_dir="ImageSets/SegmentationAug")
        s = ds[0]   # Sample(image (H, W, 3) uint8, boxes (K, 4) float32, labels (K,) int64, mask (H, W) uint8, ...)
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        masks: str | None = "SegmentationClass",
        class_names: Sequence[str] | None = None,
        image_set_dir: str = "ImageSets/Segmentation",
        keep_difficult: bool = True,
        on_error: str = "raise",
        transform: Callable[[Sample], Sample] | None = None,
    ):
        self.root = Path(root)
        owner = f"VOCBoxDataset({str(self.root)!r}, {split!r})"
        issues = InputIssues(owner, on_error)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{owner}: root {self.root} is not a folder")
        self.class_names = resolve_class_names(self.root, class_names)
        self.num_classes = len(self.class_names)
        index = {n: i + 1 for i, n in enumerate(self.class_names)}
        split_path = (
            Path(split)
            if (str(split).endswith(".txt") or os.sep in str(split))
            else self.root / image_set_dir / f"{split}.txt"
        )
        if not split_path.is_file():
            folder = split_path.parent
            have = sorted(p.stem for p in folder.glob("*.txt")) if folder.is_dir() else []
            raise FileNotFoundError(f"{owner}: split file {split_path} not found (splits in {folder}: {have})")
        self.split_file = split_path
        mask_dir = None if masks is None else (Path(masks) if os.path.isabs(masks) else self.root / masks)
        if mask_dir is not None and not mask_dir.is_dir():
            raise FileNotFoundError(f"{owner}: mask folder {mask_dir} not found (masks=None loads boxes only)")
        self.mask_dir = mask_dir
        self.transform = transform
        self.entries: list[_Entry] = []
        seen = set()
        for image_id in read_id_list(split_path):
            if image_id in seen:
                issues.problem("duplicate id", f"{split_path}: id {image_id} is listed twice")
                continue
            seen.add(image_id)
            entry = self._index(image_id, index, keep_difficult, issues)
            if entry is not None:
                self.entries.append(entry)
        self.skipped, self.repaired, self.skip_log = issues.skipped, issues.repaired, issues.log
        issues.report()

    def _index(self, image_id: str, index: dict, keep_difficult: bool, issues: InputIssues) -> _Entry | None:
        img_dir = self.root / "JPEGImages"
        image_path = next(
            (img_dir / f"{image_id}{e}" for e in IMAGE_EXTENSIONS if (img_dir / f"{image_id}{e}").is_file()), None
        )
        if image_path is None:
            issues.problem(
                "missing image",
                f"{img_dir / image_id}.jpg: image not found (listed in {self.split_file})",
                FileNotFoundError,
            )
            return None
        xml_path = self.root / "Annotations" / f"{image_id}.xml"
        if not xml_path.is_file():
            issues.problem(
                "missing annotation",
                f"{xml_path}: annotation not found (listed in {self.split_file})",
                FileNotFoundError,
            )
            return None
        try:
            ann = read_voc_xml(xml_path)
        except ValueError as e:
            issues.problem("malformed annotation", str(e))
            return None
        try:
            h, w = image_size(image_path)
        except Exception as e:  # noqa: BLE001 -- PIL raises several types for a broken file
            issues.problem("unreadable image", f"{image_path}: cannot read the image header ({e})")
            return None
        if ann.width is not None and (ann.width, ann.height) != (w, h) and (ann.width, ann.height) != (0, 0):
            issues.problem(
                "annotation size differs from image",
                f"{xml_path}: <size> says {ann.width}x{ann.height} but {image_path} is {w}x{h}",
            )
            return None
        mask_path = None
        if self.mask_dir is not None:
            mask_path = self.mask_dir / f"{image_id}.png"
            if not mask_path.is_file():
                issues.problem(
                    "missing mask", f"{mask_path}: mask not found (listed in {self.split_file})", FileNotFoundError
                )
                return None
            try:
                mh, mw = image_size(mask_path)
            except Exception as e:  # noqa: BLE001
                issues.problem("unreadable mask", f"{mask_path}: cannot read the mask header ({e})")
                return None
            if (mh, mw) != (h, w):
                issues.problem(
                    "mask size differs from image",
                    f"{mask_path}: mask is {mw}x{mh} but the image {image_path} is {w}x{h}",
                )
                return None
        boxes, labels = [], []
        for i, obj in enumerate(ann.objects):
            where = f"{xml_path}: <object> {i} ({obj.name})"
            if obj.name not in index:
                issues.problem(
                    "unknown class", f"{where}: class name {obj.name!r} is not in class_names {list(self.class_names)}"
                )
                continue
            if obj.difficult and not keep_difficult:
                continue
            xmin, ymin, xmax, ymax = obj.bndbox
            if xmax < xmin or ymax < ymin:
                issues.problem(
                    "zero-size box",
                    f"{where}: <bndbox> has xmin={xmin:g}, xmax={xmax:g}, ymin={ymin:g}, "
                    f"ymax={ymax:g}: xmax < xmin or ymax < ymin",
                )
                continue
            box = check_box(voc_to_box(*obj.bndbox), w, h, f"{where}: <bndbox>", issues)
            if box is not None:
                boxes.append(box)
                labels.append(index[obj.name])
        return _Entry(
            image_id, image_path, mask_path, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64)
        )

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, i: int) -> Sample:
        """Item ``i`` without the transform."""
        e = self.entries[i]
        image = read_image(e.image_path)
        mask = None
        if e.mask_path is not None:
            mask = read_mask_png(e.mask_path, self.num_classes)
            if mask.shape != image.shape[:2]:
                raise ValueError(
                    f"{e.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
                    f"{image.shape[1]}x{image.shape[0]}"
                )
        return Sample(image, e.boxes.copy(), e.labels.copy(), mask, e.image_id)

    def __getitem__(self, i: int) -> Sample:
        s = self.load(i)
        return self.transform(s) if self.transform is not None else s
