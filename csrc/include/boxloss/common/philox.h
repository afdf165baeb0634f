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

// The high and low halves of the 64-bit product of two 32-bit words, for the
// two word types the generator runs on:
//  * uint32_t: the GPU (one __umulhi) and the CPU's AVX2 lane loops, where the
//    product is assembled from four 16 x 16-bit multiplies that vectorise to
//    32-bit vector multiplies (AVX2 has no 32 x 32 -> 64-bit vector multiply
//    that GCC uses well here);
//  * uint64_t holding a 32-bit value: the CPU's AVX-512 lane loops, one
//    64-bit lane multiply per word.
// Both give the same bits.
BOXLOSS_HD_ALWAYS_INLINE void mulhilo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
#else
  const uint32_t a0 = a & 0xffffu, a1 = a >> 16, b0 = b & 0xffffu, b1 = b >> 16;
  const uint32_t p00 = a0 * b0, p01 = a0 * b1, p10 = a1 * b0, p11 = a1 * b1;
  const uint32_t middle = (p00 >> 16) + (p01 & 0xffffu) + (p10 & 0xffffu);
  *hi = p11 + (p01 >> 16) + (p10 >> 16) + (middle >> 16);
#endif
  *lo = a * b;
}
BOXLOSS_HD_ALWAYS_INLINE void mulhilo(uint64_t a, uint64_t b, uint64_t* hi, uint64_t* lo) {
  const uint64_t product = a * b;  // a, b < 2^32: exact
  *hi = product >> 32;
  *lo = product & 0xffffffffu;
}

// Replaces the counter (x0, x1, x2, x3) by Philox4x32-10 of it under the key
// (k0, k1).  Each round: two 32x32 -> 64-bit multiplies and a permutation;
// the key is bumped by the Weyl constants between rounds.  Word is uint32_t,
// or uint64_t with every value below 2^32 (see mulhilo).
template <typename Word>
BOXLOSS_HD_ALWAYS_INLINE void philox4x32_10(Word k0, Word k1, Word& x0, Word& x1, Word& x2, Word& x3) {
  const Word mask = 0xffffffffu;
  BOXLOSS_UNROLL_FULLY
  for (int round = 0; round < kRounds; ++round) {
    Word hi0, lo0, hi1, lo1;
    mulhilo(static_cast<Word>(kMultiplier0), x0, &hi0, &lo0);
    mulhilo(static_cast<Word>(kMultiplier1), x2, &hi1, &lo1);
    const Word y0 = hi1 ^ x1 ^ k0;
    const Word y2 = hi0 ^ x3 ^ k1;
    x0 = y0;
    x1 = lo1;
    x2 = y2;
    x3 = lo0;
    k0 = (k0 + kWeyl0) & mask;
    k1 = (k1 + kWeyl1) & mask;
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
