// Per-pixel math of the Sparse-CRF pairwise loss, shared by the CPU and CUDA
// kernels.  Torch-free on purpose: tests/cpp builds it with CMake alone.
//
//   loss_b = 1/|P_b| * sum_{(p,q) in N, p and q valid} w_pq * sum_{c in S} phi(x_p^c, x_q^c)
//   w_pq   = exp(-||I_p - I_q||^2 / (2 sigma^2))
//   phi    = |a - b|                      (kind L1, Eq. 1 of Box to Tag and Back)
//          = a (1 - b) + b (1 - a)        (kind Potts, the quadratic relaxation of Tang et al.)
#pragma once

#include "boxloss/common/host_device.h"

namespace boxloss {
namespace sparse_crf {

enum class Kind : int32_t { L1 = 0, Potts = 1 };

// Pixel offsets (dy, dx) of the neighbour q = p + offset.  The first
// `neighbourhood / 2` entries enumerate every unordered pair once (the forward
// pass); the backward pass visits all `neighbourhood` entries, so that each
// pixel gathers from every pair it belongs to.
struct Offset {
  int32_t dy;
  int32_t dx;
};

BOXLOSS_HD_INLINE Offset neighbour_offset(int32_t index, int32_t dilation) {
  // forward half: right, down, down-right, down-left; then their negations.
  const int32_t dy_table[8] = {0, 1, 1, 1, 0, -1, -1, -1};
  const int32_t dx_table[8] = {1, 0, 1, -1, -1, 0, -1, 1};
  return Offset{dy_table[index] * dilation, dx_table[index] * dilation};
}

// Index into neighbour_offset of the backward pass's j-th offset, for a
// neighbourhood of 4 (offsets 0, 1, 4, 5) or 8 (all of 0..7).
BOXLOSS_HD_INLINE int32_t backward_offset_index(int32_t j, int32_t neighbourhood) {
  const int32_t half = neighbourhood / 2;
  return j < half ? j : 4 + (j - half);
}

// The half-open range of x for which both p = (y, x) and q = p + (dy, dx) lie
// in a row of width `width`.
BOXLOSS_HD_INLINE void paired_x_range(int64_t width, int32_t dx, int64_t* begin, int64_t* end) {
  *begin = dx < 0 ? -static_cast<int64_t>(dx) : 0;
  *end = dx > 0 ? width - dx : width;
  if (*end < *begin) *end = *begin;
}

// -1 / (2 sigma^2): the factor that turns a squared colour distance into the
// exponent of the pair weight.
template <typename acc>
BOXLOSS_HD_INLINE acc weight_exponent_scale(double sigma) {
  return static_cast<acc>(-1.0 / (2.0 * sigma * sigma));
}

template <typename acc>
BOXLOSS_HD_ALWAYS_INLINE acc pair_weight(acc squared_colour_distance, acc exponent_scale) {
  return math::exp_nonpositive(squared_colour_distance * exponent_scale);
}

// I_p - I_q in one channel, `offset` elements on from p and q: the values read
// with load_read_only and converted by to_acc(value).  to_acc takes a value,
// not a pointer: a pointer into the image passed to a lambda hides from GCC
// that the image and the weights do not overlap, and costs the CPU loops a
// run-time alias check.
template <typename T, typename ToAcc>
BOXLOSS_HD_ALWAYS_INLINE auto colour_difference(const T* p, const T* q, int64_t offset, ToAcc to_acc) {
  return to_acc(math::load_read_only(p + offset)) - to_acc(math::load_read_only(q + offset));
}

// The colour weights of `count` pairs side by side: pair j joins pixels p_j
// and q_j, whose image channel k is p[k * plane + j] and q[k * plane + j], and
//   weight[j] = w_pq = exp(-||I_p - I_q||^2 / (2 sigma^2)),
// times valid_p[j] valid_q[j] when the masks are given (else nullptr).  The
// CPU core calls it for a run of pixels along an image row, where every loop
// over j vectorises; a CUDA thread calls it for one pair (count = 1).
// kChannels = 3 or 1 unrolls the channel sum of RGB and grey images; 0 reads
// the channel count from `channels` and sums channel by channel into
// `squared` (count values).
template <int kChannels, typename acc, typename T, typename ToAcc>
BOXLOSS_HD_ALWAYS_INLINE void pair_weights(const T* __restrict__ p, const T* __restrict__ q, int64_t plane,
                                           int64_t channels, const uint8_t* __restrict__ valid_p,
                                           const uint8_t* __restrict__ valid_q, int64_t count, acc exponent_scale,
                                           ToAcc to_acc, acc* __restrict__ squared, acc* __restrict__ weight) {
  if constexpr (kChannels == 3) {
    for (int64_t j = 0; j < count; ++j) {
      const acc d0 = colour_difference(p, q, j, to_acc);
      const acc d1 = colour_difference(p, q, plane + j, to_acc);
      const acc d2 = colour_difference(p, q, 2 * plane + j, to_acc);
      weight[j] = pair_weight<acc>(d0 * d0 + d1 * d1 + d2 * d2, exponent_scale);
    }
  } else if constexpr (kChannels == 1) {
    for (int64_t j = 0; j < count; ++j) {
      const acc d0 = colour_difference(p, q, j, to_acc);
      weight[j] = pair_weight<acc>(d0 * d0, exponent_scale);
    }
  } else {
    for (int64_t j = 0; j < count; ++j) squared[j] = acc(0);
    for (int64_t k = 0; k < channels; ++k) {
      for (int64_t j = 0; j < count; ++j) {
        const acc d = colour_difference(p, q, k * plane + j, to_acc);
        squared[j] += d * d;
      }
    }
    for (int64_t j = 0; j < count; ++j) weight[j] = pair_weight<acc>(squared[j], exponent_scale);
  }
  if (valid_p != nullptr) {
    for (int64_t j = 0; j < count; ++j) weight[j] *= static_cast<acc>(valid_p[j] & valid_q[j]);
  }
}

template <Kind kind>
struct Term;

// phi(a, b) = |a - b|; d phi / d a = sign(a - b) with sign(0) = 0.
template <>
struct Term<Kind::L1> {
  template <typename acc>
  BOXLOSS_HD_INLINE static acc value(acc a, acc b) {
    const acc d = a - b;
    return d < acc(0) ? -d : d;
  }
  template <typename acc>
  BOXLOSS_HD_INLINE static acc grad_first(acc a, acc b) {
    return static_cast<acc>(a > b) - static_cast<acc>(a < b);
  }
};

// phi(a, b) = a (1 - b) + b (1 - a) = a + b - 2ab; d phi / d a = 1 - 2b.
template <>
struct Term<Kind::Potts> {
  template <typename acc>
  BOXLOSS_HD_INLINE static acc value(acc a, acc b) {
    return a + b - acc(2) * a * b;
  }
  template <typename acc>
  BOXLOSS_HD_INLINE static acc grad_first(acc /*a*/, acc b) {
    return acc(1) - acc(2) * b;
  }
};

// Bits of the per-image input status the forward kernels report; the wrapper
// turns them into a ValueError naming the argument.
enum StatusBits : int32_t {
  kProbsOutOfRange = 1,  // NaN, Inf, or a value outside [0, 1] in a selected channel
  kImageNotFinite = 2,   // NaN or Inf in the image
};

// The probabilities' and the image's checks (host_device.h).
using math::is_finite;
using math::outside_unit_interval;

}  // namespace sparse_crf
}  // namespace boxloss
