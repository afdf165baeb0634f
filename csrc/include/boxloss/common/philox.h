// Philox4x32-10 (Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as
// easy as 1, 2, 3", SC 2011: the counter-based generator of Random123, cuRAND
// and PyTorch's CUDA generator) and Box-Muller normals, as host/device code.
//
// A counter-based generator is a pure function of (key, counter): any thread
// computes the numbers of any (pixel, sample, class) without state, in any
// order, and a backward pass regenerates exactly the noise its forward drew
// instead of storing it.  Checked against the Random123 known-answer vectors
// in tests/cpp/test_philox.cpp; boxloss/reference/philox.py re-implements the
// same function in numpy for the reference losses.
#pragma once

#include "boxloss/common/host_device.h"
#include "boxloss/common/vector_math.h"

#if defined(__CUDACC__) || defined(__HIPCC__)
#define BOXLOSS_UNROLL_FULLY _Pragma("unroll")
#else
#define BOXLOSS_UNROLL_FULLY _Pragma("GCC unroll 16")
#endif

namespace boxloss {
namespace philox {

constexpr uint32_t kMultiplier0 = 0xD2511F53u;
constexpr uint32_t kMultiplier1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kWeyl1 = 0xBB67AE85u;  // sqrt(3) - 1
constexpr int kRounds = 10;

BOXLOSS_HD_ALWAYS_INLINE void mulhilo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  *lo = a * b;
#else
  // One widening multiply; vectorises (vpmuludq) in a loop over lanes.
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(product >> 32);
  *lo = static_cast<uint32_t>(product);
#endif
}

// Replaces the counter (x0, x1, x2, x3) by Philox4x32-10 of it under the key
// (k0, k1).  Each round: two 32x32 -> 64-bit multiplies and a permutation;
// the key is bumped by the Weyl constants between rounds.
BOXLOSS_HD_ALWAYS_INLINE void philox4x32_10(uint32_t k0, uint32_t k1, uint32_t& x0, uint32_t& x1, uint32_t& x2,
                                     uint32_t& x3) {
  BOXLOSS_UNROLL_FULLY
  for (int round = 0; round < kRounds; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kMultiplier0, x0, &hi0, &lo0);
    mulhilo(kMultiplier1, x2, &hi1, &lo1);
    const uint32_t y0 = hi1 ^ x1 ^ k0;
    const uint32_t y2 = hi0 ^ x3 ^ k1;
    x0 = y0;
    x1 = lo1;
    x2 = y2;
    x3 = lo0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
}

// The uniform in (0, 1) of a 32-bit draw x: (x + 1/2) 2^-32.  In double this
// is exact.  In float it is computed as x 2^-32 + 2^-33 from x rounded to 24
// bits, so it has the float's relative precision everywhere (also near 0,
// where Box-Muller's log is most sensitive); near 1 it may round to 1.
BOXLOSS_HD_ALWAYS_INLINE double uniform_open(uint32_t x, double) {
  return (static_cast<double>(x) + 0.5) * 2.3283064365386962890625e-10;
}
BOXLOSS_HD_ALWAYS_INLINE float uniform_open(uint32_t x, float) {
  return static_cast<float>(x) * 2.3283064365386962890625e-10f + 1.16415321826934814453125e-10f;
}

// Box-Muller: two draws (a, b) give two independent standard normals
//   z0 = r cos(2 pi u_b),  z1 = r sin(2 pi u_b),  r = sqrt(-2 ln u_a).
// double uses the library functions (the reference computes the same
// expressions in numpy float64); float uses the branch-free polynomials of
// vector_math.h, which the CPU vectorises across lanes.
BOXLOSS_HD_ALWAYS_INLINE void box_muller(uint32_t a, uint32_t b, double* z0, double* z1) {
  const double u1 = uniform_open(a, 0.0);
  const double u2 = uniform_open(b, 0.0);
  const double r = sqrt(-2.0 * log(u1));
  const double theta = 6.283185307179586476925 * u2;
  *z0 = r * cos(theta);
  *z1 = r * sin(theta);
}
BOXLOSS_HD_ALWAYS_INLINE void box_muller(uint32_t a, uint32_t b, float* z0, float* z1) {
  const float u1 = uniform_open(a, 0.0f);
  const float u2 = uniform_open(b, 0.0f);
  const float r = sqrtf(-2.0f * math::log_positive(u1));
  float s, c;
  math::sincos_turns(u2, &s, &c);
  *z0 = r * c;
  *z1 = r * s;
}

}  // namespace philox
}  // namespace boxloss
