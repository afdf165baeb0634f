"""The synthetic benchmark: determinism, exact masks and boxes, difficulty statistics, the on-disk cache."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from scipy import ndimage

import boxloss.data.synthetic as synthetic
from boxloss.data import (
    VOID,
    SyntheticBoxDataset,
    SyntheticConfig,
    boxes_from_instances,
    cache_path,
    cache_root,
    compute_statistics,
    format_report,
    generate_sample,
    generate_split,
)
from boxloss.data.synthetic import class_recipe, generate_scene

CFG = SyntheticConfig(image_size=64, seed=5)


def test_same_seed_gives_identical_data_and_any_image_regenerates_alone():
    a = SyntheticBoxDataset("train", 6, CFG, cache=False)
    b = SyntheticBoxDataset("train", 6, SyntheticConfig(image_size=64, seed=5), cache=False)
    for i in range(6):
        for x in (b[i], generate_sample(CFG, "train", i)):
            np.testing.assert_array_equal(a[i].image, x.image)
            np.testing.assert_array_equal(a[i].mask, x.mask)
            np.testing.assert_array_equal(a[i].instances, x.instances)
            np.testing.assert_array_equal(a[i].boxes, x.boxes)
            np.testing.assert_array_equal(a[i].labels, x.labels)
    assert a[3].image_id == "train_000003"


def test_seed_split_and_index_change_the_image():
    base = generate_sample(CFG, "train", 0).image
    for other in (
        generate_sample(SyntheticConfig(image_size=64, seed=6), "train", 0).image,
        generate_sample(CFG, "val", 0).image,
        generate_sample(CFG, "test", 0).image,
        generate_sample(CFG, "train", 1).image,
    ):
        assert (other != base).mean() > 0.5


def test_generation_does_not_depend_on_workers_or_chunking():
    one = generate_split(CFG, "val", 9, workers=1)
    two = generate_split(CFG, "val", 9, workers=2)
    for name in ("images", "instances", "boxes", "labels", "offsets"):
        np.testing.assert_array_equal(getattr(one, name), getattr(two, name))
    np.testing.assert_array_equal(one.images[7], generate_sample(CFG, "val", 7).image)


def _void_reference(inst: np.ndarray, band: int) -> np.ndarray:
    """Void by brute force: a pixel whose (2 band + 1)-square neighbourhood holds another instance id."""
    h, w = inst.shape
    out = np.zeros((h, w), bool)
    pad = np.pad(inst, band, mode="edge")
    for dy in range(2 * band + 1):
        for dx in range(2 * band + 1):
            out |= pad[dy : dy + h, dx : dx + w] != inst
    return out


@pytest.mark.parametrize("config", [CFG, SyntheticConfig(image_size=(48, 80), num_classes=20, void_band=2, seed=1)])
def test_masks_boxes_and_void_are_exact(config):
    for i in range(12):
        s = generate_sample(config, "train", i)
        s.check()
        k = s.num_boxes
        assert k >= 1
        assert s.labels.min() >= 1 and s.labels.max() <= config.num_classes
        # boxes: tight (library convention) around the visible pixels of each object
        np.testing.assert_array_equal(s.boxes, boxes_from_instances(s.instances, k))
        for j in range(k):
            rows, cols = np.nonzero(s.instances == j + 1)
            assert s.boxes[j].tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
        void = _void_reference(s.instances, config.void_band)
        np.testing.assert_array_equal(s.mask == VOID, void)
        lut = np.concatenate([[0], s.labels]).astype(np.uint8)
        np.testing.assert_array_equal(s.mask[~void], lut[s.instances][~void])
        # every object keeps labelled (non-void) pixels, and all mask values are known
        for j in range(k):
            assert ((s.instances == j + 1) & ~void).any()
        assert set(np.unique(s.mask)) <= set(range(config.num_classes + 1)) | {VOID}


def test_void_band_zero_gives_no_void():
    s = generate_sample(SyntheticConfig(image_size=48, void_band=0), "train", 2)
    assert not (s.mask == VOID).any()


def test_statistics_are_in_voc_like_ranges():
    config = SyntheticConfig(image_size=96)
    samples = [generate_sample(config, "train", i) for i in range(150)]
    st = compute_statistics(samples, config.num_classes, config.class_names)
    # VOC has about 2.4 objects per image; the generator draws mean_objects (2.6) before hidden ones are removed.
    assert 2.0 <= st.boxes_per_image <= 3.2
    assert abs(st.boxes_per_image - config.mean_objects) < 0.5
    assert (st.class_boxes > 10).all()
    lo, hi = st.fill_range
    assert 0.2 <= lo <= 0.42 and 0.82 <= hi <= 0.99
    assert np.ptp(st.class_fill) > 0.4
    assert 0.01 < st.overlap_pixels < 0.3
    assert 0.2 < st.images_with_overlap < 0.9
    assert 0.05 < st.border_boxes < 0.5
    assert 0.0 < st.void_pixels < 0.15
    report = format_report(st, "synthetic")
    assert "PASCAL VOC 2012 (approx.)" in report and "syn06" in report and "~2.4" in report


def test_boxes_per_image_follows_mean_objects():
    few = SyntheticConfig(image_size=96, mean_objects=1.0)
    st = compute_statistics([generate_sample(few, "train", i) for i in range(60)], few.num_classes, few.class_names)
    assert st.boxes_per_image < 1.5


def test_fill_targets_spread_over_voc_range_for_any_number_of_classes():
    for L in (2, 6, 20):
        targets = sorted(class_recipe(k).fill_target for k in range(L))
        assert targets[0] < 0.35 and targets[-1] > 0.95
    assert class_recipe(3) == class_recipe(3)  # the same class looks the same whatever L is
    names = SyntheticConfig(num_classes=20).class_names
    assert names[0] == "syn01" and names[-1] == "syn20"


def test_occlusion_goes_both_ways_and_hides_the_back_object():
    config = SyntheticConfig(image_size=96)
    front_larger = front_smaller = 0
    for i in range(40):
        layout = generate_scene(config, "train", i)
        s = layout.sample
        np.testing.assert_array_equal(s.image, generate_sample(config, "train", i).image)
        for a in range(s.num_boxes):
            for b in range(s.num_boxes):
                both = layout.full_masks[a] & layout.full_masks[b]
                if a == b or not both.any() or layout.depth[a] < layout.depth[b]:
                    continue
                assert not (s.instances[both] == b + 1).any()  # b is behind a wherever they overlap
                if s.labels[a] != s.labels[b]:
                    if layout.full_masks[a].sum() > layout.full_masks[b].sum():
                        front_larger += 1
                    else:
                        front_smaller += 1
    # random depth: the larger object is in front in a good share of overlaps (hidden objects brought forward make
    # small-in-front more common; "largest always at the back" would leave about 13%)
    assert front_smaller >= 10 and front_larger >= 0.2 * (front_larger + front_smaller)


def test_some_objects_touch_the_border_and_shapes_are_not_convex():
    config = SyntheticConfig(image_size=96)
    touching, concave = 0, 0
    for i in range(30):
        s = generate_sample(config, "train", i)
        touching += int(((s.boxes[:, :2] <= 0) | (s.boxes[:, 2:] >= 96)).any(axis=1).sum())
        for j in range(s.num_boxes):
            region = s.instances == j + 1
            hull_like = ndimage.binary_fill_holes(region)
            concave += int(hull_like.sum() > region.sum())  # a hole (ring) is one kind of non-convexity
    assert touching >= 5 and concave >= 3


def _overlapping_pair_share(samples) -> float:
    pairs = overlapping = 0
    for s in samples:
        b = s.boxes
        for i in range(len(b)):
            for j in range(i + 1, len(b)):
                pairs += 1
                overlapping += int(
                    min(b[i, 2], b[j, 2]) > max(b[i, 0], b[j, 0]) and min(b[i, 3], b[j, 3]) > max(b[i, 1], b[j, 1])
                )
    return overlapping / pairs


def test_overlap_and_border_probabilities_act():
    def samples(**kwargs):
        config = SyntheticConfig(image_size=64, **kwargs)
        return [generate_sample(config, "train", i) for i in range(80)]

    assert (
        _overlapping_pair_share(samples(overlap_prob=1.0)) > _overlapping_pair_share(samples(overlap_prob=0.0)) + 0.15
    )
    border = [compute_statistics(samples(border_prob=p), 6).border_boxes for p in (0.0, 1.0)]
    assert border[1] > border[0] + 0.2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 21}, "num_classes"),
        ({"image_size": 8}, "image_size"),
        ({"image_size": (64, 64, 3)}, "image_size"),
        ({"image_size": 64.0}, "image_size"),
        ({"seed": -1}, "seed"),
        ({"overlap_prob": 1.5}, "overlap_prob"),
        ({"mean_objects": 0.5}, "mean_objects"),
        ({"void_band": -1}, "void_band"),
    ],
)
def test_bad_config_raises_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticConfig(**kwargs)


def test_bad_split_index_and_config_type_raise():
    with pytest.raises(ValueError, match="split"):
        generate_sample(CFG, "training", 0)
    with pytest.raises(ValueError, match="index"):
        generate_sample(CFG, "train", -1)
    with pytest.raises(TypeError, match="SyntheticConfig"):
        SyntheticBoxDataset("train", 2, {"seed": 0}, cache=False)
    with pytest.raises(IndexError):
        SyntheticBoxDataset("train", 2, CFG, cache=False)[2]


def test_cache_is_keyed_by_parameters_reused_and_serves_prefixes(tmp_path, monkeypatch):
    first = SyntheticBoxDataset("train", 10, CFG, cache_dir=tmp_path)
    assert first.cache_path == cache_path(CFG, tmp_path) == tmp_path / CFG.key()
    assert sorted(p.name for p in first.cache_path.iterdir()) == [
        "params.json",
        "train-10.boxes.npz",
        "train-10.images.npy",
        "train-10.instances.npy",
    ]
    assert SyntheticConfig(image_size=64, seed=6).key() != CFG.key()
    assert SyntheticConfig(image_size=64, seed=5, num_classes=7).key() != CFG.key()

    def no_generation(*args, **kwargs):
        raise AssertionError("generated although the cache holds the data")

    monkeypatch.setattr(synthetic, "generate_split", no_generation)
    again = SyntheticBoxDataset("train", 10, CFG, cache_dir=tmp_path)
    prefix = SyntheticBoxDataset("train", 4, CFG, cache_dir=tmp_path)
    assert len(prefix) == 4
    for i in range(4):
        np.testing.assert_array_equal(prefix[i].image, first[i].image)
        np.testing.assert_array_equal(again[i].mask, first[i].mask)
    with pytest.raises(AssertionError, match="generated"):
        SyntheticBoxDataset("train", 11, CFG, cache_dir=tmp_path)
    assert not list(tmp_path.rglob("*.tmp"))


def test_cache_location_follows_argument_env_var_and_default(tmp_path, monkeypatch):
    monkeypatch.setenv("BOXLOSS_DATA_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    ds = SyntheticBoxDataset("val", 2, CFG)
    assert ds.cache_path.parent == tmp_path / "env" and ds.cache_path.is_dir()
    monkeypatch.delenv("BOXLOSS_DATA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "boxloss" / "synthetic"


def test_unreadable_cache_is_regenerated_with_a_warning(tmp_path):
    first = SyntheticBoxDataset("test", 3, CFG, cache_dir=tmp_path)
    expected = [first[i] for i in range(3)]
    (first.cache_path / "test-3.boxes.npz").write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match="unreadable"):
        again = SyntheticBoxDataset("test", 3, CFG, cache_dir=tmp_path)
    for i in range(3):
        np.testing.assert_array_equal(again[i].image, expected[i].image)
        np.testing.assert_array_equal(again[i].boxes, expected[i].boxes)


@pytest.mark.skipif(os.environ.get("BOXLOSS_DATA_SPEED") != "1", reason="timing check; set BOXLOSS_DATA_SPEED=1")
def test_two_thousand_default_training_images_in_under_a_minute(tmp_path):
    t = time.perf_counter()
    ds = SyntheticBoxDataset("train", 2000, SyntheticConfig(), cache_dir=tmp_path)
    elapsed = time.perf_counter() - t
    assert len(ds) == 2000 and elapsed < 60, f"{elapsed:.1f} s"


def test_cached_dataset_pickles_as_a_path_and_reopens(tmp_path):
    import pickle

    ds = SyntheticBoxDataset("val", 4, CFG, cache_dir=tmp_path)
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000  # not the images
    back = pickle.loads(blob)
    np.testing.assert_array_equal(back[3].image, ds[3].image)
    in_memory = SyntheticBoxDataset("val", 4, CFG, cache=False)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(in_memory))[2].mask, ds[2].mask)
