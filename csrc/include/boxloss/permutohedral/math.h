// Per-point math of the permutohedral lattice (Adams, Baek & Davis, 2010),
// shared by the CPU and CUDA kernels.  Torch-free: tests/cpp builds it alone.
//
// The conventions are those of Krähenbühl's permutohedral.cpp, which the
// DenseCRF loss of Tang et al. uses: the same feature scaling, rounding,
// ranking, barycentric weights, [1/2, 1, 1/2] blur and final scale alpha, so a
// filter through this lattice equals the original's up to float rounding.
// boxloss/reference/bilateral.py restates every step in PyTorch.
#pragma once

#include "boxloss/common/host_device.h"

// The per-point functions run inside the CPU kernels' target_clones loops,
// which only get the AVX2/AVX-512 code of what is inlined into them.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define BOXLOSS_HD_FORCE_INLINE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define BOXLOSS_HD_FORCE_INLINE inline __attribute__((always_inline))
#else
#define BOXLOSS_HD_FORCE_INLINE inline
#endif

namespace boxloss {
namespace permutohedral {

// Feature dimension: x / sigma_xy, y / sigma_xy, r, g, b / sigma_rgb.
constexpr int kDim = 5;
// Vertices of a simplex (and lattice axes): d + 1.
constexpr int kVertices = kDim + 1;

// Elevated coordinates beyond this magnitude would leave float's exact
// integers (2^24) once rounded to a multiple of d + 1; such features (a tiny
// sigma for the image's range) are reported instead of silently mis-filtered.
constexpr double kMaxElevated = 4194304.0;  // 2^22

// Bits of the per-image status the lattice build reports.
enum LatticeStatus : int32_t {
  kImageNotFinite = 1,    // NaN or Inf in the image
  kFeaturesTooLarge = 2,  // |elevated feature| > kMaxElevated: sigma too small for the coordinates
};

// Bits of the status a filter reports.
enum FilterStatus : int32_t {
  kValuesNotFinite = 8,  // NaN or Inf in a value the filter read
  kLatticeCorrupt = 16,  // a vertex or neighbour number outside the image's range
};

// 1 / (1 + 2^-d): with it a point on a lattice vertex keeps weight 1 for
// itself through the [1/2, 1, 1/2] blurs (whose centre path along all d + 1
// axes, plus the two paths around the whole cycle, sum to 1 + 2^-d).
// The lattice math is written for any feature dimension D (default: the
// bilateral filter's d = 5); DenseCRF inference uses D = 2 for its spatial kernel.
template <typename acc, int D = kDim>
BOXLOSS_HD_INLINE acc alpha() {
  return static_cast<acc>(1.0 / (1.0 + 1.0 / static_cast<double>(1 << D)));
}

// Diagonal of the elevation matrix (p. 5 of Adams et al.) times the expected
// standard deviation sqrt(2/3) (d + 1) (p. 6): the blur then approximates a
// Gaussian of standard deviation 1 in feature space.
template <int D = kDim>
BOXLOSS_HD_INLINE double scale_factor(int i) {
  return sqrt(2.0 / 3.0) * static_cast<double>(D + 1) / sqrt(static_cast<double>((i + 1) * (i + 2)));
}

// The lattice vertices of one point's enclosing simplex and its barycentric
// weights.  keys[r] is the vertex of remainder r (its first d coordinates; the
// last is minus their sum), weights[r] its weight; the weights sum to 1.
// `ok` is false when an elevated coordinate is NaN, Inf or beyond kMaxElevated
// (the keys and weights are then zeros).
template <typename acc, int D = kDim>
struct Simplex {
  int32_t keys[D + 1][D];
  acc weights[D + 1];
  bool ok;
};

// The steps and their order follow permutohedral.cpp (and the reference),
// so that float64 results agree with the reference to the last bits.
template <typename acc, int D>
BOXLOSS_HD_FORCE_INLINE void locate(const acc feature[D], Simplex<acc, D>* out) {
  constexpr int kSimplex = D + 1;  // vertices of a simplex, and lattice axes
  acc elevated[kSimplex];
  // Elevate onto the hyperplane sum = 0 of R^(d+1).
  acc running = acc(0);
  for (int j = D; j > 0; --j) {
    const acc cf = feature[j - 1] * static_cast<acc>(scale_factor<D>(j - 1));
    elevated[j] = running - static_cast<acc>(j) * cf;
    running = running + cf;
  }
  elevated[0] = running;

  bool ok = true;
  for (int i = 0; i < kSimplex; ++i) ok = ok && (elevated[i] <= kMaxElevated && elevated[i] >= -kMaxElevated);
  out->ok = ok;
  if (!ok) {
    for (int r = 0; r < kSimplex; ++r) {
      out->weights[r] = acc(0);
      for (int i = 0; i < D; ++i) out->keys[r][i] = 0;
    }
    return;
  }

  // Closest remainder-0 point: every coordinate to the nearest multiple of d+1, ties down.
  const acc down_factor = static_cast<acc>(1.0 / kSimplex);
  const acc up_factor = static_cast<acc>(kSimplex);
  int32_t rem0[kSimplex];
  int32_t sum = 0;  // sum of rem0 / (d+1)
  for (int i = 0; i < kSimplex; ++i) {
    const acc v = down_factor * elevated[i];
    const acc ceil_v = ceil(v);
    const acc floor_v = floor(v);
    const acc quotient = ceil_v * up_factor - elevated[i] < elevated[i] - floor_v * up_factor ? ceil_v : floor_v;
    rem0[i] = static_cast<int32_t>(quotient) * kSimplex;
    sum += static_cast<int32_t>(quotient);
  }

  // Rank of each coordinate of elevated - rem0 in decreasing order (ties to
  // the later index), counted without branches: the comparisons are data-random.
  acc residual[kSimplex];
  int32_t rank[kSimplex];
  for (int i = 0; i < kSimplex; ++i) {
    residual[i] = elevated[i] - static_cast<acc>(rem0[i]);
    rank[i] = 0;
  }
  for (int i = 0; i < D; ++i) {
    for (int j = i + 1; j < kSimplex; ++j) {
      const int32_t smaller = residual[i] < residual[j] ? 1 : 0;
      rank[i] += smaller;
      rank[j] += 1 - smaller;
    }
  }

  // A point off the remainder-0 sublattice's plane (sum != 0) is brought back.
  for (int i = 0; i < kSimplex; ++i) {
    rank[i] += sum;
    if (rank[i] < 0) {
      rank[i] += kSimplex;
      rem0[i] += kSimplex;
    } else if (rank[i] > D) {
      rank[i] -= kSimplex;
      rem0[i] -= kSimplex;
    }
    // Unreachable for the finite, bounded coordinates checked above; keeps every
    // index below in range whatever the rounding did.
    rank[i] = rank[i] < 0 ? 0 : (rank[i] > D ? D : rank[i]);
  }

  // Barycentric coordinates (p. 10).
  acc barycentric[kSimplex + 1];
  for (int i = 0; i <= kSimplex; ++i) barycentric[i] = acc(0);
  for (int i = 0; i < kSimplex; ++i) {
    const acc v = (elevated[i] - static_cast<acc>(rem0[i])) * down_factor;
    barycentric[D - rank[i]] += v;
    barycentric[D - rank[i] + 1] -= v;
  }
  barycentric[0] += acc(1) + barycentric[kSimplex];

  // Vertex r of the simplex: rem0 plus the canonical simplex's vertex r,
  // whose coordinate k is r for k <= d - r and r - (d+1) beyond.
  for (int r = 0; r < kSimplex; ++r) {
    out->weights[r] = barycentric[r];
    for (int i = 0; i < D; ++i) {
      out->keys[r][i] = rem0[i] + (rank[i] <= D - r ? r : r - kSimplex);
    }
  }
}

// Hash of a vertex key (its d stored coordinates): independent products
// (no chain of multiplies), then a final mix.
BOXLOSS_HD_FORCE_INLINE uint32_t hash_key(const int32_t* key) {
  const uint32_t primes[kDim] = {2654435761u, 2246822519u, 3266489917u, 668265263u, 374761393u};
  uint32_t h = 0;
  for (int i = 0; i < kDim; ++i) h += static_cast<uint32_t>(key[i]) * primes[i];
  h ^= h >> 15;
  h *= 2246822519u;
  h ^= h >> 13;
  return h;
}

// Key of the neighbour of `key` one step along lattice axis `axis` (0..d):
// side 0 adds e_axis, side 1 subtracts it, e_axis = (d+1) unit_axis - (1, ..., 1).
// For axis d the unit coordinate is the implicit last one.
template <int D = kDim>
BOXLOSS_HD_FORCE_INLINE void neighbour_key(const int32_t* key, int axis, int side, int32_t* out) {
  const int32_t step = side == 0 ? -1 : 1;
  for (int i = 0; i < D; ++i) out[i] = key[i] + step;
  if (axis < D) out[axis] = key[axis] - step * D;
}

BOXLOSS_HD_FORCE_INLINE bool keys_equal(const int32_t* a, const int32_t* b) {
  bool equal = true;
  for (int i = 0; i < kDim; ++i) equal = equal && a[i] == b[i];
  return equal;
}

// A lower bound of the lattice's own-pixel weight L_ii (see
// boxloss/reference/bilateral.py, self_affinity_lower_bound): staying put
// through every blur gives G(v, v) >= 1, and cyclically adjacent vertices of a
// simplex are one lattice step apart, so G >= 1/2 between them; paths through
// points outside the lattice's occupied region may be missing.
//   c_i = alpha (sum_a w_a^2 + sum_a w_a w_{(a+1) mod (d+1)})
template <typename acc>
BOXLOSS_HD_FORCE_INLINE acc self_affinity_lower_bound(const acc* weights) {
  acc squares = acc(0);
  acc adjacent = acc(0);
  for (int a = 0; a < kVertices; ++a) {
    squares += weights[a] * weights[a];
    adjacent += weights[a] * weights[(a + 1) % kVertices];
  }
  return alpha<acc>() * (squares + adjacent);
}

}  // namespace permutohedral
}  // namespace boxloss
