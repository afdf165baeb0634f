// Per-pixel and per-bin math of background attention and background-aware
// pooling (BANA, Oh et al., CVPR 2021, Eq. 1-4), written once for the CPU core
// and the CUDA kernels.
//
// Layouts: features (B, D, P) with P = h * w pixels; dots (B, J, P) hold
// q_hat_j . f(p) for the unit-norm queries q_hat_j = q_j / max(|q_j|, eps);
// norms (B, P) hold |f(p)|.  cos_j(p) = dots / max(|f(p)|, eps), and the
// attention inside the boxes is (1/J) sum over valid j of clamp(cos_j, 0, 1)
// (the ReLU of Eq. 3, with the rounding excess above 1 cut so that 1 - A is
// never negative).  Both clamps have subgradient 0 at their ends.
#pragma once

#include <cstdint>

#include "boxloss/common/host_device.h"

namespace boxloss {
namespace background_attention {

// The eps of the cosine normalisations (as F.cosine_similarity's clamp of each norm).
constexpr double kNormEps = 1e-8;

template <typename acc>
BOXLOSS_HD_INLINE acc clamp_unit(acc c) {
  return c > acc(0) ? (c < acc(1) ? c : acc(1)) : acc(0);
}

// 1 / max(norm, eps).
template <typename acc>
BOXLOSS_HD_INLINE acc inverse_norm(acc norm) {
  return acc(1) / (norm > acc(kNormEps) ? norm : acc(kNormEps));
}

// A(p) for one pixel.  inside: p lies in a box; fallback: the image has too
// little background (A = 0 inside its boxes); num_valid: J.
template <typename scalar, typename acc>
BOXLOSS_HD_INLINE acc pixel_attention(const scalar* dots, int64_t stride, const uint8_t* valid, int64_t num_queries,
                                      int64_t num_valid, acc norm, bool inside, bool fallback) {
  if (!inside) return acc(1);
  if (fallback || num_valid == 0) return acc(0);
  const acc inv = inverse_norm(norm);
  acc sum = 0;
  for (int64_t j = 0; j < num_queries; ++j) {
    if (valid[j]) sum += clamp_unit(static_cast<acc>(dots[j * stride]) * inv);
  }
  return sum / static_cast<acc>(num_valid);
}

// Backward of pixel_attention for one pixel.  Overwrites dots[j * stride]
// with g_j = dA/dcos_j / max(|f|, eps) (so that the feature gradient is
// sum_j g_j q_hat_j + coef * f(p) and the unit-query gradient is
// sum_p g_j(p) f(p)), and returns coef = -sum_j dA/dcos_j cos_j / |f|^2 (0
// where |f| <= eps, as the clamped norm is constant there).
template <typename scalar, typename acc>
BOXLOSS_HD_INLINE acc pixel_attention_backward(scalar* dots, int64_t stride, const uint8_t* valid, int64_t num_queries,
                                               int64_t num_valid, acc norm, bool inside, bool fallback, acc grad) {
  const bool active = inside && !fallback && num_valid > 0;
  const acc inv = inverse_norm(norm);
  const acc scale = active ? grad / static_cast<acc>(num_valid) : acc(0);
  acc radial = 0;
  for (int64_t j = 0; j < num_queries; ++j) {
    const acc c = static_cast<acc>(dots[j * stride]) * inv;
    const acc d = (valid[j] && c > acc(0) && c < acc(1)) ? scale : acc(0);
    radial += d * c;
    dots[j * stride] = static_cast<scalar>(d * inv);
  }
  return norm > acc(kNormEps) ? -radial / (norm * norm) : acc(0);
}

// Grid cell of map row (or column) y of `size` rows split into n cells by
// integer splits: cell j holds rows [floor(j * size / n), floor((j + 1) * size / n)).
BOXLOSS_HD_INLINE int64_t grid_cell(int64_t y, int64_t size, int64_t n) { return ((y + 1) * n - 1) / size; }

// Bin i of n bins over the span [begin, begin + length): integer splits that
// always hold at least one pixel, [begin + floor(i * length / n),
// begin + ceil((i + 1) * length / n)) (neighbouring bins share a pixel when n
// does not divide the length, as roi_align's bins overlap).
struct Bin {
  int64_t begin, end;
};
BOXLOSS_HD_INLINE Bin bin_of(int64_t begin, int64_t length, int64_t i, int64_t n) {
  return Bin{begin + (i * length) / n, begin + ((i + 1) * length + n - 1) / n};
}

// Sum of (1 - A) over a bin's pixels (rows x cols) of one attention plane.
template <typename scalar, typename acc>
BOXLOSS_HD_INLINE acc bin_weight_sum(const scalar* attention, int64_t width, Bin rows, Bin cols) {
  acc sum = 0;
  for (int64_t y = rows.begin; y < rows.end; ++y) {
    for (int64_t x = cols.begin; x < cols.end; ++x) sum += acc(1) - static_cast<acc>(attention[y * width + x]);
  }
  return sum;
}

// A bin whose weight sum is not positive (every pixel has A >= 1) pools the
// plain mean instead of Eq. 4's weighted mean.
template <typename acc>
BOXLOSS_HD_INLINE bool plain_bin(acc weight_sum) {
  return !(weight_sum > acc(0));
}

// Weight of pixel p in its bin's mean: (1 - A(p)) / weight_sum, or 1 / count
// for a plain bin.
template <typename acc>
BOXLOSS_HD_INLINE acc pixel_weight(acc attention, acc weight_sum, int64_t count) {
  return plain_bin(weight_sum) ? acc(1) / static_cast<acc>(count) : (acc(1) - attention) / weight_sum;
}

// The pooled value of one channel plane over one bin.
template <typename scalar, typename acc>
BOXLOSS_HD_INLINE acc bin_pool(const scalar* feature, const scalar* attention, int64_t width, Bin rows, Bin cols,
                               acc weight_sum) {
  const int64_t count = (rows.end - rows.begin) * (cols.end - cols.begin);
  acc sum = 0;
  for (int64_t y = rows.begin; y < rows.end; ++y) {
    for (int64_t x = cols.begin; x < cols.end; ++x) {
      sum += pixel_weight(static_cast<acc>(attention[y * width + x]), weight_sum, count) *
             static_cast<acc>(feature[y * width + x]);
    }
  }
  return sum;
}

// d pooled / d A(p) contribution of one bin: -(g . (f(p) - r)) / weight_sum
// for a weighted bin (0 for a plain bin), given g . f(p) and g . r.
template <typename acc>
BOXLOSS_HD_INLINE acc attention_grad(acc g_dot_f, acc g_dot_r, acc weight_sum) {
  return plain_bin(weight_sum) ? acc(0) : -(g_dot_f - g_dot_r) / weight_sum;
}

}  // namespace background_attention
}  // namespace boxloss
