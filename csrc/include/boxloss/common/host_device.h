// Macros and small math shared by the CPU (.cpp) and CUDA (.cu) kernels.
// This header must stay free of torch and of the CUDA runtime so that the
// kernel core builds with CMake alone (see CMakeLists.txt).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define BOXLOSS_HD __host__ __device__
#define BOXLOSS_DEVICE_COMPILE 1
#else
#define BOXLOSS_HD
#endif

#define BOXLOSS_HD_INLINE BOXLOSS_HD inline

// Always inlined, also on the host: a call left in a loop over lanes stops
// its vectorisation, and the target_clones callers (cpu_clones.h) only run
// their AVX2 / AVX-512 code for what is inlined into them.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define BOXLOSS_HD_ALWAYS_INLINE __host__ __device__ __forceinline__
#else
#define BOXLOSS_HD_ALWAYS_INLINE inline __attribute__((always_inline))
#endif

namespace boxloss {

// Accumulation type: half and bfloat16 accumulate in float, float in float,
// double in double.  Kernels load storage types through `to_acc`.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

namespace math {

// *p, read through the GPU's read-only data cache (__ldg) in device code: for
// inputs a kernel never writes.
template <typename T>
BOXLOSS_HD_ALWAYS_INLINE T load_read_only(const T* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

BOXLOSS_HD_INLINE float bits_to_float(int32_t bits) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(bits);
#else
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
#endif
}

// e^x for any float x, written without branches or library calls so that the
// compiler vectorises it on the CPU and the GPU runs the very same arithmetic.
// Arguments are clamped to [-87.3, 88], so the result is a finite, normal
// float (e^-87.3 ~ 1.3e-38 stands in for smaller values, e^88 ~ 1.7e38 for
// larger ones).  Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, with
// n rounded to nearest by the 1.5 * 2^23 trick, then a degree-6 minimax
// polynomial (the classic Cephes expf coefficients) for e^r and 2^n built from
// the exponent bits.  Maximum relative error against exp in double is about
// one float ulp.  This is the one float exp of the kernels (vector_math.h and
// the Sparse-CRF weights use it).
BOXLOSS_HD_ALWAYS_INLINE float exp_clamped(float x) {
  const float log2e = 1.44269504088896341f;
  const float ln2_hi = 0.693359375f;
  const float ln2_lo = -2.12194440e-4f;
  const float round_shift = 12582912.0f;  // 1.5 * 2^23
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.0f ? 88.0f : x;
  const float n = (x * log2e + round_shift) - round_shift;
  float r = x - n * ln2_hi;
  r = r - n * ln2_lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * bits_to_float(bits);
}

// exp(x) for x <= 0 (positive arguments give 1): the clamp comes before the
// polynomial, where it does not stop vectorisation (a select after it does).
BOXLOSS_HD_ALWAYS_INLINE float exp_nonpositive(float x) { return exp_clamped(x > 0.0f ? 0.0f : x); }

// Double precision keeps the library exp: float64 is the precision the tests
// compare against the reference at 1e-6 relative, and speed is secondary there.
BOXLOSS_HD_INLINE double exp_nonpositive(double x) { return exp(x); }
BOXLOSS_HD_INLINE double exp_clamped(double x) { return exp(x); }

// The input checks of the kernels, written with plain compares so that a loop
// over pixels that calls them vectorises.
//
// True when v is finite: v - v is 0 for every finite v and NaN otherwise.
template <typename T>
BOXLOSS_HD_ALWAYS_INLINE bool is_finite(T v) {
  return (v - v) == T(0);
}

// True when v is NaN, +-Inf, or outside [0, 1] (NaN fails every ordered compare).
template <typename T>
BOXLOSS_HD_ALWAYS_INLINE bool outside_unit_interval(T v) {
  return !(v >= T(0) && v <= T(1));
}

}  // namespace math
}  // namespace boxloss
