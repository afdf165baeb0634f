// CPU core of the box rasteriser: each row paints the boxes of its image that
// cross it, in image-box order, keeping the front one per pixel.
#include "boxloss/box_raster/kernels.h"

namespace boxloss {
namespace box_raster {
namespace cpu {

void front_rows(const Problem& problem, int64_t row_begin, int64_t row_end, int64_t* front) {
  const int64_t width = problem.width;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t b = row / problem.height;
    const int64_t y = row - b * problem.height;
    int64_t* out = front + row * width;
    for (int64_t x = 0; x < width; ++x) out[x] = -1;
    for (int64_t i = problem.image_offsets[b]; i < problem.image_offsets[b + 1]; ++i) {
      const int64_t k = problem.order[i];
      const int64_t* r = problem.ranges + 4 * k;
      if (y < r[0] || y >= r[1]) continue;
      const int64_t p = problem.priority[k];
      for (int64_t x = r[2]; x < r[3]; ++x) {
        const int64_t f = out[x];
        if (in_front(k, p, f, f < 0 ? 0 : problem.priority[f])) out[x] = k;
      }
    }
  }
}

}  // namespace cpu
}  // namespace box_raster
}  // namespace boxloss
