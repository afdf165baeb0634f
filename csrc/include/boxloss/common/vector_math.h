// Branch-free float log, exp, sine/cosine, softplus and sigmoid shared by the
// CPU and CUDA kernels.  Written with selects instead of branches and without
// library calls, so that GCC vectorises a loop over lanes that calls them
// (the CPU kernels are compiled with -fno-trapping-math -fno-math-errno and
// target_clones for AVX2 / AVX-512) and the GPU runs the very same
// arithmetic.  The double overloads call the C library: double is the
// precision the tests compare against the references at 1e-6 relative or
// better, and speed is secondary there.
//
// The float polynomials are the Cephes single-precision ones (S. Moshier),
// accurate to about one float ulp on the stated ranges.
#pragma once

#include "boxloss/common/host_device.h"

namespace boxloss {
namespace math {

BOXLOSS_HD_ALWAYS_INLINE int32_t float_to_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(x);
#else
  int32_t out;
  std::memcpy(&out, &x, sizeof(out));
  return out;
#endif
}

// exp_clamped (float and double) is in host_device.h.

// ln x for a positive, finite, normal float x.  x = m 2^e with m in
// [sqrt(1/2), sqrt(2)), then Cephes' logf polynomial in m - 1.
BOXLOSS_HD_ALWAYS_INLINE float log_positive(float x) {
  const int32_t bits = float_to_bits(x);
  int32_t e = ((bits >> 23) & 0xff) - 126;  // x = m 2^e, m in [1/2, 1)
  float m = bits_to_float((bits & 0x007fffff) | 0x3f000000);
  const bool below = m < 0.707106781186547524f;
  e -= below ? 1 : 0;
  m = (below ? m + m : m) - 1.0f;
  const float z = m * m;
  float y = 7.0376836292E-2f;
  y = y * m - 1.1514610310E-1f;
  y = y * m + 1.1676998740E-1f;
  y = y * m - 1.2420140846E-1f;
  y = y * m + 1.4249322787E-1f;
  y = y * m - 1.6668057665E-1f;
  y = y * m + 2.0000714765E-1f;
  y = y * m - 2.4999993993E-1f;
  y = y * m + 3.3333331174E-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y += fe * -2.12194440e-4f;
  y += -0.5f * z;
  return (m + y) + fe * 0.693359375f;
}
BOXLOSS_HD_ALWAYS_INLINE double log_positive(double x) { return log(x); }

// sin(2 pi u) and cos(2 pi u) for u in [0, 1] ("turns"): the nearest quarter
// turn q is split off exactly, the rest (|angle| <= pi/4) goes through
// Cephes' sinf/cosf polynomials, and the quadrant is applied by selects.
BOXLOSS_HD_ALWAYS_INLINE void sincos_turns(float u, float* sin_out, float* cos_out) {
  const int32_t q = static_cast<int32_t>(u * 4.0f + 0.5f);  // u >= 0: truncation rounds to nearest
  const float f = u - static_cast<float>(q) * 0.25f;        // exact, in [-1/8, 1/8]
  const float x = f * 6.28318530717958647692f;
  const float x2 = x * x;
  const float s = ((-1.9515295891E-4f * x2 + 8.3321608736E-3f) * x2 - 1.6666654611E-1f) * x2 * x + x;
  const float c =
      ((2.443315711809948E-5f * x2 - 1.388731625493765E-3f) * x2 + 4.166664568298827E-2f) * x2 * x2 - 0.5f * x2 + 1.0f;
  const bool swap = (q & 1) != 0;
  const float sq = swap ? c : s;
  const float cq = swap ? s : c;
  *sin_out = (q & 2) ? -sq : sq;
  *cos_out = ((q + 1) & 2) ? -cq : cq;
}
BOXLOSS_HD_ALWAYS_INLINE void sincos_turns(double u, double* sin_out, double* cos_out) {
  const double x = 6.283185307179586476925 * u;
  *sin_out = sin(x);
  *cos_out = cos(x);
}

// ln(1 + e) for e in [0, 1]: 2 atanh(q), q = e / (2 + e) in [0, 1/3], by its
// odd series in q^2 <= 1/9 (ten terms reach float precision).  Accurate in
// relative terms also for tiny e, where log(1 + e) in float would return 0.
BOXLOSS_HD_ALWAYS_INLINE float log1p_unit(float e) {
  const float q = e / (2.0f + e);
  const float q2 = q * q;
  float p = 1.0f / 19.0f;
  p = p * q2 + 1.0f / 17.0f;
  p = p * q2 + 1.0f / 15.0f;
  p = p * q2 + 1.0f / 13.0f;
  p = p * q2 + 1.0f / 11.0f;
  p = p * q2 + 1.0f / 9.0f;
  p = p * q2 + 1.0f / 7.0f;
  p = p * q2 + 1.0f / 5.0f;
  p = p * q2 + 1.0f / 3.0f;
  p = p * q2 + 1.0f;
  return 2.0f * q * p;
}
BOXLOSS_HD_ALWAYS_INLINE double log1p_unit(double e) { return log1p(e); }

// softplus(x) = ln(1 + e^x) = max(x, 0) + ln(1 + e^-|x|): no overflow for any
// finite x, and relative accuracy for very negative x.
template <typename acc>
BOXLOSS_HD_ALWAYS_INLINE acc softplus(acc x) {
  const acc ax = x < acc(0) ? -x : x;
  const acc pos = x > acc(0) ? x : acc(0);
  return pos + log1p_unit(exp_nonpositive(-ax));
}

// sigmoid(x) = 1 / (1 + e^-x), from e^-|x| so that nothing overflows.
template <typename acc>
BOXLOSS_HD_ALWAYS_INLINE acc sigmoid(acc x) {
  const acc ax = x < acc(0) ? -x : x;
  const acc e = exp_nonpositive(-ax);
  const acc inv = acc(1) / (acc(1) + e);
  return x >= acc(0) ? inv : e * inv;
}

}  // namespace math
}  // namespace boxloss
