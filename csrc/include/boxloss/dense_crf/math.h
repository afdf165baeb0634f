// Per-pixel math of the DenseCRF loss on the permutohedral lattice, shared by
// the CPU and CUDA kernels.  Torch-free: tests/cpp builds it alone.
//
// With L the lattice filter (boxloss/permutohedral), L^T its transpose (the
// blurs in reverse order) and c_i the self-affinity the lattice is known to
// give pixel i (permutohedral::self_affinity_lower_bound), the affinity is
//
//   W = (L + L^T) / 2 - diag(c),  symmetric with W_ij >= 0 (W_ii = L_ii - c_i >= 0),
//
// and for probabilities S_k (masked: S_k m) and the valid mask m, per image
//
//   E = sum_k S_k^T W (m - S_k)   >= 0,        Z = m^T W m   (the total affinity of valid pairs),
//   dE/dS_k = m (W m - 2 W S_k).
//
// F = L [S_1 m, ..., S_C m, m] and R = L^T [...] are filtered once for all
// channels; a quadratic form needs only one of them (x^T L x = x^T L^T x),
// so the forward reads F alone and the backward adds R:
//
//   E = sum_i m_i sum_k (S_ki F_mi + F_ki) / 2 - S_ki F_ki - c_i S_ki (1 - S_ki)
//   Z = sum_i m_i (F_mi - c_i)
//   dE/dS_ki = m_i [ (F_mi + R_mi) / 2 - c_i - (F_ki + R_ki) + 2 c_i S_ki ]
#pragma once

#include "boxloss/common/host_device.h"

namespace boxloss {
namespace dense_crf {

// Status bit of an image whose probabilities hold NaN, Inf or values outside [0, 1].
constexpr int32_t kProbsOutOfRange = 4;

// Contribution of channel k of a valid pixel to E.
template <typename acc>
BOXLOSS_HD_INLINE acc energy_term(acc s, acc filtered, acc filtered_mask, acc self_affinity) {
  return acc(0.5) * (s * filtered_mask + filtered) - s * filtered - self_affinity * s * (acc(1) - s);
}

// Contribution of a valid pixel to Z.
template <typename acc>
BOXLOSS_HD_INLINE acc normaliser_term(acc filtered_mask, acc self_affinity) {
  return filtered_mask - self_affinity;
}

// dE/dS_k at a valid pixel.
template <typename acc>
BOXLOSS_HD_INLINE acc gradient_term(acc s, acc filtered, acc reversed, acc filtered_mask, acc reversed_mask,
                                    acc self_affinity) {
  return acc(0.5) * (filtered_mask + reversed_mask) - self_affinity - (filtered + reversed) +
         acc(2) * self_affinity * s;
}

// The probabilities' check (host_device.h).
using math::outside_unit_interval;

}  // namespace dense_crf
}  // namespace boxloss
