"""Statistics measured on hand-made samples whose values are known."""

from __future__ import annotations

import numpy as np
import pytest

from boxloss.data import Sample, compute_statistics, format_report
from boxloss.data.stats import coverage_count


def _known():
    mask = np.zeros((10, 10), np.uint8)
    mask[0:6, 0:3] = 1  # 18 pixels of class 1 in box A = (0, 0, 6, 6)
    mask[0:6, 3] = 255  # 6 void pixels inside A
    mask[4:10, 4:10] = 2  # class 2 fills box B = (4, 4, 10, 10) ...
    mask[9, 6:10] = 0  # ... but for 4 pixels
    a = Sample(
        np.zeros((10, 10, 3), np.uint8),
        np.array([[0, 0, 6, 6], [4, 4, 10, 10]], np.float32),
        np.array([1, 2]),
        mask,
        "a",
    )
    b = Sample(np.zeros((8, 10, 3), np.uint8), np.array([[2, 2, 3, 3]], np.float32), np.array([1]), None, "b")
    return [a, b]


def test_statistics_of_known_samples():
    st = compute_statistics(_known(), 3, ["one", "two", "three"])
    assert st.num_images == 2 and st.num_boxes == 3 and st.boxes_per_image == 1.5
    np.testing.assert_allclose(st.class_fill[:2], [18 / (36 - 6), 32 / 36])  # void counts on neither side
    assert np.isnan(st.class_fill[2]) and st.class_boxes.tolist() == [2, 1, 0]
    assert st.fill_range == pytest.approx((0.6, 32 / 36))
    assert st.overlap_pixels == pytest.approx((4 / 100 + 0) / 2)  # A and B share a 2x2 square
    assert st.images_with_overlap == 0.5
    assert st.border_boxes == pytest.approx(2 / 3)
    assert st.void_pixels == pytest.approx(6 / 100) and st.images_with_mask == 1
    report = format_report(st, "known")
    assert "2.0%" in report and "0.60 - 0.89" in report and "1 of 2 images with masks" in report
    assert "three" in report and "n/a" in report


def test_coverage_counts_the_pixels_of_the_box_convention():
    cover = coverage_count(np.array([[0, 0, 2, 2], [1, 1, 3, 3], [0.6, 0, 1.4, 1]]), 4, 4)
    expected = np.zeros((4, 4), int)
    expected[0:2, 0:2] += 1
    expected[1:3, 1:3] += 1
    # The thin third box holds no pixel centre: like every box op, it covers the pixel holding its midpoint.
    expected[0, 1] += 1
    np.testing.assert_array_equal(cover, expected)


def test_labels_outside_the_classes_raise():
    with pytest.raises(ValueError, match=r"sample a has labels \[1, 2\] outside 1..1"):
        compute_statistics(_known(), 1)
