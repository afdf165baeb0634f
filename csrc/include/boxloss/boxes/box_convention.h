// The box convention of every box op in boxloss, written once for the host and
// the device.  Python mirrors it in boxloss/boxes.py (and the reference
// re-derives it independently in boxloss/reference/boxes.py).
//
// A box is (x0, y0, x1, y1) in input-image pixels, continuous coordinates: the
// image pixel in row i, column j covers [j, j+1) x [i, i+1), so the tight box of
// a mask spanning columns j_min..j_max and rows i_min..i_max is
// (j_min, i_min, j_max + 1, i_max + 1).  A map of stride s has
// spatial_scale = 1/s: map coordinate = image coordinate * spatial_scale, as in
// roi_align.  Along each axis a box covers the map pixels whose centre lies in
// [lo * scale, hi * scale) after clipping to the map; a box of positive extent
// inside the map that contains no pixel centre (narrower than one map pixel)
// covers the single pixel holding its midpoint, so that no real box vanishes
// at a coarse stride.  A box of zero extent after clipping (x1 == x0, or lying
// wholly outside the map) covers nothing: the ops skip it and report it as
// empty.  Infinite coordinates are clipped like any other; NaN coordinates,
// x1 < x0 or y1 < y0, and batch indices or labels out of range are errors.
#pragma once

#include <cmath>
#include <cstdint>

#include "boxloss/common/host_device.h"

namespace boxloss {
namespace boxes {

// Bits of a box's status; 0 means the box is well-formed.
enum BoxStatus : int32_t {
  kBoxNaN = 1,              // a coordinate is NaN
  kBoxInverted = 2,         // x1 < x0 or y1 < y0
  kBoxBatchOutOfRange = 4,  // box_batch not in [0, batch)
  kBoxLabelOutOfRange = 8,  // box_labels not in [0, num_channels)
};

// Half-open range [begin, end) of map pixels along one axis; begin == end == 0
// when the box covers nothing.
struct PixelSpan {
  int64_t begin;
  int64_t end;
  BOXLOSS_HD_INLINE bool empty() const { return end <= begin; }
  BOXLOSS_HD_INLINE int64_t size() const { return end > begin ? end - begin : 0; }
};

BOXLOSS_HD_INLINE PixelSpan covered_span(double lo, double hi, double spatial_scale, int64_t size) {
  const double extent = static_cast<double>(size);
  double a = lo * spatial_scale;
  double b = hi * spatial_scale;
  a = a < 0.0 ? 0.0 : (a > extent ? extent : a);
  b = b < 0.0 ? 0.0 : (b > extent ? extent : b);
  if (!(b > a)) return PixelSpan{0, 0};
  // Pixel j is covered when a <= j + 0.5 < b.
  const int64_t begin = static_cast<int64_t>(ceil(a - 0.5));
  const int64_t end = static_cast<int64_t>(ceil(b - 0.5));
  if (end > begin) return PixelSpan{begin, end};
  int64_t mid = static_cast<int64_t>(floor(0.5 * (a + b)));
  mid = mid > size - 1 ? size - 1 : mid;
  return PixelSpan{mid, mid + 1};
}

BOXLOSS_HD_INLINE int32_t box_status(double x0, double y0, double x1, double y1, int64_t batch_index, int64_t label,
                                     int64_t batch, int64_t num_channels) {
  int32_t status = 0;
  if (x0 != x0 || y0 != y0 || x1 != x1 || y1 != y1) {
    status |= kBoxNaN;
  } else if (x1 < x0 || y1 < y0) {
    status |= kBoxInverted;
  }
  if (batch_index < 0 || batch_index >= batch) status |= kBoxBatchOutOfRange;
  if (label < 0 || label >= num_channels) status |= kBoxLabelOutOfRange;
  return status;
}

// The map pixels a well-formed box covers: rows [row_begin, row_end) x
// columns [col_begin, col_end), or all four 0 when it covers nothing.
struct BoxPixels {
  int64_t row_begin, row_end, col_begin, col_end;
  BOXLOSS_HD_INLINE bool empty() const { return row_end <= row_begin || col_end <= col_begin; }
};

BOXLOSS_HD_INLINE BoxPixels box_pixels(double x0, double y0, double x1, double y1, double spatial_scale, int64_t height,
                                       int64_t width) {
  const PixelSpan cols = covered_span(x0, x1, spatial_scale, width);
  const PixelSpan rows = covered_span(y0, y1, spatial_scale, height);
  if (cols.empty() || rows.empty()) return BoxPixels{0, 0, 0, 0};
  return BoxPixels{rows.begin, rows.end, cols.begin, cols.end};
}

}  // namespace boxes
}  // namespace boxloss
