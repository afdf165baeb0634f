// Per-pixel math of DenseCRF mean-field inference (Krähenbühl & Koltun,
// "Efficient Inference in Fully Connected CRFs with Gaussian Edge Potentials",
// NeurIPS 2011), shared by the CPU and CUDA kernels.  Torch-free: tests/cpp
// builds it alone.
//
// With the unaries U (negative log-probabilities), the Potts compatibility and
// kernels k (appearance: the 5-d bilateral lattice; smoothness: the 2-d spatial
// lattice), each of weight w_k, raw lattice filter L_k and normaliser
// n_k = 1 / sqrt(L_k m + 1e-20) over the valid pixels m (Krähenbühl's
// NORMALIZE_SYMMETRIC), one mean-field step is
//
//   Q_i = softmax( -U_i + sum_k w_k n_ki [L_k (n_k m Q)]_i ),   Q^0_i = softmax(-U_i)
//
// at valid pixels; invalid ones keep Q^0.
#pragma once

#include <limits>

#include "boxloss/common/host_device.h"

namespace boxloss {
namespace crf_inference {

// Status bits of the unaries (per image).
enum UnaryStatus : int32_t {
  kUnaryNaN = 1,               // a unary is NaN
  kUnaryNegativeInfinity = 2,  // a unary is -inf (a probability of +inf)
  kUnaryAllInfinite = 4,       // every unary of a pixel is +inf (no label possible)
};

// A class whose logit lies this far below the pixel's largest gets
// probability exactly 0 (e^-80 ~ 1.8e-35): a unary of +inf (probability 0)
// stays exactly 0 through every step, and no denormal enters the lattice.
constexpr double kFlushBelow = -80.0;

// Krähenbühl's offset in the symmetric normaliser 1 / sqrt(L m + 1e-20).
constexpr double kNormaliserOffset = 1e-20;

template <typename acc>
BOXLOSS_HD_ALWAYS_INLINE acc negative_infinity() {
  return -std::numeric_limits<acc>::infinity();
}

// Status bits of one unary value.
template <typename acc>
BOXLOSS_HD_ALWAYS_INLINE int32_t unary_value_status(acc u) {
  return (u != u ? kUnaryNaN : 0) | (u == negative_infinity<acc>() ? kUnaryNegativeInfinity : 0);
}

template <typename acc>
BOXLOSS_HD_ALWAYS_INLINE bool is_positive_infinity(acc u) {
  return u == -negative_infinity<acc>();
}

// The symmetric normaliser of a pixel from its filtered mask L m.
template <typename acc>
BOXLOSS_HD_ALWAYS_INLINE acc normaliser(acc filtered_mask) {
  return acc(1) / sqrt(filtered_mask + static_cast<acc>(kNormaliserOffset));
}

// e^d for d <= 0 (or -inf), 0 below kFlushBelow.  float: the kernels' branch-free exp.
BOXLOSS_HD_ALWAYS_INLINE float flushed_exp(float d) {
  const float e = math::exp_nonpositive(d);
  return d < static_cast<float>(kFlushBelow) ? 0.0f : e;
}
BOXLOSS_HD_ALWAYS_INLINE double flushed_exp(double d) { return d < kFlushBelow ? 0.0 : exp(d); }

// In place over kPixels pixels stored channel-major, x[c * kPixels + t]:
// the logits of `channels` classes (-inf allowed, not all of a pixel's) ->
// their softmax.  Each pixel's maximum and sum run over its classes in class
// order, so the CPU, which runs this over blocks of pixels (one vector lane
// per pixel), and a CUDA thread, which runs it on one pixel (kPixels = 1),
// compute the same sums in the same order.
template <typename acc, int kPixels>
BOXLOSS_HD_ALWAYS_INLINE void softmax_pixels(acc* x, int64_t channels) {
  acc largest[kPixels];
  acc sum[kPixels];
  for (int t = 0; t < kPixels; ++t) largest[t] = x[t];
  for (int64_t c = 1; c < channels; ++c) {
    for (int t = 0; t < kPixels; ++t) {
      const acc v = x[c * kPixels + t];
      largest[t] = v > largest[t] ? v : largest[t];
    }
  }
  for (int t = 0; t < kPixels; ++t) sum[t] = acc(0);
  for (int64_t c = 0; c < channels; ++c) {
    for (int t = 0; t < kPixels; ++t) {
      const acc e = flushed_exp(x[c * kPixels + t] - largest[t]);
      x[c * kPixels + t] = e;
      sum[t] += e;
    }
  }
  for (int t = 0; t < kPixels; ++t) sum[t] = acc(1) / sum[t];
  for (int64_t c = 0; c < channels; ++c) {
    for (int t = 0; t < kPixels; ++t) x[c * kPixels + t] *= sum[t];
  }
}

BOXLOSS_HD_INLINE int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

}  // namespace crf_inference
}  // namespace boxloss
