// CPU build of the 2-d permutohedral lattice of a pixel grid's positions
// (x / sigma_xy, y / sigma_xy): the smoothness kernel of DenseCRF inference.
// The per-point math is permutohedral/math.h's locate<.., 2>; vertices are
// numbered by first use in pixel order through an open-addressing hash table
// on the two stored key coordinates, as the 5-d build numbers its own.
//
// No fused multiply-adds in this file: the build rounds exactly as the
// reference does (see lattice_build_cpu.cpp).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <algorithm>
#include <vector>

#include "boxloss/crf_inference/cpu.h"
#include "boxloss/permutohedral/math.h"

namespace boxloss {
namespace crf_inference {
namespace cpu {
namespace {

constexpr int kD = kSmoothnessSimplex - 1;

uint64_t pack_key(const int32_t* key) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(key[0])) << 32) | static_cast<uint32_t>(key[1]);
}

uint64_t hash_packed(uint64_t k) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdULL;
  k ^= k >> 33;
  return k;
}

// Vertex numbers by packed key, numbered 0, 1, ... in insertion order; at most half full.
class KeyTable {
 public:
  explicit KeyTable(int64_t expected) {
    uint64_t capacity = 1024;
    while (capacity < static_cast<uint64_t>(2 * expected)) capacity <<= 1;
    slots_.assign(capacity, -1);
    mask_ = capacity - 1;
  }

  int32_t find_or_insert(uint64_t key) {
    for (uint64_t s = hash_packed(key) & mask_;; s = (s + 1) & mask_) {
      if (slots_[s] < 0) {
        const int32_t id = static_cast<int32_t>(keys_.size());
        slots_[s] = id;
        keys_.push_back(key);
        if (2 * keys_.size() > slots_.size()) grow();
        return id;
      }
      if (keys_[static_cast<size_t>(slots_[s])] == key) return slots_[s];
    }
  }

  int32_t find(uint64_t key) const {
    for (uint64_t s = hash_packed(key) & mask_;; s = (s + 1) & mask_) {
      if (slots_[s] < 0) return -1;
      if (keys_[static_cast<size_t>(slots_[s])] == key) return slots_[s];
    }
  }

  int64_t size() const { return static_cast<int64_t>(keys_.size()); }
  uint64_t key(int64_t id) const { return keys_[static_cast<size_t>(id)]; }

 private:
  void grow() {
    std::vector<int32_t> bigger(slots_.size() * 2, -1);
    const uint64_t mask = bigger.size() - 1;
    for (size_t id = 0; id < keys_.size(); ++id) {
      uint64_t s = hash_packed(keys_[id]) & mask;
      while (bigger[s] >= 0) s = (s + 1) & mask;
      bigger[s] = static_cast<int32_t>(id);
    }
    slots_.swap(bigger);
    mask_ = mask;
  }

  std::vector<int32_t> slots_;
  std::vector<uint64_t> keys_;
  uint64_t mask_ = 0;
};

}  // namespace

template <typename scalar>
int32_t build_spatial_lattice(int64_t height, int64_t width, double sigma_xy, int32_t* splat_index,
                              scalar* splat_weight, std::vector<int32_t>* neighbours, int64_t* num_vertices) {
  const int64_t num_pixels = height * width;
  const scalar inv_xy = static_cast<scalar>(1.0 / sigma_xy);
  // The lattice has about 3.2 / sigma_xy^2 points per pixel (0.13 at sigma_xy = 3).
  KeyTable table(std::min<int64_t>(num_pixels * kSmoothnessSimplex, num_pixels / 4 + 1024));
  uint64_t previous_keys[kSmoothnessSimplex] = {};
  int32_t previous_index[kSmoothnessSimplex] = {};
  bool have_previous = false;
  for (int64_t y = 0; y < height; ++y) {
    for (int64_t x = 0; x < width; ++x) {
      const int64_t p = y * width + x;
      const scalar feature[kD] = {static_cast<scalar>(x) * inv_xy, static_cast<scalar>(y) * inv_xy};
      permutohedral::Simplex<scalar, kD> simplex;
      permutohedral::locate(feature, &simplex);
      if (!simplex.ok) {
        *num_vertices = 0;
        neighbours->clear();
        return permutohedral::kFeaturesTooLarge;
      }
      for (int r = 0; r < kSmoothnessSimplex; ++r) {
        const uint64_t key = pack_key(simplex.keys[r]);
        if (!(have_previous && key == previous_keys[r])) {
          previous_index[r] = table.find_or_insert(key);
          previous_keys[r] = key;
        }
        splat_index[p * kSmoothnessSimplex + r] = previous_index[r];
        splat_weight[p * kSmoothnessSimplex + r] = simplex.weights[r];
      }
      have_previous = true;
    }
  }
  const int64_t count = table.size();
  *num_vertices = count;
  neighbours->assign(static_cast<size_t>(kSmoothnessSimplex * count * 2), -1);
  for (int axis = 0; axis < kSmoothnessSimplex; ++axis) {
    for (int64_t v = 0; v < count; ++v) {
      const uint64_t packed = table.key(v);
      const int32_t key[kD] = {static_cast<int32_t>(static_cast<uint32_t>(packed >> 32)),
                               static_cast<int32_t>(static_cast<uint32_t>(packed))};
      for (int side = 0; side < 2; ++side) {
        int32_t other[kD];
        permutohedral::neighbour_key<kD>(key, axis, side, other);
        (*neighbours)[static_cast<size_t>((axis * count + v) * 2 + side)] = table.find(pack_key(other));
      }
    }
  }
  return 0;
}

template int32_t build_spatial_lattice<float>(int64_t, int64_t, double, int32_t*, float*, std::vector<int32_t>*,
                                              int64_t*);
template int32_t build_spatial_lattice<double>(int64_t, int64_t, double, int32_t*, double*, std::vector<int32_t>*,
                                               int64_t*);

}  // namespace cpu
}  // namespace crf_inference
}  // namespace boxloss
