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
  const void* mu = nullptr;                // (batch, plane), scalar type of the call
  const void* log_var = nullptr;           // (batch, plane)
  const void* target = nullptr;            // (batch, plane), in [0, 1]
  const uint8_t* box_mask = nullptr;       // (batch, plane) 0/1, or nullptr: every pixel inside a box
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
  const void* mu = nullptr;                // (batch, num_classes, plane)
  const void* log_var = nullptr;           // (batch, num_classes, plane)
  const int64_t* target = nullptr;         // (batch, plane)
  const uint8_t* box_mask = nullptr;       // (batch, plane) 0/1, or nullptr: every pixel inside a box
  const uint8_t* pixel_perfect = nullptr;  // (batch,) 0/1, or nullptr
  int64_t batch = 0;
  int64_t num_classes = 0;
  int64_t plane = 0;     // H * W
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

  // Offset of class 0 of flat pixel `pixel` = b * plane + i in the
  // (batch, num_classes, plane) arrays; class c lies c * plane further.
  BOXLOSS_HD_INLINE int64_t class_offset(int64_t pixel) const {
    const int64_t b = pixel / plane;
    return b * num_classes * plane + (pixel - b * plane);
  }

  // The per-pixel step before any sample is drawn (targets, Eq. 16 and
  // CE(mu, y*): class_head_targets and class_head_logits in math.h) of flat
  // pixels pixel0 .. pixel0 + n - 1 of one image, in N lanes: a chunk of the
  // CPU core, or one CUDA thread's pixel (N = n = 1).  mu and log_var point at
  // class 0 of pixel0, class c lying c * class_stride further (the CPU's lane
  // buffers or the input arrays).  Returns the ClassStatus bits.
  template <int N, typename acc, typename T>
  BOXLOSS_HD_ALWAYS_INLINE int32_t head_at(int64_t pixel0, int64_t n, const T* mu, const T* log_var,
                                           int64_t class_stride, ClassHead<acc, N>* head, bool* any_uncertain) const {
    const int64_t b = pixel0 / plane;
    const bool pp = pixel_perfect != nullptr && pixel_perfect[b] != 0;
    const int32_t status =
        class_head_targets<acc, N>(target + pixel0, box_mask == nullptr ? nullptr : box_mask + pixel0, n, pp,
                                   num_classes, ignore_index, head, any_uncertain);
    class_head_logits<acc, N>(mu, log_var, class_stride, num_classes, static_cast<acc>(log_tau), bootstrap, head);
    return status;
  }
};

}  // namespace uncertainty
}  // namespace boxloss
