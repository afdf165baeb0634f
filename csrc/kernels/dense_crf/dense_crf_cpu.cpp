// CPU core of the DenseCRF loss around the lattice filter: unit-stride loops
// over the pixels of one plane at a time, so they vectorise.
#include "boxloss/dense_crf/cpu.h"

#include <algorithm>
#include <vector>

#include "boxloss/common/cpu_clones.h"

namespace boxloss {
namespace dense_crf {
namespace cpu {
namespace {

constexpr int64_t kChunk = 2048;  // pixels per partial sum (fixed: the sums do not depend on threads)

template <typename scalar>
BOXLOSS_ALWAYS_INLINE void self_affinities(const scalar* __restrict splat_weight, int64_t p0, int64_t n,
                                           scalar* __restrict out) {
  for (int64_t t = 0; t < n; ++t) {
    out[t] = permutohedral::self_affinity_lower_bound(splat_weight + (p0 + t) * permutohedral::kVertices);
  }
}

// Partial sums of E and Z over pixels [p0, p0 + n), in double, and the range status.
template <typename scalar>
BOXLOSS_CPU_CLONES int32_t energy_chunk(const scalar* __restrict probs, int64_t channels,
                                        const uint8_t* __restrict mask, const scalar* __restrict filtered,
                                        const scalar* __restrict splat_weight, int64_t num_pixels, int64_t p0,
                                        int64_t n, double* energy, double* normaliser) {
  scalar c[kChunk];
  scalar valid[kChunk];
  scalar e[kChunk];
  self_affinities(splat_weight, p0, n, c);
  for (int64_t t = 0; t < n; ++t) valid[t] = mask == nullptr ? scalar(1) : static_cast<scalar>(mask[p0 + t]);
  const scalar* __restrict f_mask = filtered + channels * num_pixels + p0;
  double z = 0.0;
  for (int64_t t = 0; t < n; ++t) {
    z += static_cast<double>(valid[t] * normaliser_term(f_mask[t], c[t]));
    e[t] = scalar(0);
  }
  int32_t bad = 0;
  for (int64_t k = 0; k < channels; ++k) {
    const scalar* __restrict s = probs + k * num_pixels + p0;
    const scalar* __restrict f = filtered + k * num_pixels + p0;
    for (int64_t t = 0; t < n; ++t) {
      bad |= static_cast<int32_t>(outside_unit_interval(s[t]));
      // Select, not multiply: a masked-out pixel's value never reaches the sum.
      const scalar sv = valid[t] != scalar(0) ? s[t] : scalar(0);
      e[t] += energy_term(sv, f[t], f_mask[t], c[t]);
    }
  }
  double total = 0.0;
  for (int64_t t = 0; t < n; ++t) total += static_cast<double>(valid[t] * e[t]);
  *energy = total;
  *normaliser = z;
  return bad ? kProbsOutOfRange : 0;
}

template <typename scalar>
BOXLOSS_CPU_CLONES void gradient_chunk(const scalar* __restrict probs, int64_t channels, const uint8_t* __restrict mask,
                                       const scalar* __restrict filtered, const scalar* __restrict reversed,
                                       const scalar* __restrict splat_weight, int64_t num_pixels, int64_t p0, int64_t n,
                                       scalar scale, scalar* __restrict grad) {
  scalar c[kChunk];
  scalar valid_scale[kChunk];
  self_affinities(splat_weight, p0, n, c);
  for (int64_t t = 0; t < n; ++t) {
    valid_scale[t] = mask == nullptr ? scale : (mask[p0 + t] ? scale : scalar(0));
  }
  const scalar* __restrict f_mask = filtered + channels * num_pixels + p0;
  const scalar* __restrict r_mask = reversed + channels * num_pixels + p0;
  for (int64_t k = 0; k < channels; ++k) {
    const scalar* __restrict s = probs + k * num_pixels + p0;
    const scalar* __restrict f = filtered + k * num_pixels + p0;
    const scalar* __restrict r = reversed + k * num_pixels + p0;
    scalar* __restrict g = grad + k * num_pixels + p0;
    for (int64_t t = 0; t < n; ++t) {
      g[t] = valid_scale[t] * gradient_term(s[t], f[t], r[t], f_mask[t], r_mask[t], c[t]);
    }
  }
}

}  // namespace

template <typename scalar>
int32_t energy_image(const scalar* probs, int64_t channels, const uint8_t* mask, const scalar* filtered,
                     const scalar* splat_weight, int64_t num_pixels, double* energy, double* normaliser,
                     const RangeRunner& runner) {
  const int64_t chunks = (num_pixels + kChunk - 1) / kChunk;
  std::vector<double> e(static_cast<size_t>(chunks)), z(static_cast<size_t>(chunks));
  std::vector<int32_t> status(static_cast<size_t>(chunks), 0);
  const int64_t grain = std::max<int64_t>(4, (int64_t{1} << 18) / (kChunk * std::max<int64_t>(1, channels)));
  runner(chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t p0 = i * kChunk;
      status[i] = energy_chunk<scalar>(probs, channels, mask, filtered, splat_weight, num_pixels, p0,
                                       std::min(kChunk, num_pixels - p0), &e[i], &z[i]);
    }
  });
  double total_e = 0.0, total_z = 0.0;
  int32_t total_status = 0;
  for (int64_t i = 0; i < chunks; ++i) {
    total_e += e[i];
    total_z += z[i];
    total_status |= status[i];
  }
  *energy = total_e;
  *normaliser = total_z;
  return total_status;
}

template <typename scalar>
void gradient_image(const scalar* probs, int64_t channels, const uint8_t* mask, const scalar* filtered,
                    const scalar* reversed, const scalar* splat_weight, int64_t num_pixels, scalar scale, scalar* grad,
                    const RangeRunner& runner) {
  const int64_t chunks = (num_pixels + kChunk - 1) / kChunk;
  const int64_t grain = std::max<int64_t>(4, (int64_t{1} << 18) / (kChunk * std::max<int64_t>(1, channels)));
  runner(chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t p0 = i * kChunk;
      gradient_chunk<scalar>(probs, channels, mask, filtered, reversed, splat_weight, num_pixels, p0,
                             std::min(kChunk, num_pixels - p0), scale, grad);
    }
  });
}

template int32_t energy_image<float>(const float*, int64_t, const uint8_t*, const float*, const float*, int64_t,
                                     double*, double*, const RangeRunner&);
template int32_t energy_image<double>(const double*, int64_t, const uint8_t*, const double*, const double*, int64_t,
                                      double*, double*, const RangeRunner&);
template void gradient_image<float>(const float*, int64_t, const uint8_t*, const float*, const float*, const float*,
                                    int64_t, float, float*, const RangeRunner&);
template void gradient_image<double>(const double*, int64_t, const uint8_t*, const double*, const double*,
                                     const double*, int64_t, double, double*, const RangeRunner&);

}  // namespace cpu
}  // namespace dense_crf
}  // namespace boxloss
