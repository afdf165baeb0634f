// CPU filter through the permutohedral lattice: splat, blur along the d+1
// axes, slice, all channels of a pixel together.
//
// Vertex values live in a (vertices + 1) x stride array, a vertex's channels
// contiguous (stride = the channels rounded up to whole 32-byte vectors), so
// every splat, blur and slice step is a short vector loop over channels; the
// extra last row is zero and stands in for absent neighbours.  The planar
// (C, H, W) tensors are turned to and from that pixel-major layout through
// tiles of kTile pixels, one group of 8 floats (4 doubles) of channels at a
// time, by in-register 8 x 8 (4 x 4) transposes.
//
// Measured at 513 x 513, 21 channels, one core (benchmarks/dense_crf.py):
// the splat's scatter and the slice's gather are bound by their loads and
// stores, the reading and writing of the planes by memory bandwidth.  Tiles
// of 512 pixels read and write each plane in 2 KB runs (64-pixel tiles were
// about 30% slower overall), and the grids are kept per thread between calls
// (GridScratch).
#include <algorithm>
#include <cstdlib>
#include <new>
#include <type_traits>
#include <vector>

#include "boxloss/common/cpu_clones.h"
#include "boxloss/common/vector_group.h"
#include "boxloss/permutohedral/cpu.h"

namespace boxloss {
namespace permutohedral {
namespace cpu {
namespace {

constexpr int64_t kTile = 512;  // pixels per tile: one image row of a 513 x 513 image, 2 KB of a float plane

using simd::kGroup;
using simd::load_group;
using simd::store_group;
using simd::transpose_group;
using simd::Vec;

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

// Memory for the two vertex grids of a filter, kept per thread between
// calls.  A 21-channel grid of a 513 x 513 image is about a megabyte; glibc
// hands blocks that size back to the system when they are freed, and the next
// call faulted them in again page by page, which was about a tenth of the
// filter's time.  Blocks up to kKeepBytes stay with the thread; a larger
// request, or one made while the thread's block is in use, gets its own
// block, freed on return.
class GridScratch {
 public:
  static constexpr size_t kKeepBytes = size_t{64} << 20;

  explicit GridScratch(size_t bytes) {
    Cache& cache = thread_cache();
    if (bytes <= kKeepBytes && !cache.in_use) {
      if (cache.capacity < bytes) {
        std::free(cache.data);
        cache.data = nullptr;
        cache.capacity = 0;
        cache.data = allocate(bytes);
        cache.capacity = bytes;
      }
      cache.in_use = true;
      data_ = cache.data;
      cached_ = true;
    } else {
      data_ = allocate(bytes);
    }
  }
  ~GridScratch() {
    if (cached_) {
      thread_cache().in_use = false;
    } else {
      std::free(data_);
    }
  }
  GridScratch(const GridScratch&) = delete;
  GridScratch& operator=(const GridScratch&) = delete;
  void* get() const { return data_; }

 private:
  struct Cache {
    void* data = nullptr;
    size_t capacity = 0;
    bool in_use = false;
    ~Cache() { std::free(data); }
  };
  static Cache& thread_cache() {
    static thread_local Cache cache;
    return cache;
  }
  static void* allocate(size_t bytes) {
    void* p = std::aligned_alloc(64, std::max<size_t>(64, (bytes + 63) / 64 * 64));
    if (p == nullptr) throw std::bad_alloc();
    return p;
  }

  void* data_ = nullptr;
  bool cached_ = false;
};

// Channels per vertex row: whole groups once there is a full group, else
// exactly the channels (a single-channel filter stays scalar instead of
// carrying 7 zero lanes); whole 64-byte blocks of two groups when the splat
// is to be split among threads by block.
template <typename scalar>
int64_t row_stride(int64_t channels, bool whole_blocks) {
  const int64_t g = whole_blocks ? 2 * kGroup<scalar> : kGroup<scalar>;
  return channels < kGroup<scalar> ? channels : (channels + g - 1) / g * g;
}

// The channel loops run over a width known at compile time for the common
// widths (kWidth > 0: fully unrolled vector code), at run time otherwise.
template <typename F>
void with_width(int64_t width, F&& f) {
  switch (width) {
    case 1: f(std::integral_constant<int64_t, 1>()); break;
    case 2: f(std::integral_constant<int64_t, 2>()); break;
    case 3: f(std::integral_constant<int64_t, 3>()); break;
    case 4: f(std::integral_constant<int64_t, 4>()); break;
    case 8: f(std::integral_constant<int64_t, 8>()); break;
    case 12: f(std::integral_constant<int64_t, 12>()); break;
    case 16: f(std::integral_constant<int64_t, 16>()); break;
    case 24: f(std::integral_constant<int64_t, 24>()); break;
    case 32: f(std::integral_constant<int64_t, 32>()); break;
    default: f(std::integral_constant<int64_t, 0>()); break;
  }
}

// Eight (four) planes of kTile values, each at its own address -> a tile of
// kTile rows of one group, g pixels at a time through transpose_group.
template <typename scalar>
BOXLOSS_ALWAYS_INLINE void planes_to_tile(const scalar* const* planes, scalar* __restrict tile) {
  constexpr int64_t g = kGroup<scalar>;
  for (int64_t t = 0; t < kTile; t += g) {
    Vec<scalar> v[g];
    for (int64_t j = 0; j < g; ++j) v[j] = load_group(planes[j] + t);
    transpose_group<scalar>(v);
    for (int64_t i = 0; i < g; ++i) store_group(tile + (t + i) * g, v[i]);
  }
}

// And back, times `scale`, into the first `count` planes (the others are
// padding channels, not written).
template <typename scalar>
BOXLOSS_ALWAYS_INLINE void tile_to_planes(const scalar* __restrict tile, scalar scale, scalar* const* planes,
                                          int64_t count) {
  constexpr int64_t g = kGroup<scalar>;
  for (int64_t t = 0; t < kTile; t += g) {
    Vec<scalar> v[g];
    for (int64_t i = 0; i < g; ++i) v[i] = load_group(tile + (t + i) * g);
    transpose_group<scalar>(v);
    for (int64_t j = 0; j < g; ++j) {
      if (j < count) store_group(planes[j] + t, scale * v[j]);
    }
  }
}

// Copies channel c of pixels [p0, p0 + n) into `row` (kTile long, zero
// beyond n): the value where the mask allows it, 0 elsewhere, the mask itself
// for the appended channel, 0 for padding channels.
template <typename scalar>
BOXLOSS_ALWAYS_INLINE void stage_channel(const FilterInput<scalar>& input, int64_t num_pixels, int64_t c, int64_t p0,
                                         int64_t n, scalar* __restrict row) {
  if (c < input.channels) {
    const scalar* __restrict src = input.values + c * num_pixels + p0;
    if (input.mask != nullptr) {
      const uint8_t* __restrict m = input.mask + p0;
      for (int64_t t = 0; t < n; ++t) row[t] = m[t] ? src[t] : scalar(0);
    } else {
      for (int64_t t = 0; t < n; ++t) row[t] = src[t];
    }
  } else if (c == input.channels && input.append_mask) {
    if (input.mask != nullptr) {
      const uint8_t* __restrict m = input.mask + p0;
      for (int64_t t = 0; t < n; ++t) row[t] = static_cast<scalar>(m[t]);
    } else {
      for (int64_t t = 0; t < n; ++t) row[t] = scalar(1);
    }
  } else {
    for (int64_t t = 0; t < n; ++t) row[t] = scalar(0);
  }
  for (int64_t t = n; t < kTile; ++t) row[t] = scalar(0);
}

// The address of channel c of a tile starting at pixel p0: the input plane
// itself for an unmasked value channel of a whole tile, else `row` filled by
// stage_channel.
template <typename scalar>
BOXLOSS_ALWAYS_INLINE const scalar* channel_source(const FilterInput<scalar>& input, int64_t num_pixels, int64_t c,
                                                   int64_t p0, int64_t n, scalar* row) {
  if (c < input.channels && input.mask == nullptr && n == kTile) return input.values + c * num_pixels + p0;
  stage_channel(input, num_pixels, c, p0, n, row);
  return row;
}

// 1 if one of kTile (or kGroup x kTile) staged values is NaN or Inf.
template <typename scalar>
BOXLOSS_ALWAYS_INLINE int32_t not_all_finite(const scalar* __restrict values, int64_t count = kTile) {
  int32_t bad = 0;
  for (int64_t t = 0; t < count; ++t) {
    const scalar d = values[t] - values[t];  // NaN for NaN and Inf, else 0
    bad |= static_cast<int32_t>(d != d);
  }
  return bad;
}

// A vertex number read from the lattice, or the spare zero row when it is out
// of range (a hand-made lattice); the kernels never index outside their arrays.
BOXLOSS_ALWAYS_INLINE int64_t checked_vertex(int32_t v, int64_t num_vertices, int32_t* bad) {
  const bool ok = v >= 0 && v < num_vertices;
  *bad |= ok ? 0 : 1;
  return ok ? v : num_vertices;
}

// A neighbour number: -1 (absent) and out-of-range numbers read the zero row.
BOXLOSS_ALWAYS_INLINE int64_t checked_neighbour(int32_t v, int64_t num_vertices, int32_t* bad) {
  *bad |= (v >= -1 && v < num_vertices) ? 0 : 1;
  return (v >= 0 && v < num_vertices) ? v : num_vertices;
}

// Whether all `count` vertex numbers are in [0, num_vertices): the pixel
// loops of a tile that passes read the lattice without a check per read.
BOXLOSS_ALWAYS_INLINE bool vertices_in_range(const int32_t* __restrict index, int64_t count, int64_t num_vertices) {
  const uint32_t limit = static_cast<uint32_t>(num_vertices);
  uint32_t bad = 0;
  for (int64_t i = 0; i < count; ++i) bad |= static_cast<uint32_t>(index[i]) >= limit ? 1u : 0u;
  return bad == 0;
}

template <bool kChecked>
BOXLOSS_ALWAYS_INLINE int64_t vertex_row(int32_t v, int64_t num_vertices, int32_t* bad) {
  if constexpr (kChecked) {
    return checked_vertex(v, num_vertices, bad);
  } else {
    return v;
  }
}

// The splat of the n pixels of a tile, channels [c_begin, c_begin + kWidth)
// (a fixed whole number of groups), read from `planes` (one kTile-long
// plane segment per channel): g pixels at a time are transposed in registers
// and added into their vertex rows straight away.  Returns 1 if a value read
// was NaN or Inf.
template <typename scalar, int64_t kWidth, bool kChecked>
BOXLOSS_ALWAYS_INLINE int32_t splat_tile_fixed(const int32_t* __restrict index, const scalar* __restrict weight,
                                               const scalar* const* planes, int64_t n, int64_t c_begin, int64_t stride,
                                               int64_t num_vertices, scalar* __restrict grid, int32_t* bad_index) {
  constexpr int64_t g = kGroup<scalar>;
  constexpr int64_t kGroups = kWidth / g;
  Vec<scalar> not_finite = {};  // stays 0 unless a value is NaN or Inf (x - x is then NaN)
  for (int64_t t0 = 0; t0 < n; t0 += g) {
    Vec<scalar> value[kGroups][g];  // value[q][i]: group q of pixel t0 + i
    for (int64_t q = 0; q < kGroups; ++q) {
      for (int64_t j = 0; j < g; ++j) value[q][j] = load_group(planes[q * g + j] + t0);
      transpose_group<scalar>(value[q]);
      for (int64_t i = 0; i < g; ++i) not_finite += value[q][i] - value[q][i];
    }
    const int64_t count = std::min(g, n - t0);
    for (int64_t i = 0; i < count; ++i) {
      const int32_t* idx = index + (t0 + i) * kVertices;
      const scalar* w = weight + (t0 + i) * kVertices;
#pragma GCC unroll 6
      for (int r = 0; r < kVertices; ++r) {
        scalar* __restrict row = grid + vertex_row<kChecked>(idx[r], num_vertices, bad_index) * stride + c_begin;
        const scalar wr = w[r];
        for (int64_t q = 0; q < kGroups; ++q) {
          store_group(row + q * g, load_group(row + q * g) + wr * value[q][i]);
        }
      }
    }
  }
  int32_t bad = 0;
  for (int64_t j = 0; j < g; ++j) bad |= not_finite[j] != not_finite[j] ? 1 : 0;
  return bad;
}

// The same for a width known at run time, from a staged tile (groups x kTile
// x g values).
template <typename scalar, bool kChecked>
BOXLOSS_ALWAYS_INLINE void splat_tile(const int32_t* __restrict index, const scalar* __restrict weight,
                                      const scalar* __restrict tile, int64_t n, int64_t groups, int64_t c_begin,
                                      int64_t stride, int64_t num_vertices, scalar* __restrict grid,
                                      int32_t* bad_index) {
  constexpr int64_t g = kGroup<scalar>;
  for (int64_t t = 0; t < n; ++t) {
    const int32_t* idx = index + t * kVertices;
    const scalar* w = weight + t * kVertices;
#pragma GCC unroll 6
    for (int r = 0; r < kVertices; ++r) {
      scalar* __restrict row = grid + vertex_row<kChecked>(idx[r], num_vertices, bad_index) * stride + c_begin;
      const scalar wr = w[r];
      for (int64_t q = 0; q < groups; ++q) {
        store_group(row + q * g, load_group(row + q * g) + wr * load_group(tile + (q * kTile + t) * g));
      }
    }
  }
}

// The slice of n pixels into a tile (groups x kTile x g), unscaled.
template <typename scalar, int64_t kWidth, bool kChecked>
BOXLOSS_ALWAYS_INLINE void slice_tile(const int32_t* __restrict index, const scalar* __restrict weight,
                                      const scalar* __restrict grid, int64_t n, int64_t groups, int64_t stride,
                                      int64_t num_vertices, scalar* __restrict tile) {
  constexpr int64_t g = kGroup<scalar>;
  int32_t unused = 0;  // the splat has reported out-of-range vertices
  for (int64_t t = 0; t < n; ++t) {
    const int32_t* idx = index + t * kVertices;
    const scalar* w = weight + t * kVertices;
    if constexpr (kWidth > 0) {
      constexpr int64_t kGroups = kWidth / g;
      Vec<scalar> acc[kGroups];
      const scalar* __restrict row0 = grid + vertex_row<kChecked>(idx[0], num_vertices, &unused) * stride;
      for (int64_t q = 0; q < kGroups; ++q) acc[q] = w[0] * load_group(row0 + q * g);
#pragma GCC unroll 5
      for (int r = 1; r < kVertices; ++r) {
        const scalar* __restrict row = grid + vertex_row<kChecked>(idx[r], num_vertices, &unused) * stride;
        const scalar wr = w[r];
        for (int64_t q = 0; q < kGroups; ++q) acc[q] += wr * load_group(row + q * g);
      }
      for (int64_t q = 0; q < kGroups; ++q) store_group(tile + (q * kTile + t) * g, acc[q]);
    } else {
      for (int64_t q = 0; q < groups; ++q) {
        Vec<scalar> acc =
            w[0] * load_group(grid + vertex_row<kChecked>(idx[0], num_vertices, &unused) * stride + q * g);
        for (int r = 1; r < kVertices; ++r) {
          acc += w[r] * load_group(grid + vertex_row<kChecked>(idx[r], num_vertices, &unused) * stride + q * g);
        }
        store_group(tile + (q * kTile + t) * g, acc);
      }
    }
  }
}

// Splats the channels [c_begin, c_begin + width) of every pixel, in pixel
// order (the sums are the same however the channels are split among
// threads).  width is a whole number of groups, or the whole (short) row.
// Returns FilterStatus bits: a value read was not finite; a vertex number was
// outside [0, num_vertices) (it was sent to the spare row instead).
template <typename scalar, int64_t kWidth>
BOXLOSS_CPU_CLONES int32_t splat_channels(const int32_t* __restrict index, const scalar* __restrict weight,
                                          const FilterInput<scalar>& input, int64_t num_pixels, int64_t c_begin,
                                          int64_t runtime_width, int64_t stride, int64_t num_vertices,
                                          scalar* __restrict grid) {
  const int64_t width = kWidth > 0 ? kWidth : runtime_width;
  constexpr int64_t g = kGroup<scalar>;
  int32_t bad_value = 0;
  int32_t bad_index = 0;
  if (width < g) {
    // A short row (fewer channels than a group): stage and splat pixel by pixel.
    AlignedBuffer<scalar> rows_buffer(width * kTile);
    scalar* __restrict rows = rows_buffer.get();
    for (int64_t p0 = 0; p0 < num_pixels; p0 += kTile) {
      const int64_t n = std::min(kTile, num_pixels - p0);
      for (int64_t j = 0; j < width; ++j) {
        stage_channel(input, num_pixels, c_begin + j, p0, n, rows + j * kTile);
        bad_value |= not_all_finite(rows + j * kTile);
      }
      for (int64_t t = 0; t < n; ++t) {
        const int32_t* idx = index + (p0 + t) * kVertices;
        const scalar* w = weight + (p0 + t) * kVertices;
#pragma GCC unroll 6
        for (int r = 0; r < kVertices; ++r) {
          const int64_t v = checked_vertex(idx[r], num_vertices, &bad_index);
          scalar* __restrict row = grid + v * stride + c_begin;
          for (int64_t j = 0; j < width; ++j) row[j] += w[r] * rows[j * kTile + t];
        }
      }
    }
    return (bad_value ? kValuesNotFinite : 0) | (bad_index ? kLatticeCorrupt : 0);
  }
  // A g-pixel block of the fused splat holds kWidth vectors; wider rows
  // spill them and are faster staged (32 floats: 9.5 against 7.9 ms at
  // 513 x 513 on one core, AVX2 and AVX-512 clones alike).
  constexpr int64_t kMaxFusedWidth = 24;
  if constexpr (kWidth > 0 && kWidth % g == 0 && kWidth <= kMaxFusedWidth) {
    // Fixed widths: every channel's plane segment (in place, or staged in
    // `rows`), transposed g pixels at a time inside the pixel loop.
    AlignedBuffer<scalar> rows_buffer(kWidth * kTile);
    scalar* __restrict rows = rows_buffer.get();
    for (int64_t p0 = 0; p0 < num_pixels; p0 += kTile) {
      const int64_t n = std::min(kTile, num_pixels - p0);
      const scalar* planes[kWidth];
      for (int64_t j = 0; j < kWidth; ++j) {
        planes[j] = channel_source(input, num_pixels, c_begin + j, p0, n, rows + j * kTile);
      }
      const int32_t* tile_index = index + p0 * kVertices;
      const scalar* tile_weight = weight + p0 * kVertices;
      if (vertices_in_range(tile_index, n * kVertices, num_vertices)) {
        bad_value |= splat_tile_fixed<scalar, kWidth, false>(tile_index, tile_weight, planes, n, c_begin, stride,
                                                             num_vertices, grid, &bad_index);
      } else {
        bad_value |= splat_tile_fixed<scalar, kWidth, true>(tile_index, tile_weight, planes, n, c_begin, stride,
                                                            num_vertices, grid, &bad_index);
      }
    }
  } else {
    // Other widths: each group of each tile staged (transposed) first.
    const int64_t groups = width / g;
    AlignedBuffer<scalar> rows_buffer(g * kTile);
    AlignedBuffer<scalar> tile_buffer(groups * kTile * g);
    scalar* __restrict rows = rows_buffer.get();
    scalar* __restrict tile = tile_buffer.get();  // (groups, kTile, g)
    for (int64_t p0 = 0; p0 < num_pixels; p0 += kTile) {
      const int64_t n = std::min(kTile, num_pixels - p0);
      for (int64_t q = 0; q < groups; ++q) {
        const scalar* planes[g];
        for (int64_t j = 0; j < g; ++j) {
          planes[j] = channel_source(input, num_pixels, c_begin + q * g + j, p0, n, rows + j * kTile);
        }
        planes_to_tile(planes, tile + q * kTile * g);
        bad_value |= not_all_finite(tile + q * kTile * g, kTile * g);
      }
      const int32_t* tile_index = index + p0 * kVertices;
      const scalar* tile_weight = weight + p0 * kVertices;
      if (vertices_in_range(tile_index, n * kVertices, num_vertices)) {
        splat_tile<scalar, false>(tile_index, tile_weight, tile, n, groups, c_begin, stride, num_vertices, grid,
                                  &bad_index);
      } else {
        splat_tile<scalar, true>(tile_index, tile_weight, tile, n, groups, c_begin, stride, num_vertices, grid,
                                 &bad_index);
      }
    }
  }
  return (bad_value ? kValuesNotFinite : 0) | (bad_index ? kLatticeCorrupt : 0);
}

// One blur pass along one axis for vertices [v_begin, v_end):
// dst[v] = src[v] + (src[down] + src[up]) / 2, row `num_vertices` being zero.
// Returns 1 if a neighbour number was outside [-1, num_vertices).
template <typename scalar, int64_t kWidth>
BOXLOSS_CPU_CLONES int32_t blur_vertices(const int32_t* __restrict neighbours, const scalar* __restrict src,
                                         scalar* __restrict dst, int64_t num_vertices, int64_t v_begin, int64_t v_end,
                                         int64_t runtime_stride) {
  const int64_t stride = kWidth > 0 ? kWidth : runtime_stride;
  const scalar half = scalar(0.5);
  int32_t bad = 0;
  for (int64_t v = v_begin; v < v_end; ++v) {
    const scalar* __restrict a = src + v * stride;
    const scalar* __restrict n1 = src + checked_neighbour(neighbours[2 * v], num_vertices, &bad) * stride;
    const scalar* __restrict n2 = src + checked_neighbour(neighbours[2 * v + 1], num_vertices, &bad) * stride;
    scalar* __restrict o = dst + v * stride;
    if constexpr (kWidth > 0 && kWidth % kGroup<scalar> == 0) {
      constexpr int64_t g = kGroup<scalar>;
      for (int64_t q = 0; q < kWidth / g; ++q) {
        store_group(o + q * g, load_group(a + q * g) + half * (load_group(n1 + q * g) + load_group(n2 + q * g)));
      }
    } else {
#pragma GCC ivdep
      for (int64_t k = 0; k < stride; ++k) o[k] = a[k] + half * (n1[k] + n2[k]);
    }
  }
  return bad;
}

// Slices pixels [p_begin, p_end) back out of the lattice, times alpha, into
// the planar output.  Vertex numbers out of range read the zero row (the
// splat has reported them).
template <typename scalar, int64_t kWidth>
BOXLOSS_CPU_CLONES void slice_pixels(const int32_t* __restrict index, const scalar* __restrict weight,
                                     const scalar* __restrict grid, int64_t runtime_stride, int64_t channels,
                                     int64_t num_pixels, int64_t num_vertices, int64_t p_begin, int64_t p_end,
                                     scalar* __restrict out) {
  const int64_t stride = kWidth > 0 ? kWidth : runtime_stride;
  constexpr int64_t g = kGroup<scalar>;
  const scalar scale = alpha<scalar>();
  int32_t unused = 0;
  if (stride < g) {
    for (int64_t p = p_begin; p < p_end; ++p) {
      const int32_t* idx = index + p * kVertices;
      const scalar* w = weight + p * kVertices;
      int64_t rows[kVertices];
      for (int r = 0; r < kVertices; ++r) rows[r] = checked_vertex(idx[r], num_vertices, &unused) * stride;
      for (int64_t c = 0; c < stride; ++c) {
        scalar acc = scalar(0);
#pragma GCC unroll 6
        for (int r = 0; r < kVertices; ++r) acc += w[r] * grid[rows[r] + c];
        if (c < channels) out[c * num_pixels + p] = scale * acc;
      }
    }
    return;
  }
  const int64_t groups = stride / g;
  AlignedBuffer<scalar> tile_buffer(groups * kTile * g);
  AlignedBuffer<scalar> rows_buffer(g * kTile);
  scalar* __restrict tile = tile_buffer.get();  // (groups, kTile, g)
  scalar* __restrict rows = rows_buffer.get();
  constexpr int64_t kFixed = kWidth > 0 && kWidth % g == 0 ? kWidth : 0;
  for (int64_t p0 = p_begin; p0 < p_end; p0 += kTile) {
    const int64_t n = std::min(kTile, p_end - p0);
    const int32_t* tile_index = index + p0 * kVertices;
    const scalar* tile_weight = weight + p0 * kVertices;
    if (vertices_in_range(tile_index, n * kVertices, num_vertices)) {
      slice_tile<scalar, kFixed, false>(tile_index, tile_weight, grid, n, groups, stride, num_vertices, tile);
    } else {
      slice_tile<scalar, kFixed, true>(tile_index, tile_weight, grid, n, groups, stride, num_vertices, tile);
    }
    for (int64_t q = 0; q < groups; ++q) {
      for (int64_t t = n; t < kTile; ++t) {
        for (int64_t j = 0; j < g; ++j) tile[(q * kTile + t) * g + j] = scalar(0);
      }
      // Whole tiles go straight to the output planes of the group's real
      // channels; the last, partial tile through `rows`, then copied out.
      const bool direct = n == kTile;
      const int64_t count = std::min(g, channels - q * g);
      scalar* planes[g];
      for (int64_t j = 0; j < g; ++j) planes[j] = direct ? out + (q * g + j) * num_pixels + p0 : rows + j * kTile;
      tile_to_planes(tile + q * kTile * g, scale, planes, direct ? count : g);
      if (!direct) {
        for (int64_t j = 0; j < count; ++j) {
          std::copy(rows + j * kTile, rows + j * kTile + n, out + (q * g + j) * num_pixels + p0);
        }
      }
    }
  }
}

}  // namespace

void run_serially(int64_t n, int64_t /*grain*/, const RangeFn& fn) {
  if (n > 0) fn(0, n);
}

template <typename scalar>
int32_t filter_image(const Lattice<scalar>& lattice, int64_t b, const FilterInput<scalar>& input, bool reverse,
                     scalar* out, const RangeRunner& runner) {
  const int64_t num_pixels = lattice.num_pixels;
  const int64_t num_vertices = lattice.vertices_of(b);
  const int64_t channels = input.filtered_channels();
  if (num_pixels == 0 || channels == 0) return 0;
  // The splat is split among threads by blocks of two channel groups (64
  // bytes: one cache line of each 64-byte aligned vertex row; threads sharing
  // a line would thrash it) when the runner has several workers, there are
  // two blocks or more and the image is big enough to pay for a parallel
  // region.  Its rows are then whole blocks (21 floats: 32 instead of 24).
  constexpr int64_t block_width = 2 * kGroup<scalar>;
  const bool split = runner.workers > 1 && channels > block_width && num_pixels * channels >= (int64_t{1} << 18);
  const int64_t stride = row_stride<scalar>(channels, split);
  const int64_t grid_size = (num_vertices + 1) * stride;
  // Two grids, each a whole number of 64-byte lines.
  const int64_t grid_span = (grid_size * static_cast<int64_t>(sizeof(scalar)) + 63) / 64 * 64 / sizeof(scalar);
  GridScratch grids(2 * static_cast<size_t>(grid_span) * sizeof(scalar));
  scalar* src = static_cast<scalar*>(grids.get());
  scalar* dst = src + grid_span;
  std::fill(src, src + grid_size, scalar(0));
  std::fill(dst + num_vertices * stride, dst + grid_size, scalar(0));
  const int32_t* index = lattice.index_of(b);
  const scalar* weight = lattice.weight_of(b);

  // Splat: one task over the whole row, or one per block.
  const int64_t block = split ? block_width : stride;
  const int64_t blocks = stride / block;
  std::vector<int32_t> block_status(static_cast<size_t>(blocks), 0);
  runner(blocks, 1, [&](int64_t begin, int64_t end) {
    const int64_t c_begin = begin * block;
    const int64_t width = std::min(end * block, stride) - c_begin;
    with_width(width, [&](auto fixed) {
      block_status[static_cast<size_t>(begin)] =
          splat_channels<scalar, fixed()>(index, weight, input, num_pixels, c_begin, width, stride, num_vertices, src);
    });
  });
  int32_t status = 0;
  for (int32_t s : block_status) status |= s;

  // Blur along each axis (the reverse order is the transpose).  Each pass
  // is a parallel region only when it is big enough to pay for the barrier
  // (a few hundred thousand values); typical lattices have far fewer points
  // than pixels and blur serially.
  const int64_t vertex_grain = std::max<int64_t>(1, (int64_t{1} << 19) / std::max<int64_t>(1, stride));
  const int64_t vertex_chunks = (num_vertices + vertex_grain - 1) / vertex_grain;
  std::vector<int32_t> chunk_status(static_cast<size_t>(vertex_chunks), 0);
  for (int step = 0; step < kVertices; ++step) {
    const int axis = reverse ? kDim - step : step;
    const int32_t* neighbours = lattice.neighbours_of(b, axis, 0);
    runner(vertex_chunks, 1, [&](int64_t begin, int64_t end) {
      with_width(stride, [&](auto fixed) {
        chunk_status[static_cast<size_t>(begin)] |=
            blur_vertices<scalar, fixed()>(neighbours, src, dst, num_vertices, begin * vertex_grain,
                                           std::min(end * vertex_grain, num_vertices), stride);
      });
    });
    std::swap(src, dst);
  }
  for (int32_t s : chunk_status) status |= s ? kLatticeCorrupt : 0;

  // Slice, parallel over whole tiles of pixels.
  const int64_t tiles = (num_pixels + kTile - 1) / kTile;
  const int64_t tile_grain = std::max<int64_t>(1, (int64_t{1} << 18) / (kTile * std::max<int64_t>(1, stride)));
  runner(tiles, tile_grain, [&](int64_t begin, int64_t end) {
    with_width(stride, [&](auto fixed) {
      slice_pixels<scalar, fixed()>(index, weight, src, stride, channels, num_pixels, num_vertices, begin * kTile,
                                    std::min(end * kTile, num_pixels), out);
    });
  });
  return status;
}

template int32_t filter_image<float>(const Lattice<float>&, int64_t, const FilterInput<float>&, bool, float*,
                                     const RangeRunner&);
template int32_t filter_image<double>(const Lattice<double>&, int64_t, const FilterInput<double>&, bool, double*,
                                      const RangeRunner&);

}  // namespace cpu
}  // namespace permutohedral
}  // namespace boxloss
