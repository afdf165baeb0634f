"""VOC layout: round trips, the 1-based XML convention, the palette, SBD masks, and every kind of bad input."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from boxloss.data import (
    VOC_CLASSES,
    Sample,
    SyntheticBoxDataset,
    VOCBoxDataset,
    box_to_voc,
    export_voc,
    read_mask_png,
    voc_palette,
    voc_to_box,
    write_mask_png,
)
from boxloss.data.voc import read_voc_xml, write_voc_xml
from data_builders import SMALL, assert_same_sample, small_samples, voc_folder


def test_round_trip_png_is_exact_for_every_split(tmp_path):
    splits = {"train": small_samples("train", 3), "val": small_samples("val", 2)}
    assert export_voc(splits, tmp_path, SMALL.class_names, image_format="png") == {"train": 3, "val": 2}
    for split, samples in splits.items():
        ds = VOCBoxDataset(tmp_path, split)
        assert ds.class_names == tuple(SMALL.class_names) and len(ds) == len(samples)
        for i, s in enumerate(samples):
            loaded = ds[i]
            loaded.check()
            assert_same_sample(loaded, s)
            assert loaded.boxes.dtype == np.float32 and loaded.labels.dtype == np.int64


def test_round_trip_jpeg_keeps_masks_and_boxes_exact_and_images_close(tmp_path):
    ds = SyntheticBoxDataset("train", 3, SMALL, cache=False)
    export_voc({"train": ds}, tmp_path, SMALL.class_names)
    assert (tmp_path / "JPEGImages" / "train_000000.jpg").is_file()
    loaded = VOCBoxDataset(tmp_path, "train")
    for i in range(3):
        assert_same_sample(loaded[i], ds[i], image=False)
        diff = np.abs(loaded[i].image.astype(int) - ds[i].image.astype(int))
        assert diff.mean() < 5


def test_voc_coordinates_are_one_based_inclusive():
    # pixels with columns 2..4 and rows 1..2: continuous box (2, 1, 5, 3); VOC xmin=3, ymin=2, xmax=5, ymax=3
    assert box_to_voc((2, 1, 5, 3)) == (3, 2, 5, 3)
    assert voc_to_box(3, 2, 5, 3) == (2, 1, 5, 3)
    assert voc_to_box(1, 1, 500, 375) == (0, 0, 500, 375)  # a whole 500x375 VOC image


def test_written_xml_uses_voc_coordinates_and_marks_truncation(tmp_path):
    path = tmp_path / "a.xml"
    write_voc_xml(
        path, "a.jpg", 10, 8, np.array([[2, 1, 5, 3], [0, 4, 10, 8]], np.float32), np.array([2, 1]), ["cat", "dog"]
    )
    objs = ET.parse(path).getroot().findall("object")
    assert [o.find("name").text for o in objs] == ["dog", "cat"]
    assert [int(objs[0].find("bndbox").find(t).text) for t in ("xmin", "ymin", "xmax", "ymax")] == [3, 2, 5, 3]
    assert [o.find("truncated").text for o in objs] == ["0", "1"]
    ann = read_voc_xml(path)
    assert (ann.width, ann.height) == (10, 8) and ann.objects[1].bndbox == (1, 5, 10, 8)
    with pytest.raises(ValueError, match="label 3"):
        write_voc_xml(path, "a.jpg", 10, 8, np.array([[0, 0, 1, 1]], np.float32), np.array([3]), ["cat", "dog"])


def test_palette_and_mask_modes():
    pal = voc_palette()
    assert pal[0].tolist() == [0, 0, 0] and pal[1].tolist() == [128, 0, 0] and pal[2].tolist() == [0, 128, 0]
    assert pal[15].tolist() == [192, 128, 128]  # person
    assert pal[255].tolist() == [224, 224, 192]  # void
    assert len({tuple(c) for c in pal}) == 256


def test_mask_png_is_palette_mode_and_reads_back_in_every_mode(tmp_path):
    mask = np.array([[0, 1, 2], [15, 255, 20]], np.uint8)
    write_mask_png(tmp_path / "p.png", mask)
    with Image.open(tmp_path / "p.png") as img:
        assert img.mode == "P"
        np.testing.assert_array_equal(np.array(img.convert("RGB")), voc_palette()[mask])
        img.convert("RGB").save(tmp_path / "rgb.png")
    Image.fromarray(mask, mode="L").save(tmp_path / "l.png")
    for name in ("p.png", "rgb.png", "l.png"):
        np.testing.assert_array_equal(read_mask_png(tmp_path / name), mask)
    with pytest.raises(ValueError, match=r"mask value 21 .* neither a class"):
        read_mask_png(_write_l(tmp_path / "bad.png", np.array([[21]], np.uint8)), num_classes=20)
    rgb = np.zeros((1, 2, 3), np.uint8)
    rgb[0, 1] = (1, 2, 3)
    Image.fromarray(rgb).save(tmp_path / "odd.png")
    with pytest.raises(ValueError, match=r"odd.png: RGB mask colour \(1, 2, 3\)"):
        read_mask_png(tmp_path / "odd.png")


def _write_l(path, arr):
    Image.fromarray(arr, mode="L").save(path)
    return path


def test_sbd_augmented_masks_and_train_aug_lists(tmp_path):
    samples = voc_folder(tmp_path, 3)
    aug = tmp_path / "SegmentationClassAug"
    aug.mkdir()
    for s in samples:  # SBD's SegmentationClassAug holds plain "L" mode index PNGs
        Image.fromarray(s.mask, mode="L").save(aug / f"{s.image_id}.png")
    (tmp_path / "ImageSets" / "SegmentationAug").mkdir(parents=True)
    (tmp_path / "ImageSets" / "SegmentationAug" / "train_aug.txt").write_text(
        "".join(f"/JPEGImages/{s.image_id}.jpg /SegmentationClassAug/{s.image_id}.png\n" for s in samples)
    )
    ds = VOCBoxDataset(tmp_path, "train_aug", masks="SegmentationClassAug", image_set_dir="ImageSets/SegmentationAug")
    assert [ds[i].image_id for i in range(3)] == [s.image_id for s in samples]
    for i, s in enumerate(samples):
        assert_same_sample(ds[i], s)
    by_path = VOCBoxDataset(tmp_path, str(tmp_path / "ImageSets" / "SegmentationAug" / "train_aug.txt"), masks=str(aug))
    assert len(by_path) == 3


def test_boxes_only_and_default_voc_classes(tmp_path):
    samples = voc_folder(tmp_path, 2)
    ds = VOCBoxDataset(tmp_path, "train", masks=None)
    assert ds[0].mask is None
    np.testing.assert_array_equal(ds[1].boxes, samples[1].boxes)
    (tmp_path / "class_names.txt").unlink()
    with pytest.raises(ValueError, match="not in class_names"):
        VOCBoxDataset(tmp_path, "train")  # syn01... are not VOC classes
    assert VOC_CLASSES[14] == "person" and len(VOC_CLASSES) == 20


def test_difficult_objects_can_be_left_out(tmp_path):
    voc_folder(tmp_path, 1)
    xml = tmp_path / "Annotations" / "train_000000.xml"
    text = xml.read_text()
    xml.write_text(text.replace("<difficult>0</difficult>", "<difficult>1</difficult>", 1))
    assert (
        len(VOCBoxDataset(tmp_path, "train", keep_difficult=False)[0].boxes)
        == len(VOCBoxDataset(tmp_path, "train")[0].boxes) - 1
    )


# ---------------------------------------------------------------------------------------------------------------
# Bad input: each case corrupts image train_000001 of a two-image folder. In raise mode the error names the file and
# the problem; in skip mode the image (or box) is skipped, counted and reported in a warning.


def _xml(root):
    return root / "Annotations" / "train_000001.xml"


def _set_first_box(root, **values):
    text = _xml(root).read_text()
    for tag, v in values.items():
        text = re.sub(f"<{tag}>[^<]*</{tag}>", f"<{tag}>{v}</{tag}>", text, count=1)
    _xml(root).write_text(text)


def _replace_in_xml(root, old, new):
    text = _xml(root).read_text()
    assert old in text
    _xml(root).write_text(text.replace(old, new, 1))


CASES = {
    "missing image": (
        lambda r: (r / "JPEGImages" / "train_000001.png").unlink(),
        FileNotFoundError,
        r"JPEGImages/train_000001\.jpg: image not found",
        "image",
    ),
    "missing annotation": (
        lambda r: _xml(r).unlink(),
        FileNotFoundError,
        r"train_000001\.xml: annotation not found",
        "image",
    ),
    "missing mask": (
        lambda r: (r / "SegmentationClass" / "train_000001.png").unlink(),
        FileNotFoundError,
        r"train_000001\.png: mask not found",
        "image",
    ),
    "malformed annotation": (
        lambda r: _xml(r).write_text("<annotation><object></annotation>"),
        ValueError,
        r"train_000001\.xml: malformed XML",
        "image",
    ),
    "missing coordinate": (
        lambda r: _replace_in_xml(r, "<ymax>", "<ymaxx>") or _replace_in_xml(r, "</ymax>", "</ymaxx>"),
        ValueError,
        r"<bndbox> of <object> 0 has no <ymax>",
        "image",
    ),
    "non-numeric coordinate": (
        lambda r: _set_first_box(r, xmin="left"),
        ValueError,
        r"<bndbox> of <object> 0 has <xmin>left</xmin>, not a number",
        "image",
    ),
    "wrong root": (lambda r: _xml(r).write_text("<annotations/>"), ValueError, "expected <annotation>", "image"),
    "unreadable image": (
        lambda r: (r / "JPEGImages" / "train_000001.png").write_bytes(b"garbage"),
        ValueError,
        "cannot read the image header",
        "image",
    ),
    "annotation size differs": (
        lambda r: _replace_in_xml(r, "<width>56</width>", "<width>57</width>"),
        ValueError,
        r"<size> says 57x40 but .* is 56x40",
        "image",
    ),
    "mask size differs": (
        lambda r: Image.new("P", (55, 40)).save(r / "SegmentationClass" / "train_000001.png"),
        ValueError,
        r"mask is 55x40 but the image .* is 56x40",
        "image",
    ),
    "unknown class": (
        lambda r: _set_first_box(r, name="unicorn"),
        ValueError,
        r"<object> 0 \(unicorn\): class name 'unicorn' is not in class_names",
        "box",
    ),
    "zero-size box": (
        lambda r: _set_first_box(r, xmin=10, xmax=9),
        ValueError,
        r"<bndbox> has xmin=10, xmax=9.*xmax < xmin",
        "box",
    ),
    "box outside image": (
        lambda r: _set_first_box(r, xmin=60, xmax=70),
        ValueError,
        r"\(59, .*\) lies outside the 56x40 image",
        "box",
    ),
    "box clipped to image": (
        lambda r: _set_first_box(r, xmax=80),
        ValueError,
        r"extends outside the 56x40 image",
        "repaired",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_raises_naming_file_and_problem(tmp_path, case):
    voc_folder(tmp_path, 2)
    corrupt, exc, pattern, _ = CASES[case]
    corrupt(tmp_path)
    with pytest.raises(exc, match=pattern):
        VOCBoxDataset(tmp_path, "train")


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_skipped_counted_and_reported(tmp_path, case):
    samples = voc_folder(tmp_path, 2)
    corrupt, _, pattern, what = CASES[case]
    corrupt(tmp_path)
    with pytest.warns(UserWarning, match="skipped|repaired") as record:
        ds = VOCBoxDataset(tmp_path, "train", on_error="skip")
    assert len(record) == 1 and "skip_log" in str(record[0].message)
    assert re.search(pattern, ds.skip_log[0])
    assert_same_sample(ds[0], samples[0])
    if what == "image":
        assert len(ds) == 1 and sum(ds.skipped.values()) == 1 and not ds.repaired
    elif what == "box":
        assert len(ds) == 2 and sum(ds.skipped.values()) == 1
        assert ds[1].num_boxes == samples[1].num_boxes - 1
        np.testing.assert_array_equal(ds[1].boxes, samples[1].boxes[1:])
    else:
        assert len(ds) == 2 and ds.repaired == {"box clipped to image": 1} and not ds.skipped
        assert ds[1].boxes[0, 2] == 56 and ds[1].num_boxes == samples[1].num_boxes


def test_bad_mask_values_raise_on_load_naming_the_file(tmp_path):
    voc_folder(tmp_path, 2)
    bad = np.zeros((40, 56), np.uint8)
    bad[3, 4] = 30
    write_mask_png(tmp_path / "SegmentationClass" / "train_000001.png", bad)
    ds = VOCBoxDataset(tmp_path, "train")
    ds[0]
    with pytest.raises(ValueError, match=r"train_000001\.png: mask value 30 at row 3, column 4"):
        ds[1]


def test_split_list_problems(tmp_path):
    voc_folder(tmp_path, 2)
    with pytest.raises(FileNotFoundError, match=r"split file .*trainval\.txt not found .*\['train'\]"):
        VOCBoxDataset(tmp_path, "trainval")
    with pytest.raises(FileNotFoundError, match="root"):
        VOCBoxDataset(tmp_path / "nowhere", "train")
    with pytest.raises(FileNotFoundError, match="mask folder"):
        VOCBoxDataset(tmp_path, "train", masks="SegmentationClassAug")
    (tmp_path / "ImageSets" / "Segmentation" / "dup.txt").write_text("train_000000\ntrain_000000\n")
    with pytest.raises(ValueError, match="listed twice"):
        VOCBoxDataset(tmp_path, "dup")
    with pytest.warns(UserWarning, match="duplicate id"):
        assert len(VOCBoxDataset(tmp_path, "dup", on_error="skip")) == 1
    with pytest.raises(ValueError, match="on_error"):
        VOCBoxDataset(tmp_path, "train", on_error="ignore")
    with pytest.raises(ValueError, match="class_names"):
        VOCBoxDataset(tmp_path, "train", class_names=["a", "a"])


def test_export_rejects_bad_samples(tmp_path):
    s = small_samples("train", 1)[0]
    bad_id = Sample(s.image, s.boxes, s.labels, s.mask, "a/b")
    with pytest.raises(ValueError, match="image_id"):
        export_voc({"train": [bad_id]}, tmp_path, SMALL.class_names)
    with pytest.raises(TypeError, match="boxes"):
        export_voc(
            {"train": [Sample(s.image, s.boxes.astype(np.float64), s.labels, s.mask, "x")]}, tmp_path, SMALL.class_names
        )
    with pytest.raises(ValueError, match="image_format"):
        export_voc({"train": [s]}, tmp_path, SMALL.class_names, image_format="bmp")
