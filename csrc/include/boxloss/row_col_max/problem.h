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
  scalar* row_max = nullptr;       // (num_boxes, height)
  int64_t* row_index = nullptr;    // (num_boxes, height)
  scalar* col_max = nullptr;       // (num_boxes, width)
  int64_t* col_index = nullptr;    // (num_boxes, width)
  int32_t* status = nullptr;       // (num_boxes,), kProbsNaN or 0
};

// Better (value, index) pair of a maximum: the larger value, and of equal
// values the lower index.
template <typename acc>
BOXLOSS_HD_INLINE bool better(acc value, int64_t index, acc best_value, int64_t best_index) {
  return value > best_value || (value == best_value && index < best_index);
}

}  // namespace row_col_max
}  // namespace boxloss
