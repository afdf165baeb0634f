// The description of one uncertainty-loss call that the torch wrappers hand
// to the torch-free kernels (CPU core and CUDA launchers).
#pragma once

#include <cstdint>

#include "boxloss/uncertainty/math.h"

namespace boxloss {
namespace uncertainty {

// Binary loss (Eq. 8-11).  Dense row-major buffers; the wrappers make them
// contiguous.  Pixels are numbered b * plane + i.
struct BinaryProblem {
  const void* mu = nullptr;              // (batch, plane), scalar type of the call
  const void* log_var = nullptr;         // (batch, plane)
  const void* target = nullptr;          // (batch, plane), in [0, 1]
  const uint8_t* box_mask = nullptr;     // (batch, plane) 0/1, or nullptr: every pixel inside a box
  const uint8_t* pixel_perfect = nullptr;  // (batch,) 0/1, or nullptr: no pixel-perfect image
  int64_t batch = 0;
  int64_t plane = 0;  // H * W
  double tau = 2.5;
  double temperature = 0.2;
  bool bootstrap = true;
  bool route_gradients = true;

  BOXLOSS_HD_INLINE int64_t num_pixels() const { return batch * plane; }
  // Inside a box of an image that has no pixel-perfect label.
  BOXLOSS_HD_INLINE bool uncertain(int64_t pixel) const {
    const int64_t b = pixel / plane;
    return (box_mask == nullptr || box_mask[pixel] != 0) && (pixel_perfect == nullptr || pixel_perfect[b] == 0);
  }
  template <typename acc>
  BOXLOSS_HD_INLINE BinarySettings<acc> settings() const {
    BinarySettings<acc> st;
    st.tau = static_cast<acc>(tau);
    st.inv_temperature = static_cast<acc>(1.0 / temperature);
    return st;
  }
};

// Multi-class loss (Eq. 13-16).
struct ClassProblem {
  const void* mu = nullptr;              // (batch, num_classes, plane)
  const void* log_var = nullptr;         // (batch, num_classes, plane)
  const int64_t* target = nullptr;       // (batch, plane)
  const uint8_t* box_mask = nullptr;     // (batch, plane) 0/1, or nullptr: every pixel inside a box
  const uint8_t* pixel_perfect = nullptr;  // (batch,) 0/1, or nullptr
  int64_t batch = 0;
  int64_t num_classes = 0;
  int64_t plane = 0;  // H * W
  int64_t samples = 20;  // T >= 1
  NoiseKey key;
  double log_tau = 0.91629073187415511;  // log(2.5)
  bool bootstrap = true;
  bool route_gradients = true;
  int64_t ignore_index = 255;
  // CPU only: the Philox word type of the lane loops, 32 or 64 bits (the
  // same noise; philox::mulhilo), or 0 to pick the faster one for the CPU.
  // The C++ tests force each.
  int32_t cpu_generator_words = 0;

  BOXLOSS_HD_INLINE int64_t num_pixels() const { return batch * plane; }
};

}  // namespace uncertainty
}  // namespace boxloss
