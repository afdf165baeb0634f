// One call of background attention or background-aware pooling, as the torch
// wrappers hand it to the torch-free kernels (CPU core and CUDA launchers).
#pragma once

#include <cstdint>

#include "boxloss/background_attention/math.h"

namespace boxloss {
namespace background_attention {

// The per-pixel attention step.  The GEMMs (queries, dots) run in the torch
// wrappers; the kernels do what lies between them, one pixel at a time.
template <typename scalar>
struct AttentionProblem {
  const scalar* norms = nullptr;       // (batch, pixels): |f(p)|
  const uint8_t* valid = nullptr;      // (batch, num_queries): the cell holds background
  const int64_t* num_valid = nullptr;  // (batch,): J
  const uint8_t* inside = nullptr;     // (batch, pixels): p lies in a box
  const uint8_t* fallback = nullptr;   // (batch,): plain average pooling for this image
  int64_t batch = 0;
  int64_t num_queries = 0;
  int64_t pixels = 0;

  // pixel_attention (math.h) of flat pixel i = b * pixels + pixel, dots
  // being (batch, num_queries, pixels): what the CPU loop and the CUDA
  // kernel compute for each i.
  BOXLOSS_HD_INLINE acc_t<scalar> attention_at(const scalar* dots, int64_t i) const {
    using acc = acc_t<scalar>;
    const int64_t b = i / pixels, pixel = i % pixels;
    return pixel_attention<scalar, acc>(dots + b * num_queries * pixels + pixel, pixels, valid + b * num_queries,
                                        num_queries, num_valid[b], static_cast<acc>(norms[i]), inside[i] != 0,
                                        fallback[b] != 0);
  }

  // pixel_attention_backward of flat pixel i (overwrites its dots, see math.h).
  BOXLOSS_HD_INLINE acc_t<scalar> attention_backward_at(scalar* dots, acc_t<scalar> grad_attention, int64_t i) const {
    using acc = acc_t<scalar>;
    const int64_t b = i / pixels, pixel = i % pixels;
    return pixel_attention_backward<scalar, acc>(
        dots + b * num_queries * pixels + pixel, pixels, valid + b * num_queries, num_queries, num_valid[b],
        static_cast<acc>(norms[i]), inside[i] != 0, fallback[b] != 0, grad_attention);
  }
};

// Background-aware pooling of all boxes.
template <typename scalar>
struct PoolProblem {
  const scalar* features = nullptr;    // (batch, channels, height, width), contiguous
  const scalar* attention = nullptr;   // (batch, height, width), contiguous
  const int64_t* ranges = nullptr;     // (num_boxes, 4): row_begin, row_end, col_begin, col_end
  const int64_t* box_batch = nullptr;  // (num_boxes,)
  int64_t batch = 0;
  int64_t channels = 0;
  int64_t height = 0;
  int64_t width = 0;
  int64_t num_boxes = 0;
  int64_t output_size = 1;  // S: S x S bins per box

  BOXLOSS_HD_INLINE int64_t bins() const { return output_size * output_size; }
  // Rows and columns of bin `bin` (row-major over S x S) of box k.
  BOXLOSS_HD_INLINE void bin_pixels(int64_t k, int64_t bin, Bin* rows, Bin* cols) const {
    const int64_t* r = ranges + 4 * k;
    *rows = bin_of(r[0], r[1] - r[0], bin / output_size, output_size);
    *cols = bin_of(r[2], r[3] - r[2], bin % output_size, output_size);
  }
};

}  // namespace background_attention
}  // namespace boxloss
