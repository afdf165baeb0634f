// CPU filter through the permutohedral lattice: splat, blur along the d+1
// axes, slice, all channels of a pixel together.
//
// Vertex values live in a (vertices + 1) x stride array, a vertex's channels
// contiguous (stride = the channels rounded up to whole 32-byte vectors), so
// every splat, blur and slice step is a short vector loop over channels; the
// extra last row is zero and stands in for absent neighbours.  The planar
// (C, H, W) tensors are turned to and from that pixel-major layout through
// tiles of 64 pixels, one group of 8 floats (4 doubles) of channels at a
// time: a fixed-size transpose the compiler turns into vector shuffles.
#include <algorithm>
#include <cstdlib>
#include <new>
#include <type_traits>
#include <vector>

#include "boxloss/common/cpu_clones.h"
#include "boxloss/permutohedral/cpu.h"

namespace boxloss {
namespace permutohedral {
namespace cpu {
namespace {

constexpr int64_t kTile = 64;  // pixels per tile

// Channels per group: one 32-byte vector.
template <typename scalar>
constexpr int64_t kGroup = 32 / sizeof(scalar);

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

// Channels per vertex row: whole groups once there is a full group, else
// exactly the channels (a single-channel filter stays scalar instead of
// carrying 7 zero lanes).
template <typename scalar>
int64_t row_stride(int64_t channels) {
  constexpr int64_t g = kGroup<scalar>;
  return channels < g ? channels : (channels + g - 1) / g * g;
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
// kTile rows of one group, and back with a scale: fixed-size transposes the
// compiler turns into vector shuffles.
template <typename scalar>
BOXLOSS_ALWAYS_INLINE void planes_to_tile(const scalar* const* planes, scalar* __restrict tile) {
  constexpr int64_t g = kGroup<scalar>;
  const scalar* p[g];
  for (int64_t j = 0; j < g; ++j) p[j] = planes[j];
  for (int64_t t = 0; t < kTile; ++t) {
    for (int64_t j = 0; j < g; ++j) tile[t * g + j] = p[j][t];
  }
}

template <typename scalar>
BOXLOSS_ALWAYS_INLINE void tile_to_planes(const scalar* __restrict tile, scalar scale, scalar* const* planes) {
  constexpr int64_t g = kGroup<scalar>;
  scalar* p[g];
  for (int64_t j = 0; j < g; ++j) p[j] = planes[j];
  for (int64_t t = 0; t < kTile; ++t) {
    for (int64_t j = 0; j < g; ++j) p[j][t] = scale * tile[t * g + j];
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
  const int64_t groups = width / g;
  AlignedBuffer<scalar> rows_buffer(g * kTile);
  AlignedBuffer<scalar> tile_buffer(groups * kTile * g);
  scalar* __restrict rows = rows_buffer.get();
  scalar* __restrict tile = tile_buffer.get();  // (groups, kTile, g)
  constexpr int64_t kMax = kWidth > 0 ? kWidth : 1;
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
    for (int64_t t = 0; t < n; ++t) {
      const int32_t* idx = index + (p0 + t) * kVertices;
      const scalar* w = weight + (p0 + t) * kVertices;
      if constexpr (kWidth > 0 && kWidth % g == 0) {
        scalar value[kMax];
        for (int64_t q = 0; q < kMax / g; ++q) {
          for (int64_t j = 0; j < g; ++j) value[q * g + j] = tile[(q * kTile + t) * g + j];
        }
#pragma GCC unroll 6
        for (int r = 0; r < kVertices; ++r) {
          const int64_t v = checked_vertex(idx[r], num_vertices, &bad_index);
          scalar* __restrict row = grid + v * stride + c_begin;
          const scalar wr = w[r];
          for (int64_t k = 0; k < kMax; ++k) row[k] += wr * value[k];
        }
      } else {
#pragma GCC unroll 6
        for (int r = 0; r < kVertices; ++r) {
          const int64_t v = checked_vertex(idx[r], num_vertices, &bad_index);
          scalar* __restrict row = grid + v * stride + c_begin;
          const scalar wr = w[r];
          for (int64_t q = 0; q < groups; ++q) {
            for (int64_t j = 0; j < g; ++j) row[q * g + j] += wr * tile[(q * kTile + t) * g + j];
          }
        }
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
                                         scalar* __restrict dst, int64_t num_vertices, int64_t v_begin,
                                         int64_t v_end, int64_t runtime_stride) {
  const int64_t stride = kWidth > 0 ? kWidth : runtime_stride;
  const scalar half = scalar(0.5);
  int32_t bad = 0;
  for (int64_t v = v_begin; v < v_end; ++v) {
    const scalar* __restrict a = src + v * stride;
    const scalar* __restrict n1 = src + checked_neighbour(neighbours[2 * v], num_vertices, &bad) * stride;
    const scalar* __restrict n2 = src + checked_neighbour(neighbours[2 * v + 1], num_vertices, &bad) * stride;
    scalar* __restrict o = dst + v * stride;
#pragma GCC ivdep
    for (int64_t k = 0; k < stride; ++k) o[k] = a[k] + half * (n1[k] + n2[k]);
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
  constexpr int64_t kMax = kWidth > 0 ? kWidth : 1;
  for (int64_t p0 = p_begin; p0 < p_end; p0 += kTile) {
    const int64_t n = std::min(kTile, p_end - p0);
    for (int64_t t = 0; t < n; ++t) {
      const int32_t* idx = index + (p0 + t) * kVertices;
      const scalar* w = weight + (p0 + t) * kVertices;
      if constexpr (kWidth > 0 && kWidth % g == 0) {
        scalar acc[kMax];
        const scalar* __restrict row0 = grid + checked_vertex(idx[0], num_vertices, &unused) * stride;
        for (int64_t k = 0; k < kMax; ++k) acc[k] = w[0] * row0[k];
#pragma GCC unroll 5
        for (int r = 1; r < kVertices; ++r) {
          const scalar* __restrict row = grid + checked_vertex(idx[r], num_vertices, &unused) * stride;
          const scalar wr = w[r];
          for (int64_t k = 0; k < kMax; ++k) acc[k] += wr * row[k];
        }
        for (int64_t q = 0; q < kMax / g; ++q) {
          for (int64_t j = 0; j < g; ++j) tile[(q * kTile + t) * g + j] = acc[q * g + j];
        }
      } else {
        for (int64_t q = 0; q < groups; ++q) {
          for (int64_t j = 0; j < g; ++j) {
            scalar a = scalar(0);
            for (int r = 0; r < kVertices; ++r) {
              a += w[r] * grid[checked_vertex(idx[r], num_vertices, &unused) * stride + q * g + j];
            }
            tile[(q * kTile + t) * g + j] = a;
          }
        }
      }
    }
    for (int64_t q = 0; q < groups; ++q) {
      for (int64_t t = n; t < kTile; ++t) {
        for (int64_t j = 0; j < g; ++j) tile[(q * kTile + t) * g + j] = scalar(0);
      }
      // Whole tiles of real channels go straight to the output planes;
      // otherwise through `rows`, then the part that exists is copied out.
      const bool direct = n == kTile && (q + 1) * g <= channels;
      scalar* planes[g];
      for (int64_t j = 0; j < g; ++j) planes[j] = direct ? out + (q * g + j) * num_pixels + p0 : rows + j * kTile;
      tile_to_planes(tile + q * kTile * g, scale, planes);
      if (!direct) {
        for (int64_t j = 0; j < g && q * g + j < channels; ++j) {
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

  // Splat, parallel over blocks of two channel groups (64 bytes, one cache
  // line of each 64-byte aligned vertex row) when the rows are whole cache
  // lines: threads sharing a line would thrash it.  Small images: one task.
  const int64_t block = stride < kGroup<scalar> ? stride : 2 * kGroup<scalar>;
  const int64_t blocks = (stride + block - 1) / block;
  std::vector<int32_t> block_status(static_cast<size_t>(blocks), 0);
  const bool split = stride % block == 0 && (stride * static_cast<int64_t>(sizeof(scalar))) % 64 == 0 &&
                     num_pixels * stride >= (int64_t{1} << 18);
  const int64_t block_grain = split ? 1 : blocks;
  runner(blocks, block_grain, [&](int64_t begin, int64_t end) {
    const int64_t c_begin = begin * block;
    const int64_t width = std::min(end * block, stride) - c_begin;
    with_width(width, [&](auto fixed) {
      block_status[static_cast<size_t>(begin)] = splat_channels<scalar, fixed()>(
          index, weight, input, num_pixels, c_begin, width, stride, num_vertices, src);
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
        chunk_status[static_cast<size_t>(begin)] |= blur_vertices<scalar, fixed()>(
            neighbours, src, dst, num_vertices, begin * vertex_grain, std::min(end * vertex_grain, num_vertices),
            stride);
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
