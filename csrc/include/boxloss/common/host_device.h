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

BOXLOSS_HD_INLINE float bits_to_float(int32_t bits) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(bits);
#else
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
#endif
}

// exp(x) for x <= 0, written without branches or library calls so that the
// compiler vectorises it on the CPU and the GPU runs the very same arithmetic.
// Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, then a degree-6
// minimax polynomial (the classic Cephes expf coefficients) for e^r and 2^n built from the exponent bits.
// Maximum relative error against exp in double is below 1e-7 (one float ulp) on
// [-87, 0]; arguments below -87 return e^-87 ~ 1.6e-38 (the edge of the normal
// float range), an absolute error far below anything a colour weight resolves.
// (Selecting 0 there instead stops GCC from vectorising the loop for AVX2/512.)
BOXLOSS_HD_INLINE float exp_nonpositive(float x) {
  const float log2e = 1.44269504088896341f;
  const float ln2_hi = 0.693359375f;
  const float ln2_lo = -2.12194440e-4f;
  x = x < -87.0f ? -87.0f : x;
  x = x > 0.0f ? 0.0f : x;
  // round-to-nearest of x*log2e for x <= 0 without a library call
  const float n = static_cast<float>(static_cast<int32_t>(x * log2e - 0.5f));
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

// Double precision keeps the library exp: float64 is the precision the tests
// compare against the reference at 1e-6 relative, and speed is secondary there.
BOXLOSS_HD_INLINE double exp_nonpositive(double x) {
  return exp(x);
}

}  // namespace math
}  // namespace boxloss
