// CPU build of the permutohedral lattice: one pass over the pixels locates
// each one's simplex (math.h) and numbers the simplex vertices through an
// open-addressing hash table; a second pass looks up every vertex's
// neighbours along the d+1 axes once, so that the filter's blurs are plain
// gathers (lattice_filter_cpu.cpp).
//
// No fused multiply-adds in this file: the build must round exactly as the
// reference (and as every target_clones variant) does, or a point near a
// simplex boundary could land in another simplex on another CPU.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <algorithm>
#include <vector>

#include "boxloss/common/cpu_clones.h"
#include "boxloss/permutohedral/cpu.h"

namespace boxloss {
namespace permutohedral {
namespace cpu {
namespace {

// Vertex numbers by key; vertices are numbered 0, 1, ... in insertion order.
// Sized from the pixel count: natural images at the DenseCRF sigmas have
// 0.03-0.5 lattice points per pixel, so the table starts at N/16 slots (kept
// at most half full by doubling), small enough to stay in cache where a
// table of N slots would miss on every probe.
class VertexTable {
 public:
  explicit VertexTable(int64_t num_pixels) {
    int64_t capacity = 1024;
    while (capacity < num_pixels / 16) capacity <<= 1;
    slots_.assign(static_cast<size_t>(capacity), Slot{0u, -1});
    mask_ = static_cast<uint64_t>(capacity - 1);
    keys_.reserve(static_cast<size_t>(capacity / 2) * kDim);
    hashes_.reserve(static_cast<size_t>(capacity / 2));
  }

  BOXLOSS_ALWAYS_INLINE int32_t find_or_insert(const int32_t* key) {
    const uint32_t h = hash_key(key);
    for (uint64_t s = h & mask_;; s = (s + 1) & mask_) {
      Slot& slot = slots_[s];
      if (slot.id < 0) {
        const int32_t id = static_cast<int32_t>(hashes_.size());
        slot = Slot{h, id};
        keys_.insert(keys_.end(), key, key + kDim);
        hashes_.push_back(h);
        if (2 * hashes_.size() > slots_.size()) grow();
        return id;
      }
      if (slot.hash == h && keys_equal(&keys_[static_cast<size_t>(slot.id) * kDim], key)) return slot.id;
    }
  }

  BOXLOSS_ALWAYS_INLINE int32_t find(const int32_t* key) const {
    const uint32_t h = hash_key(key);
    for (uint64_t s = h & mask_;; s = (s + 1) & mask_) {
      const Slot& slot = slots_[s];
      if (slot.id < 0) return -1;
      if (slot.hash == h && keys_equal(&keys_[static_cast<size_t>(slot.id) * kDim], key)) return slot.id;
    }
  }

  // Brings the first slot `key` probes into the cache.
  BOXLOSS_ALWAYS_INLINE void prefetch(const int32_t* key) const { __builtin_prefetch(&slots_[hash_key(key) & mask_]); }

  BOXLOSS_ALWAYS_INLINE int64_t size() const { return static_cast<int64_t>(hashes_.size()); }
  BOXLOSS_ALWAYS_INLINE const int32_t* key(int64_t id) const { return &keys_[static_cast<size_t>(id) * kDim]; }

 private:
  struct Slot {
    uint32_t hash;
    int32_t id;
  };

  __attribute__((noinline)) void grow() {
    std::vector<Slot> bigger(slots_.size() * 2, Slot{0u, -1});
    const uint64_t mask = bigger.size() - 1;
    for (size_t id = 0; id < hashes_.size(); ++id) {
      uint64_t s = hashes_[id] & mask;
      while (bigger[s].id >= 0) s = (s + 1) & mask;
      bigger[s] = Slot{hashes_[id], static_cast<int32_t>(id)};
    }
    slots_.swap(bigger);
    mask_ = mask;
  }

  std::vector<Slot> slots_;
  std::vector<int32_t> keys_;     // (size, d)
  std::vector<uint32_t> hashes_;  // (size,)
  uint64_t mask_ = 0;
};

// Locates every pixel's simplex and numbers its vertices; returns the status bits.
template <typename scalar>
BOXLOSS_CPU_CLONES int32_t splat_pixels(const scalar* __restrict image, int64_t height, int64_t width, double sigma_xy,
                                        double sigma_rgb, VertexTable* table, int32_t* __restrict splat_index,
                                        scalar* __restrict splat_weight) {
  const int64_t num_pixels = height * width;
  const scalar inv_xy = static_cast<scalar>(1.0 / sigma_xy);
  const scalar inv_rgb = static_cast<scalar>(1.0 / sigma_rgb);
  const scalar* red = image;
  const scalar* green = image + num_pixels;
  const scalar* blue = image + 2 * num_pixels;
  int32_t status = 0;
  // Neighbouring pixels usually share most simplex vertices: a vertex whose
  // key equals the previous pixel's vertex of the same remainder reuses its
  // number without a hash lookup.
  int32_t previous_keys[kVertices][kDim] = {};
  int32_t previous_index[kVertices] = {};
  bool have_previous = false;
  for (int64_t y = 0; y < height; ++y) {
    for (int64_t x = 0; x < width; ++x) {
      const int64_t p = y * width + x;
      const scalar feature[kDim] = {static_cast<scalar>(x) * inv_xy, static_cast<scalar>(y) * inv_xy, red[p] * inv_rgb,
                                    green[p] * inv_rgb, blue[p] * inv_rgb};
      int32_t* index = splat_index + p * kVertices;
      scalar* weight = splat_weight + p * kVertices;
      Simplex<scalar> simplex;
      locate(feature, &simplex);
      if (!simplex.ok) {
        const bool finite = math::is_finite(red[p]) && math::is_finite(green[p]) && math::is_finite(blue[p]);
        status |= finite ? kFeaturesTooLarge : kImageNotFinite;
        for (int r = 0; r < kVertices; ++r) {
          index[r] = 0;
          weight[r] = scalar(0);
        }
        continue;
      }
      for (int r = 0; r < kVertices; ++r) {
        if (!(have_previous && keys_equal(simplex.keys[r], previous_keys[r]))) {
          previous_index[r] = table->find_or_insert(simplex.keys[r]);
          for (int i = 0; i < kDim; ++i) previous_keys[r][i] = simplex.keys[r][i];
        }
        index[r] = previous_index[r];
        weight[r] = simplex.weights[r];
      }
      have_previous = true;
    }
  }
  return status;
}

// The neighbours of every vertex one step down and up each axis (-1 where absent).
BOXLOSS_CPU_CLONES void find_neighbours(const VertexTable& table, int32_t* __restrict out) {
  const int64_t num_vertices = table.size();
  // u is v's neighbour down an axis exactly when v is u's neighbour up it, so
  // one lookup per vertex and axis fills both sides.  The table's slots are
  // fetched a few vertices ahead (a lattice of ~N points is tens of megabytes).
  constexpr int64_t kAhead = 8;
  int32_t neighbour[kDim];
  for (int axis = 0; axis < kVertices; ++axis) {
    int32_t* row = out + static_cast<int64_t>(axis) * num_vertices * 2;
    for (int64_t v = 0; v < num_vertices; ++v) row[2 * v + 1] = -1;
    for (int64_t v = 0; v < num_vertices; ++v) {
      if (v + kAhead < num_vertices) {
        neighbour_key(table.key(v + kAhead), axis, 0, neighbour);
        table.prefetch(neighbour);
      }
      neighbour_key(table.key(v), axis, 0, neighbour);
      const int32_t down = table.find(neighbour);
      row[2 * v] = down;
      if (down >= 0) row[2 * static_cast<int64_t>(down) + 1] = static_cast<int32_t>(v);
    }
  }
}

}  // namespace

template <typename scalar>
void build_lattice(const scalar* image, int64_t height, int64_t width, double sigma_xy, double sigma_rgb,
                   int32_t* splat_index, scalar* splat_weight, ImageLattice* out) {
  VertexTable table(height * width);
  out->status = splat_pixels<scalar>(image, height, width, sigma_xy, sigma_rgb, &table, splat_index, splat_weight);
  out->num_vertices = table.size();
  out->neighbours.resize(static_cast<size_t>(kVertices * table.size() * 2));
  find_neighbours(table, out->neighbours.data());
}

template void build_lattice<float>(const float*, int64_t, int64_t, double, double, int32_t*, float*, ImageLattice*);
template void build_lattice<double>(const double*, int64_t, int64_t, double, double, int32_t*, double*, ImageLattice*);

}  // namespace cpu
}  // namespace permutohedral
}  // namespace boxloss
