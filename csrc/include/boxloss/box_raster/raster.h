// Rasterising packed boxes onto a map: for each pixel, the covering box in
// front.  The pixels a box covers are those of the box convention
// (boxloss/boxes/box_convention.h); "in front" is the smallest priority, of
// equal priorities the lowest box index, so the result is deterministic.
#pragma once

#include <cstdint>

#include "boxloss/common/host_device.h"

namespace boxloss {
namespace box_raster {

struct Problem {
  const int64_t* ranges = nullptr;         // (num_boxes, 4): row_begin, row_end, col_begin, col_end
  const int64_t* priority = nullptr;       // (num_boxes,): smaller is in front
  const int64_t* order = nullptr;          // (num_boxes,): box indices sorted by image (stable)
  const int64_t* image_offsets = nullptr;  // (batch + 1,): boxes of image b are order[offsets[b]..offsets[b+1])
  int64_t batch = 0;
  int64_t height = 0;
  int64_t width = 0;
  int64_t num_boxes = 0;
};

// True when box k (priority p) should replace the current front (index f,
// priority pf; f < 0 for none).
BOXLOSS_HD_INLINE bool in_front(int64_t k, int64_t p, int64_t f, int64_t pf) {
  return f < 0 || p < pf || (p == pf && k < f);
}

// The front box of pixel (b, y, x), or -1.
BOXLOSS_HD_INLINE int64_t front_box(const Problem& problem, int64_t b, int64_t y, int64_t x) {
  int64_t front = -1, front_priority = 0;
  for (int64_t i = problem.image_offsets[b]; i < problem.image_offsets[b + 1]; ++i) {
    const int64_t k = problem.order[i];
    const int64_t* r = problem.ranges + 4 * k;
    if (y >= r[0] && y < r[1] && x >= r[2] && x < r[3] && in_front(k, problem.priority[k], front, front_priority)) {
      front = k;
      front_priority = problem.priority[k];
    }
  }
  return front;
}

}  // namespace box_raster
}  // namespace boxloss
