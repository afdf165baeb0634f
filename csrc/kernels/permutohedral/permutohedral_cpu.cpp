// CPU core of the permutohedral lattice.
//
// Build: one pass over the pixels locates each one's simplex (math.h) and
// numbers the simplex vertices through an open-addressing hash table sized
// from the pixel count; a second pass looks up every vertex's neighbours
// along the d+1 axes once, so the blurs are plain gathers.
//
// Filter: all channels of a pixel move together.  Vertex values live in a
// (vertices + 1) x stride array, channels contiguous (stride = channels rounded
// up to whole vectors), so each splat, blur and slice step is one vector loop
// over channels; the extra last row is zero and stands in for absent
// neighbours.  Pixels are staged through small tiles that transpose the
// planar (C, H, W) tensors to and from that layout.
#include "boxloss/permutohedral/cpu.h"

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <new>

#include "boxloss/common/cpu_clones.h"

namespace boxloss {
namespace permutohedral {
namespace cpu {
namespace {

constexpr int64_t kTile = 64;  // pixels staged per tile

// 64-byte aligned, uninitialised storage.
template <typename T>
class AlignedBuffer {
 public:
  explicit AlignedBuffer(int64_t n) {
    const size_t bytes = ((static_cast<size_t>(n) * sizeof(T) + 63) / 64) * 64;
    data_ = static_cast<T*>(std::aligned_alloc(64, bytes > 0 ? bytes : 64));
    if (data_ == nullptr) throw std::bad_alloc();
  }
  ~AlignedBuffer() { std::free(data_); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  T* get() const { return data_; }

 private:
  T* data_ = nullptr;
};

// Vertex numbers by key; vertices are numbered 0, 1, ... in insertion order.
class VertexTable {
 public:
  explicit VertexTable(int64_t num_pixels) {
    int64_t capacity = 256;
    while (capacity < num_pixels) capacity <<= 1;
    slots_.assign(static_cast<size_t>(capacity), Slot{0u, -1});
    mask_ = static_cast<uint64_t>(capacity - 1);
    keys_.reserve(static_cast<size_t>(std::min<int64_t>(capacity / 2, 1 << 20)) * kDim);
  }

  int32_t find_or_insert(const int32_t* key) {
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

  int32_t find(const int32_t* key) const {
    const uint32_t h = hash_key(key);
    for (uint64_t s = h & mask_;; s = (s + 1) & mask_) {
      const Slot& slot = slots_[s];
      if (slot.id < 0) return -1;
      if (slot.hash == h && keys_equal(&keys_[static_cast<size_t>(slot.id) * kDim], key)) return slot.id;
    }
  }

  int64_t size() const { return static_cast<int64_t>(hashes_.size()); }
  const int32_t* key(int64_t id) const { return &keys_[static_cast<size_t>(id) * kDim]; }

 private:
  struct Slot {
    uint32_t hash;
    int32_t id;
  };

  void grow() {
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
  std::vector<int32_t> keys_;    // (size, d)
  std::vector<uint32_t> hashes_;  // (size,)
  uint64_t mask_ = 0;
};

template <typename scalar>
BOXLOSS_ALWAYS_INLINE bool is_finite(scalar v) {
  return (v - v) == scalar(0);
}

// Channels per row of the vertex array: whole 32-byte vectors once there are
// enough channels to fill one, else exactly the channels (a single-channel
// filter stays scalar instead of carrying 7 zero lanes).
template <typename scalar>
int64_t row_stride(int64_t channels) {
  constexpr int64_t lanes = 32 / sizeof(scalar);
  return channels < lanes ? channels : (channels + lanes - 1) / lanes * lanes;
}

// Splats channels [c_begin, c_end) of every pixel (in pixel order, so the sums
// are the same however the channels are split among threads).  Returns false
// if a value read was not finite.
template <typename scalar>
BOXLOSS_CPU_CLONES bool splat_channels(const int32_t* __restrict index, const scalar* __restrict weight,
                                       const FilterInput<scalar>& input, int64_t num_pixels, int64_t c_begin,
                                       int64_t c_end, int64_t stride, scalar* __restrict grid) {
  const int64_t width = c_end - c_begin;
  const int64_t channels = input.filtered_channels();
  AlignedBuffer<scalar> tile_buffer(kTile * width);
  scalar* __restrict tile = tile_buffer.get();
  std::fill(tile, tile + kTile * width, scalar(0));  // padding channels stay 0
  int32_t bad = 0;
  for (int64_t p0 = 0; p0 < num_pixels; p0 += kTile) {
    const int64_t n = std::min(kTile, num_pixels - p0);
    for (int64_t c = c_begin; c < std::min(c_end, channels); ++c) {
      scalar* __restrict column = tile + (c - c_begin);
      if (c < input.channels) {
        const scalar* __restrict src = input.values + c * num_pixels + p0;
        if (input.mask != nullptr) {
          const uint8_t* __restrict m = input.mask + p0;
          for (int64_t t = 0; t < n; ++t) {
            const scalar v = m[t] ? src[t] : scalar(0);
            bad |= static_cast<int32_t>(!is_finite(v));
            column[t * width] = v;
          }
        } else {
          for (int64_t t = 0; t < n; ++t) {
            bad |= static_cast<int32_t>(!is_finite(src[t]));
            column[t * width] = src[t];
          }
        }
      } else if (input.mask != nullptr) {  // the appended mask channel
        const uint8_t* __restrict m = input.mask + p0;
        for (int64_t t = 0; t < n; ++t) column[t * width] = static_cast<scalar>(m[t]);
      } else {  // the appended mask of an all-valid image
        for (int64_t t = 0; t < n; ++t) column[t * width] = scalar(1);
      }
    }
    for (int64_t t = 0; t < n; ++t) {
      const int32_t* idx = index + (p0 + t) * kVertices;
      const scalar* w = weight + (p0 + t) * kVertices;
      const scalar* __restrict value = tile + t * width;
      for (int r = 0; r < kVertices; ++r) {
        scalar* __restrict row = grid + static_cast<int64_t>(idx[r]) * stride + c_begin;
        const scalar wr = w[r];
#pragma GCC ivdep
        for (int64_t k = 0; k < width; ++k) row[k] += wr * value[k];
      }
    }
  }
  return bad == 0;
}

// One blur pass along one axis for vertices [v_begin, v_end):
// dst[v] = src[v] + (src[down] + src[up]) / 2, row `num_vertices` being zero.
template <typename scalar>
BOXLOSS_CPU_CLONES void blur_vertices(const int32_t* __restrict neighbours, const scalar* __restrict src,
                                      scalar* __restrict dst, int64_t num_vertices, int64_t v_begin,
                                      int64_t v_end, int64_t stride) {
  const scalar half = scalar(0.5);
  for (int64_t v = v_begin; v < v_end; ++v) {
    const int32_t down = neighbours[2 * v];
    const int32_t up = neighbours[2 * v + 1];
    const scalar* __restrict a = src + v * stride;
    const scalar* __restrict n1 = src + (down < 0 ? num_vertices : static_cast<int64_t>(down)) * stride;
    const scalar* __restrict n2 = src + (up < 0 ? num_vertices : static_cast<int64_t>(up)) * stride;
    scalar* __restrict o = dst + v * stride;
#pragma GCC ivdep
    for (int64_t k = 0; k < stride; ++k) o[k] = a[k] + half * (n1[k] + n2[k]);
  }
}

// Slices pixels [p_begin, p_end) back out of the lattice, times alpha, into
// the planar output.
template <typename scalar>
BOXLOSS_CPU_CLONES void slice_pixels(const int32_t* __restrict index, const scalar* __restrict weight,
                                     const scalar* __restrict grid, int64_t stride, int64_t channels,
                                     int64_t num_pixels, int64_t p_begin, int64_t p_end, scalar* __restrict out) {
  AlignedBuffer<scalar> tile_buffer(kTile * stride);
  scalar* __restrict tile = tile_buffer.get();
  const scalar scale = alpha<scalar>();
  for (int64_t p0 = p_begin; p0 < p_end; p0 += kTile) {
    const int64_t n = std::min(kTile, p_end - p0);
    for (int64_t t = 0; t < n; ++t) {
      const int32_t* idx = index + (p0 + t) * kVertices;
      const scalar* w = weight + (p0 + t) * kVertices;
      scalar* __restrict acc = tile + t * stride;
      const scalar* __restrict row0 = grid + static_cast<int64_t>(idx[0]) * stride;
      const scalar w0 = w[0];
#pragma GCC ivdep
      for (int64_t k = 0; k < stride; ++k) acc[k] = w0 * row0[k];
      for (int r = 1; r < kVertices; ++r) {
        const scalar* __restrict row = grid + static_cast<int64_t>(idx[r]) * stride;
        const scalar wr = w[r];
#pragma GCC ivdep
        for (int64_t k = 0; k < stride; ++k) acc[k] += wr * row[k];
      }
    }
    for (int64_t c = 0; c < channels; ++c) {
      const scalar* __restrict column = tile + c;
      scalar* __restrict dst = out + c * num_pixels + p0;
      for (int64_t t = 0; t < n; ++t) dst[t] = scale * column[t * stride];
    }
  }
}

}  // namespace

void run_serially(int64_t n, int64_t /*grain*/, const RangeFn& fn) {
  if (n > 0) fn(0, n);
}

template <typename scalar>
void build_lattice(const scalar* image, int64_t height, int64_t width, double sigma_xy, double sigma_rgb,
                   int32_t* splat_index, scalar* splat_weight, ImageLattice* out) {
  const int64_t num_pixels = height * width;
  const scalar inv_xy = static_cast<scalar>(1.0 / sigma_xy);
  const scalar inv_rgb = static_cast<scalar>(1.0 / sigma_rgb);
  const scalar* red = image;
  const scalar* green = image + num_pixels;
  const scalar* blue = image + 2 * num_pixels;
  VertexTable table(num_pixels);
  int32_t status = 0;
  // Neighbouring pixels usually share most simplex vertices: a vertex whose
  // key equals the previous pixel's vertex of the same remainder reuses its number.
  int32_t previous_keys[kVertices][kDim];
  int32_t previous_index[kVertices];
  bool have_previous = false;
  for (int64_t y = 0; y < height; ++y) {
    for (int64_t x = 0; x < width; ++x) {
      const int64_t p = y * width + x;
      const scalar feature[kDim] = {static_cast<scalar>(x) * inv_xy, static_cast<scalar>(y) * inv_xy,
                                    red[p] * inv_rgb, green[p] * inv_rgb, blue[p] * inv_rgb};
      int32_t* index = splat_index + p * kVertices;
      scalar* weight = splat_weight + p * kVertices;
      Simplex<scalar> simplex;
      locate(feature, &simplex);
      if (!simplex.ok) {
        const bool finite = is_finite(red[p]) && is_finite(green[p]) && is_finite(blue[p]);
        status |= finite ? kFeaturesTooLarge : kImageNotFinite;
        for (int r = 0; r < kVertices; ++r) {
          index[r] = 0;
          weight[r] = scalar(0);
        }
        continue;
      }
      for (int r = 0; r < kVertices; ++r) {
        int32_t id;
        if (have_previous && keys_equal(simplex.keys[r], previous_keys[r])) {
          id = previous_index[r];
        } else {
          id = table.find_or_insert(simplex.keys[r]);
          for (int i = 0; i < kDim; ++i) previous_keys[r][i] = simplex.keys[r][i];
          previous_index[r] = id;
        }
        index[r] = id;
        weight[r] = simplex.weights[r];
      }
      have_previous = true;
    }
  }

  const int64_t num_vertices = table.size();
  out->num_vertices = num_vertices;
  out->status = status;
  out->neighbours.resize(static_cast<size_t>(kVertices * num_vertices * 2));
  int32_t neighbour[kDim];
  for (int axis = 0; axis < kVertices; ++axis) {
    int32_t* row = out->neighbours.data() + static_cast<int64_t>(axis) * num_vertices * 2;
    for (int64_t v = 0; v < num_vertices; ++v) {
      for (int side = 0; side < 2; ++side) {
        neighbour_key(table.key(v), axis, side, neighbour);
        row[2 * v + side] = table.find(neighbour);
      }
    }
  }
}

template <typename scalar>
bool filter_image(const Lattice<scalar>& lattice, int64_t b, const FilterInput<scalar>& input, bool reverse,
                  scalar* out, const RangeRunner& runner) {
  const int64_t num_pixels = lattice.num_pixels;
  const int64_t num_vertices = lattice.vertices_of(b);
  const int64_t channels = input.filtered_channels();
  if (num_pixels == 0 || channels == 0) return true;
  const int64_t stride = row_stride<scalar>(channels);
  const int64_t grid_size = (num_vertices + 1) * stride;
  AlignedBuffer<scalar> grid_a(grid_size);
  AlignedBuffer<scalar> grid_b(grid_size);
  scalar* src = grid_a.get();
  scalar* dst = grid_b.get();
  std::fill(src, src + grid_size, scalar(0));
  std::fill(dst + num_vertices * stride, dst + grid_size, scalar(0));
  const int32_t* index = lattice.index_of(b);
  const scalar* weight = lattice.weight_of(b);

  // Splat, parallel over blocks of channels (64 bytes each).
  constexpr int64_t block = 64 / sizeof(scalar);
  const int64_t blocks = (stride + block - 1) / block;
  std::vector<char> block_finite(static_cast<size_t>(blocks), 1);
  runner(blocks, 1, [&](int64_t begin, int64_t end) {
    const int64_t c_begin = begin * block;
    const int64_t c_end = std::min(end * block, stride);
    block_finite[static_cast<size_t>(begin)] =
        splat_channels<scalar>(index, weight, input, num_pixels, c_begin, c_end, stride, src) ? 1 : 0;
  });
  bool finite = true;
  for (char f : block_finite) finite = finite && f != 0;

  // Blur along each axis.
  const int64_t vertex_grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, stride));
  for (int step = 0; step < kVertices; ++step) {
    const int axis = reverse ? kDim - step : step;
    const int32_t* neighbours = lattice.neighbours_of(b, axis, 0);
    runner(num_vertices, vertex_grain, [&](int64_t begin, int64_t end) {
      blur_vertices<scalar>(neighbours, src, dst, num_vertices, begin, end, stride);
    });
    std::swap(src, dst);
  }

  // Slice, parallel over pixels.
  const int64_t pixel_grain = std::max<int64_t>(kTile, (int64_t{1} << 14) / std::max<int64_t>(1, stride));
  runner(num_pixels, pixel_grain, [&](int64_t begin, int64_t end) {
    slice_pixels<scalar>(index, weight, src, stride, channels, num_pixels, begin, end, out);
  });
  return finite;
}

template void build_lattice<float>(const float*, int64_t, int64_t, double, double, int32_t*, float*,
                                   ImageLattice*);
template void build_lattice<double>(const double*, int64_t, int64_t, double, double, int32_t*, double*,
                                    ImageLattice*);
template bool filter_image<float>(const Lattice<float>&, int64_t, const FilterInput<float>&, bool, float*,
                                  const RangeRunner&);
template bool filter_image<double>(const Lattice<double>&, int64_t, const FilterInput<double>&, bool, double*,
                                   const RangeRunner&);

}  // namespace cpu
}  // namespace permutohedral
}  // namespace boxloss
