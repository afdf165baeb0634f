// One call of the box row/column-max primitive, as the torch wrappers hand it
// to the torch-free kernels (CPU core and CUDA launchers).
#pragma once

#include <cstdint>

#include "boxloss/boxes/box_convention.h"

namespace boxloss {
namespace row_col_max {

// Status bit of a box whose covered pixels hold a NaN (the maximum and its
// arg-max would be meaningless).
constexpr int32_t kProbsNaN = 16;

// Box k of `boxes` ((num_boxes, 4) double, x0 y0 x1 y1): status[k] receives
// its BoxStatus bits and ranges[4k .. 4k + 3] the pixels it covers
// (box_pixels: row_begin, row_end, col_begin, col_end; all 0 for a malformed
// box).  What the CPU loop and the CUDA kernel of resolve_boxes do per box.
BOXLOSS_HD_INLINE void resolve_box(const double* boxes, const int64_t* box_batch, const int64_t* box_labels, int64_t k,
                                   double spatial_scale, int64_t batch, int64_t num_channels, int64_t height,
                                   int64_t width, int64_t* ranges, int32_t* status) {
  const double* b = boxes + 4 * k;
  const int32_t s = boxes::box_status(b[0], b[1], b[2], b[3], box_batch[k], box_labels[k], batch, num_channels);
  status[k] = s;
  const boxes::BoxPixels px =
      s == 0 ? boxes::box_pixels(b[0], b[1], b[2], b[3], spatial_scale, height, width) : boxes::BoxPixels{0, 0, 0, 0};
  ranges[4 * k + 0] = px.row_begin;
  ranges[4 * k + 1] = px.row_end;
  ranges[4 * k + 2] = px.col_begin;
  ranges[4 * k + 3] = px.col_end;
}

struct Problem {
  const void* probs = nullptr;          // (batch, num_channels, height, width), contiguous
  const int64_t* ranges = nullptr;      // (num_boxes, 4): row_begin, row_end, col_begin, col_end
  const int64_t* box_batch = nullptr;   // (num_boxes,)
  const int64_t* box_labels = nullptr;  // (num_boxes,)
  int64_t batch = 0;
  int64_t num_channels = 0;
  int64_t height = 0;
  int64_t width = 0;
  int64_t num_boxes = 0;

  BOXLOSS_HD_INLINE int64_t plane() const { return height * width; }
  // Offset of the first element of box k's class plane in probs.
  BOXLOSS_HD_INLINE int64_t plane_offset(int64_t k) const {
    return (box_batch[k] * num_channels + box_labels[k]) * plane();
  }
};

// Outputs, dense over the map's rows and columns so their shapes do not depend
// on the boxes: row_max[k, r] and row_index[k, r] for r in [row_begin, row_end)
// (0 and -1 elsewhere), col_max[k, c] and col_index[k, c] likewise.  Indices are
// flat element offsets into probs, the arg-max with ties broken by the lowest
// index.
template <typename scalar>
struct Outputs {
  scalar* row_max = nullptr;     // (num_boxes, height)
  int64_t* row_index = nullptr;  // (num_boxes, height)
  scalar* col_max = nullptr;     // (num_boxes, width)
  int64_t* col_index = nullptr;  // (num_boxes, width)
  int32_t* status = nullptr;     // (num_boxes,), kProbsNaN or 0
};

// Better (value, index) pair of a maximum: the larger value, and of equal
// values the lower index.
template <typename acc>
BOXLOSS_HD_INLINE bool better(acc value, int64_t index, acc best_value, int64_t best_index) {
  return value > best_value || (value == best_value && index < best_index);
}

}  // namespace row_col_max
}  // namespace boxloss
