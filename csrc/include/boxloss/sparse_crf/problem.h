// The description of one Sparse-CRF call that the torch wrappers hand to the
// torch-free kernels (CPU core and CUDA launchers).
#pragma once

#include <cstdint>

#include "boxloss/sparse_crf/math.h"

namespace boxloss {
namespace sparse_crf {

struct Problem {
  // Dense row-major buffers; the wrappers make them contiguous.
  const void* probs = nullptr;        // (batch, num_channels, height, width), scalar type of the call
  const void* image = nullptr;        // (batch, image_channels, height, width), same scalar type
  const uint8_t* valid = nullptr;     // (batch, height, width) 0/1, or nullptr: every pixel valid
  const int32_t* channels = nullptr;  // num_selected channel indices, or nullptr: 0..num_channels-1
  int64_t batch = 0;
  int64_t num_channels = 0;
  int64_t height = 0;
  int64_t width = 0;
  int64_t image_channels = 0;
  int64_t num_selected = 0;
  int32_t neighbourhood = 8;  // 4 or 8
  int32_t dilation = 1;       // >= 1
  double sigma = 0.15;        // > 0, in the units of `image`
  Kind kind = Kind::L1;

  BOXLOSS_HD_INLINE int64_t plane() const { return height * width; }
  BOXLOSS_HD_INLINE int64_t channel_at(int64_t s) const {
    return channels == nullptr ? s : static_cast<int64_t>(channels[s]);
  }
};

}  // namespace sparse_crf
}  // namespace boxloss
