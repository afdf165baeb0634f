// 32-byte groups of channels as GCC vectors, for the CPU kernels that move
// vertex rows of the permutohedral lattice (the lattice filter and the
// mean-field inference): 8 floats or 4 doubles, loaded, stored and transposed
// in registers.  CPU only (GCC / Clang vector extensions).
#pragma once

#include <cstdint>

#include "boxloss/common/cpu_clones.h"

// The helpers that pass these vectors by value are always inlined, so the
// baseline clone's note that a 32-byte vector argument changes the ABI
// (-Wpsabi) never concerns a real call.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace boxloss {
namespace simd {

// Channels per group: one 32-byte vector.
template <typename scalar>
constexpr int64_t kGroup = 32 / sizeof(scalar);

// One group as a GCC vector.  Vertex rows of whole groups are 32-byte
// aligned; written as 32-byte vectors they never straddle a cache line,
// whereas the auto-vectoriser's 64-byte vectors (AVX-512 clone) split every
// other 96-byte row of a 21-channel filter across two lines.  Measured at
// 513 x 513 on one core, 8- and 16-channel filters took half the time with
// 32-byte vectors, 21 channels a few percent less.
template <typename scalar>
struct GroupVector {
  typedef scalar type __attribute__((vector_size(32)));
};
template <typename scalar>
using Vec = typename GroupVector<scalar>::type;

template <typename scalar>
BOXLOSS_ALWAYS_INLINE Vec<scalar> load_group(const scalar* p) {
  Vec<scalar> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename scalar>
BOXLOSS_ALWAYS_INLINE void store_group(scalar* p, Vec<scalar> v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

// In-register transpose of a g x g block: v[j] holds element i of row j on
// entry and row i's element j on exit (8 x 8 floats, 4 x 4 doubles), in
// three (two) rounds of two-input shuffles: unpack, 64-bit pairs, 128-bit
// halves.
template <typename scalar>
BOXLOSS_ALWAYS_INLINE void transpose_group(Vec<scalar>* v) {
  if constexpr (kGroup<scalar> == 8) {
    Vec<scalar> t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
      t[i] = __builtin_shufflevector(v[i], v[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
      t[i + 1] = __builtin_shufflevector(v[i], v[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int i = 0; i < 8; i += 4) {
      u[i] = __builtin_shufflevector(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[i + 1] = __builtin_shufflevector(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
      u[i + 2] = __builtin_shufflevector(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
      u[i + 3] = __builtin_shufflevector(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
    }
    for (int i = 0; i < 4; ++i) {
      v[i] = __builtin_shufflevector(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
      v[i + 4] = __builtin_shufflevector(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
  } else {
    static_assert(kGroup<scalar> == 4, "32-byte groups of float or double");
    const Vec<scalar> t0 = __builtin_shufflevector(v[0], v[1], 0, 4, 2, 6);
    const Vec<scalar> t1 = __builtin_shufflevector(v[0], v[1], 1, 5, 3, 7);
    const Vec<scalar> t2 = __builtin_shufflevector(v[2], v[3], 0, 4, 2, 6);
    const Vec<scalar> t3 = __builtin_shufflevector(v[2], v[3], 1, 5, 3, 7);
    v[0] = __builtin_shufflevector(t0, t2, 0, 1, 4, 5);
    v[1] = __builtin_shufflevector(t1, t3, 0, 1, 4, 5);
    v[2] = __builtin_shufflevector(t0, t2, 2, 3, 6, 7);
    v[3] = __builtin_shufflevector(t1, t3, 2, 3, 6, 7);
  }
}

}  // namespace simd
}  // namespace boxloss
