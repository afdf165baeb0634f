"""COCO layout: round trips, polygon/RLE decoding, crowd and overlap painting, categories, and bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from boxloss.data import COCOBoxDataset, Sample, VOCBoxDataset, box_to_coco, coco_to_box, export_coco, export_voc
from boxloss.data.coco import encode_rle
from data_builders import SMALL, assert_same_sample, coco_folder, edit_json, scene, small_samples


def test_round_trip_png_is_exact_including_instances(tmp_path):
    splits = {"train": small_samples("train", 3), "test": small_samples("test", 2)}
    files = export_coco(splits, tmp_path, SMALL.class_names, image_format="png")
    for split, samples in splits.items():
        ds = COCOBoxDataset(files[split], tmp_path / split)
        assert ds.class_names == tuple(SMALL.class_names) and len(ds) == len(samples)
        for i, s in enumerate(samples):
            loaded = ds[i]
            loaded.check()
            assert_same_sample(loaded, s, instances=True)


def test_round_trip_jpeg_keeps_masks_and_boxes_exact(tmp_path):
    samples = small_samples("val", 3)
    files = export_coco({"val": samples}, tmp_path, SMALL.class_names)
    ds = COCOBoxDataset(files["val"], tmp_path / "val")
    for i, s in enumerate(samples):
        assert_same_sample(ds[i], s, image=False, instances=True)
        assert np.abs(ds[i].image.astype(int) - s.image.astype(int)).mean() < 5


def test_written_json_is_standard_coco(tmp_path):
    samples = small_samples("train", 2)
    files = export_coco({"train": samples}, tmp_path, SMALL.class_names)
    doc = json.loads(files["train"].read_text())
    assert [c["id"] for c in doc["categories"]] == list(range(1, SMALL.num_classes + 1))
    assert doc["images"][0] == {"id": 1, "file_name": "train_000000.jpg", "width": 56, "height": 40}
    things = [a for a in doc["annotations"] if a["image_id"] == 1 and not a["iscrowd"]]
    assert [a["bbox"] for a in things] == [box_to_coco(b) for b in samples[0].boxes]
    assert [a["area"] for a in things] == [float((samples[0].instances == k + 1).sum()) for k in range(len(things))]
    assert all(isinstance(a["segmentation"]["counts"], str) for a in doc["annotations"])
    assert any(a["iscrowd"] for a in doc["annotations"])  # the void band


def test_coco_boxes_are_continuous_xywh():
    assert box_to_coco((2, 1, 5, 3)) == [2, 1, 3, 2]
    assert coco_to_box([2, 1, 3, 2]) == (2, 1, 5, 3)
    assert coco_to_box([0.5, 0.25, 1.5, 2.0]) == (0.5, 0.25, 2.0, 2.25)


def test_voc_data_without_instances_converts_to_coco_exactly(tmp_path):
    # two overlapping boxes of the same class: without instances each pixel goes to the smallest box containing it
    s = scene(20, 24, [(2, 2, 2, 14, 16), (2, 6, 10, 18, 22), (1, 0, 0, 4, 5)])
    s.mask[s.mask > 0] = np.where(np.arange((s.mask > 0).sum()) % 17 == 0, 255, s.mask[s.mask > 0])  # some void
    s = Sample(s.image, s.boxes, s.labels, s.mask, "voc0")
    export_voc({"train": [s]}, tmp_path / "voc", ["a", "b"], image_format="png")
    from_voc = VOCBoxDataset(tmp_path / "voc", "train")[0]
    assert from_voc.instances is None
    files = export_coco({"train": [from_voc]}, tmp_path / "coco", ["a", "b"], image_format="png")
    back = COCOBoxDataset(files["train"], tmp_path / "coco" / "train")[0]
    assert_same_sample(back, s)


def _coco_doc(tmp_path, anns, categories=None, size=(10, 12)):
    h, w = size
    Image.new("RGB", (w, h)).save(tmp_path / "a.png")
    doc = {
        "images": [{"id": 7, "file_name": "a.png", "width": w, "height": h}],
        "annotations": anns,
        "categories": categories or [{"id": 5, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(doc))
    return tmp_path / "ann.json"


def _region(h, w, t, left, b, r):
    m = np.zeros((h, w), bool)
    m[t:b, left:r] = True
    return m


def test_polygons_uncompressed_rle_crowd_and_largest_first_painting(tmp_path):
    big = _region(10, 12, 0, 0, 8, 10)
    counts, cur, run = [], False, 0  # uncompressed RLE counts are column-major runs starting with zeros
    for v in big.ravel(order="F"):
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    anns = [
        {
            "id": 1,
            "image_id": 7,
            "category_id": 5,
            "bbox": [0, 0, 10, 8],
            "iscrowd": 0,
            "segmentation": {"size": [10, 12], "counts": counts},
        },
        # a small dog on top of the big cat although listed later or earlier: painted by area, not order
        {
            "id": 2,
            "image_id": 7,
            "category_id": 2,
            "bbox": [2, 2, 2, 2],
            "iscrowd": 0,
            "segmentation": [[2, 2, 4, 2, 4, 4, 2, 4]],
        },
        {
            "id": 3,
            "image_id": 7,
            "category_id": 5,
            "bbox": [10, 8, 2, 2],
            "iscrowd": 1,
            "segmentation": encode_rle(_region(10, 12, 8, 10, 10, 12)),
        },
    ]
    path = _coco_doc(tmp_path, anns)
    ds = COCOBoxDataset(path, tmp_path)
    assert ds.class_names == ("dog", "cat")  # sorted by category id: 2, 5
    s = ds[0]
    assert s.image_id == "a"
    np.testing.assert_array_equal(s.boxes, [[0, 0, 10, 8], [2, 2, 4, 4]])
    np.testing.assert_array_equal(s.labels, [2, 1])
    expected = np.where(big, 2, 0).astype(np.uint8)
    expected[2:4, 2:4] = 1  # pycocotools rasterises the 2..4 polygon to pixels 2..3
    expected[8:, 10:] = 255
    np.testing.assert_array_equal(s.mask, expected)
    assert (s.instances[2:4, 2:4] == 2).all() and s.instances[0, 0] == 1 and s.instances[9, 11] == 0
    ignored = COCOBoxDataset(path, tmp_path, crowd="ignore")[0]
    assert ignored.mask[9, 11] == 0
    no_masks = COCOBoxDataset(path, tmp_path, masks=False)[0]
    assert no_masks.mask is None and no_masks.num_boxes == 2


def test_category_selection_orders_channels_and_counts_exclusions(tmp_path):
    anns = [
        {"id": 1, "image_id": 7, "category_id": 5, "bbox": [0, 0, 3, 3], "segmentation": [[0, 0, 3, 0, 3, 3]]},
        {"id": 2, "image_id": 7, "category_id": 2, "bbox": [5, 5, 3, 3], "segmentation": [[5, 5, 8, 5, 8, 8]]},
    ]
    path = _coco_doc(tmp_path, anns)
    ds = COCOBoxDataset(path, tmp_path, categories=["cat"])
    assert ds.class_names == ("cat",) and ds.excluded == {"annotations of category 'dog'": 1}
    s = ds[0]
    np.testing.assert_array_equal(s.labels, [1])
    assert set(np.unique(s.mask)) == {0, 1}
    with pytest.raises(ValueError, match=r"categories \['bird'\] are not in"):
        COCOBoxDataset(path, tmp_path, categories=["bird"])


# ---------------------------------------------------------------------------------------------------------------
# Bad input, on a two-image export: each case corrupts image 2 (train_000001) or its first annotation.


def _first_ann_of_image2(doc):
    return next(a for a in doc["annotations"] if a["image_id"] == 2 and not a["iscrowd"])


def _set(key, value):
    def edit(doc):
        _first_ann_of_image2(doc)[key] = value

    return edit


def _image2(edit):
    def go(doc):
        edit(next(im for im in doc["images"] if im["id"] == 2))

    return go


CASES = {
    "missing image": (
        lambda p, d: (d / "train_000001.png").unlink(),
        FileNotFoundError,
        r"train_000001\.png: image not found",
        "image",
    ),
    "unreadable image": (
        lambda p, d: (d / "train_000001.png").write_bytes(b"junk"),
        ValueError,
        "cannot read the image header",
        "image",
    ),
    "image size differs": (
        lambda p, d: edit_json(p, _image2(lambda im: im.update(width=57))),
        ValueError,
        r"train_000001\.png is 56x40 but .*images\[1\] says 57x40",
        "image",
    ),
    "malformed image entry": (
        lambda p, d: edit_json(p, _image2(lambda im: im.pop("height"))),
        ValueError,
        r"images\[1\] needs id, file_name, width and height",
        "image",
    ),
    "duplicate image id": (
        lambda p, d: edit_json(p, lambda doc: doc["images"].append(dict(doc["images"][1]))),
        ValueError,
        "repeats image id 2",
        "extra",
    ),
    "rle size differs": (
        lambda p, d: edit_json(p, lambda doc: _first_ann_of_image2(doc)["segmentation"].update(size=[40, 55])),
        ValueError,
        r"RLE size is 55x40 but the image is 56x40",
        "image",
    ),
    "malformed polygon": (
        lambda p, d: edit_json(p, _set("segmentation", [[1, 2, 3]])),
        ValueError,
        "a polygon must be a list of at least 6 numbers",
        "image",
    ),
    "missing segmentation": (
        lambda p, d: edit_json(p, lambda doc: _first_ann_of_image2(doc).pop("segmentation")),
        ValueError,
        "has no segmentation",
        "image",
    ),
    "unknown category": (
        lambda p, d: edit_json(p, _set("category_id", 99)),
        ValueError,
        r"category_id 99, which is not in categories",
        "void",
    ),
    "zero-size box": (
        lambda p, d: edit_json(p, _set("bbox", [3, 3, 0, 5])),
        ValueError,
        r"bbox \[3, 3, 0, 5\] has w or h <= 0",
        "box",
    ),
    "malformed bbox": (
        lambda p, d: edit_json(p, _set("bbox", [3, 3, 5])),
        ValueError,
        r"bbox must be \[x, y, w, h\] of 4 finite numbers",
        "box",
    ),
    "box outside image": (
        lambda p, d: edit_json(p, _set("bbox", [60, 3, 5, 5])),
        ValueError,
        r"\(60, 3, 65, 8\) lies outside the 56x40 image",
        "box",
    ),
    "box clipped to image": (
        lambda p, d: edit_json(p, _set("bbox", [50, 3, 10, 5])),
        ValueError,
        "extends outside the 56x40 image",
        "repaired",
    ),
    "annotation of unknown image": (
        lambda p, d: edit_json(p, _set("image_id", 99)),
        ValueError,
        "refers to image_id 99, which is not in images",
        "moved",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_raises_naming_file_and_problem(tmp_path, case):
    _, path, images = coco_folder(tmp_path, 2)
    corrupt, exc, pattern, _ = CASES[case]
    corrupt(path, images)
    with pytest.raises(exc, match=pattern):
        COCOBoxDataset(path, images)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_skipped_counted_and_reported(tmp_path, case):
    samples, path, images = coco_folder(tmp_path, 2)
    corrupt, _, pattern, what = CASES[case]
    corrupt(path, images)
    with pytest.warns(UserWarning, match="skipped|repaired") as record:
        ds = COCOBoxDataset(path, images, on_error="skip")
    assert len(record) == 1
    assert re.search(pattern, ds.skip_log[0]), ds.skip_log
    assert_same_sample(ds[0], samples[0], instances=True)
    s1 = samples[1]
    if what == "image":
        assert len(ds) == 1 and sum(ds.skipped.values()) == 1
    elif what == "extra":
        assert len(ds) == 2 and sum(ds.skipped.values()) == 1
        assert_same_sample(ds[1], s1)
    elif what == "repaired":
        assert ds.repaired == {"box clipped to image": 1} and ds[1].boxes[0].tolist() == [50, 3, 56, 8]
    else:  # the first box of image 2 is skipped
        assert len(ds) == 2 and sum(ds.skipped.values()) == 1
        np.testing.assert_array_equal(ds[1].boxes, s1.boxes[1:])
        np.testing.assert_array_equal(ds[1].labels, s1.labels[1:])
        first = s1.instances == 1
        if what == "box":  # the segmentation still paints its class: no pixel is mislabelled
            np.testing.assert_array_equal(ds[1].mask, s1.mask)
            assert (ds[1].instances[first] == 0).all()
        elif what == "void":  # an unknown category's pixels become void
            assert (ds[1].mask[first] == 255).all()
            np.testing.assert_array_equal(ds[1].mask[~first], s1.mask[~first])
        else:  # moved to an unknown image: image 2 loses that object entirely
            assert (ds[1].mask[first & (s1.mask != 255)] == 0).all()


@pytest.mark.parametrize(
    "text, pattern",
    [
        ('{"images": [', r"malformed JSON at line 1, column \d+"),
        ("[]", "the top level must be an object"),
        ('{"images": [], "categories": []}', "'annotations' must be a list"),
        ('{"images": [], "annotations": [], "categories": [{"id": "1", "name": "a"}]}', r"categories\[0\] must have"),
        (
            '{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]}',
            r"categories\[1\] repeats category id 1",
        ),
    ],
)
def test_malformed_json_raises_naming_the_file(tmp_path, text, pattern):
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(ValueError, match=f"bad.json: {pattern}"):
        COCOBoxDataset(tmp_path / "bad.json", tmp_path)


def test_missing_files_and_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        COCOBoxDataset(tmp_path / "none.json", tmp_path)
    _, path, images = coco_folder(tmp_path, 1)
    with pytest.raises(FileNotFoundError, match="image_dir"):
        COCOBoxDataset(path, tmp_path / "nowhere")
    with pytest.raises(ValueError, match="crowd"):
        COCOBoxDataset(path, images, crowd="background")
    (images / "train_000000.png").unlink()
    ds = COCOBoxDataset(path, images, check_files=False)  # deferred: the load raises
    with pytest.raises(FileNotFoundError):
        ds[0]
