// CPU mean-field loop of DenseCRF inference (math.h), one image at a time.
//
// Everything stays pixel-major between the steps: each pixel's classes are one
// row of `stride` values (the classes, then zeros up to a whole number of 16-
// or 32-byte groups), and each lattice vertex's values are one row of the same
// stride.  A step is then
//
//   blur:  each kernel's grid along its d+1 axes, in place (row = row + (down + up) / 2, old values);
//   pixel: logits = sum_k sum_r slice_k[i, r] grid_k[v_kr] - U_i   (the slice of both kernels)
//          Q_i = softmax(logits)         (math.h softmax_pixels, over blocks of 16 pixels)
//   splat: grid'_k[v_kr] += splat_k[i, r] Q_i                        (into each kernel's other grid)
//
// with splat_k[i, r] = n_i w_ir (n_i: the normaliser, 0 at invalid pixels)
// and slice_k[i, r] = (w_k alpha n_i) w_ir.  The softmax runs channel-major,
// one vector lane per pixel, on blocks of 16 rows transposed in registers,
// where the unaries are read from their planes; the result goes back to
// planes once, after the last step.
//
// One thread: the pixel pass and the splat run tile by tile, a tile's rows
// staying in cache.  Several threads on one image (from
// MeanFieldImage::parallel_pixels pixels): the pixel pass runs over tiles in
// parallel into rows of the whole image, then the splat is split by 64-byte
// blocks of channels (rows padded to whole blocks, as in the lattice filter),
// each thread adding every pixel in order into its own columns, and the blurs
// split by ranges of whole chains.  Every sum is taken in the same order
// either way, so the results are the same bit for bit.
//
// The appearance lattice at BANA's sigmas (55, 3) has about one point per
// pixel, so its grids are tens of megabytes read at random: the loop is bound
// by memory traffic, mostly the six blur passes.  Hence the in-place blur
// (blur_chains), the splat that writes instead of zeroing first
// (splat_kernel_pixel), huge pages and prefetches.  Measured in a C++
// harness on one core of a shared 2-core Xeon, the six blur passes of that
// lattice (21 classes, 513 x 513): 40 ms from one grid into another, 19-25 ms
// in place (prefetching 16 vertices ahead 19 ms, 8 ahead 20 ms), and 28 ms in
// place with unpadded rows of 21 floats (rows split across cache lines).
//
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "boxloss/common/cpu_clones.h"
#include "boxloss/common/vector_group.h"
#include "boxloss/crf_inference/cpu.h"

namespace boxloss {
namespace crf_inference {
namespace cpu {
namespace {

constexpr int64_t kTile = 256;  // pixels per tile of the pixel pass: 24 KB of 24-float rows

// Values per 64-byte block: the unit of the channel split among threads.
template <typename scalar>
constexpr int64_t kBlock = 64 / sizeof(scalar);

// The vertex rows a loop will read a few iterations ahead are fetched early:
// the rows of a lattice with ~1 point per pixel (the appearance kernel at
// BANA's sigma_rgb = 3) are scattered over tens of megabytes, and the loops
// are otherwise bound by the latency of those misses.
constexpr int64_t kPrefetchAhead = 8;       // pixels: each prefetches its 6 appearance rows
constexpr int64_t kBlurPrefetchAhead = 16;  // vertices of the blur (one row each)

template <typename scalar>
BOXLOSS_ALWAYS_INLINE void prefetch_row(const scalar* row, int64_t values, bool for_write) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = values * static_cast<int64_t>(sizeof(scalar));
  // Every 64-byte line of [p, p + bytes): one per 64 bytes, and the last byte's.
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(p + offset, for_write ? 1 : 0, 3);
  __builtin_prefetch(p + bytes - 1, for_write ? 1 : 0, 3);
}

// 64-byte aligned, uninitialised (or zeroed) storage.  Blocks of 2 MiB and
// more are aligned to 2 MiB and offered to the kernel for transparent huge
// pages: the grids are read at random, and with 4 KiB pages nearly every
// vertex row of a 30 MB grid would also miss the TLB (and fault its page in
// on first touch).
template <typename T>
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(int64_t n, bool zero = false) {
    constexpr size_t kHugePage = size_t{2} << 20;
    size_t bytes = std::max<size_t>(64, (static_cast<size_t>(n) * sizeof(T) + 63) / 64 * 64);
    const bool huge = bytes >= kHugePage;
    if (huge) bytes = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    data_ = static_cast<T*>(std::aligned_alloc(huge ? kHugePage : 64, bytes));
    if (data_ == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (huge) madvise(data_, bytes, MADV_HUGEPAGE);  // advice only: a refusal changes nothing
#endif
    if (zero) std::memset(data_, 0, bytes);
  }
  ~AlignedBuffer() { std::free(data_); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  AlignedBuffer(AlignedBuffer&& other) noexcept : data_(other.data_) { other.data_ = nullptr; }
  AlignedBuffer& operator=(AlignedBuffer&& other) noexcept {
    std::swap(data_, other.data_);
    return *this;
  }
  T* get() const { return data_; }

 private:
  T* data_ = nullptr;
};

// One kernel as the loop reads it: the lattice, the per-pixel normalisers
// and the two vertex grids ((V + 1) rows each; row V is zero and stands in
// for absent neighbours).  `splatted` is the grid the splat of the current Q
// goes into, `result` the blurred grid the pixel pass slices.
template <typename scalar>
struct Kernel {
  bool active = false;
  int simplex = 0;
  const int32_t* index = nullptr;
  const int32_t* neighbours = nullptr;
  int64_t axis_stride = 0;
  int64_t num_vertices = 0;
  const scalar* weight = nullptr;  // (N, simplex): the lattice's barycentric weights
  AlignedBuffer<scalar> norm;      // (N): n_i m_i, the normaliser (0 at invalid pixels)
  scalar scale = scalar(0);        // w_k alpha
  AlignedBuffer<int32_t> order;    // (simplex, V): each axis's vertices in chain order
  bool first_use = false;          // vertices numbered by first use in pixel order
  AlignedBuffer<scalar> grid_a, grid_b;
  scalar* splatted = nullptr;
  scalar* result = nullptr;

  scalar* other(const scalar* grid) const { return grid == grid_a.get() ? grid_b.get() : grid_a.get(); }
};

// What the pixel pass and the splat read of kernel k: pixel p's vertex r is
// index[p * kSimplex + r] in `grid`, with weight (scale * norm[p]) *
// weight[p * kSimplex + r] in the slice and weight[p * kSimplex + r] * norm[p]
// in the splat: a normaliser per pixel rather than (N, simplex) tables of
// folded weights, since the loop is bound by memory traffic and two such
// tables per kernel would add tens of megabytes at 513 x 513.
template <typename scalar, int kSimplex>
struct KernelView {
  bool active;
  const int32_t* __restrict index;
  const scalar* __restrict weight;
  const scalar* __restrict norm;
  scalar scale;  // the slice's w_k alpha; 1 for the splat
  scalar* grid;
};

template <typename scalar, int kSimplex>
KernelView<scalar, kSimplex> slice_view(const Kernel<scalar>& k) {
  return {k.active, k.index, k.weight, k.norm.get(), k.scale, k.result};
}

template <typename scalar, int kSimplex>
KernelView<scalar, kSimplex> splat_view(const Kernel<scalar>& k) {
  return {k.active, k.index, k.weight, k.norm.get(), scalar(1), k.splatted};
}

// The row strides compiled as fixed-size loops.
template <typename scalar, typename F>
void with_row_width(int64_t stride, F&& f) {
  using std::integral_constant;
  if constexpr (sizeof(scalar) == 4) {
    switch (stride) {
      case 4: return f(integral_constant<int64_t, 4>());
      case 8: return f(integral_constant<int64_t, 8>());
      case 16: return f(integral_constant<int64_t, 16>());
      case 24: return f(integral_constant<int64_t, 24>());
      case 32: return f(integral_constant<int64_t, 32>());
      default: return f(integral_constant<int64_t, 0>());
    }
  } else {
    switch (stride) {
      case 4: return f(integral_constant<int64_t, 4>());
      case 8: return f(integral_constant<int64_t, 8>());
      case 24: return f(integral_constant<int64_t, 24>());
      default: return f(integral_constant<int64_t, 0>());
    }
  }
}

// UnaryStatus bits of the unaries (channels, num_pixels) of pixels [p0, p1).
template <typename scalar>
BOXLOSS_CPU_CLONES int32_t unary_status(const scalar* __restrict unary, int64_t channels, int64_t num_pixels,
                                        int64_t p0, int64_t p1) {
  int32_t status = 0;
  uint8_t all_infinite[256];
  for (int64_t t0 = p0; t0 < p1; t0 += 256) {
    const int64_t n = std::min<int64_t>(256, p1 - t0);
    for (int64_t t = 0; t < n; ++t) all_infinite[t] = 1;
    for (int64_t c = 0; c < channels; ++c) {
      const scalar* __restrict plane = unary + c * num_pixels + t0;
      for (int64_t t = 0; t < n; ++t) {
        status |= unary_value_status(plane[t]);
        all_infinite[t] &= is_positive_infinity(plane[t]) ? 1 : 0;
      }
    }
    for (int64_t t = 0; t < n; ++t) status |= all_infinite[t] ? kUnaryAllInfinite : 0;
  }
  return status;
}

// Pixels per block of the softmax: one vector lane per pixel.
constexpr int kSoftmaxPixels = 16;

using simd::kGroup;
using simd::load_group;
using simd::store_group;
using simd::transpose_group;
using simd::Vec;

// kSoftmaxPixels rows of `stride` values -> block[c * kSoftmaxPixels + t]
// for every c < stride (rows of whole groups: g x g register transposes).
template <typename scalar, int64_t kWidth>
BOXLOSS_ALWAYS_INLINE void rows_to_block(const scalar* __restrict rows, int64_t runtime_stride,
                                         scalar* __restrict block) {
  const int64_t stride = kWidth > 0 ? kWidth : runtime_stride;
  constexpr int64_t g = kGroup<scalar>;
  if (stride % g != 0) {
    for (int64_t c = 0; c < stride; ++c) {
      for (int t = 0; t < kSoftmaxPixels; ++t) block[c * kSoftmaxPixels + t] = rows[t * stride + c];
    }
    return;
  }
  for (int64_t t0 = 0; t0 < kSoftmaxPixels; t0 += g) {
    for (int64_t q = 0; q < stride; q += g) {
      Vec<scalar> v[g];
      for (int64_t j = 0; j < g; ++j) v[j] = load_group(rows + (t0 + j) * stride + q);
      transpose_group<scalar>(v);
      for (int64_t i = 0; i < g; ++i) store_group(block + (q + i) * kSoftmaxPixels + t0, v[i]);
    }
  }
}

// The inverse, into the first n rows.
template <typename scalar, int64_t kWidth>
BOXLOSS_ALWAYS_INLINE void block_to_rows(const scalar* __restrict block, int64_t runtime_stride, int64_t n,
                                         scalar* __restrict rows) {
  const int64_t stride = kWidth > 0 ? kWidth : runtime_stride;
  constexpr int64_t g = kGroup<scalar>;
  if (stride % g != 0) {
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t c = 0; c < stride; ++c) rows[t * stride + c] = block[c * kSoftmaxPixels + t];
    }
    return;
  }
  for (int64_t t0 = 0; t0 < kSoftmaxPixels; t0 += g) {
    for (int64_t q = 0; q < stride; q += g) {
      Vec<scalar> v[g];
      for (int64_t i = 0; i < g; ++i) v[i] = load_group(block + (q + i) * kSoftmaxPixels + t0);
      transpose_group<scalar>(v);
      for (int64_t j = 0; j < g && t0 + j < n; ++j) store_group(rows + (t0 + j) * stride + q, v[j]);
    }
  }
}

// Q of pixels [p0, p1) into rows (row of pixel p at rows + (p - p0) stride,
// padding lanes 0): softmax(-U) alone, or with the messages sliced from both
// kernels' grids.  The messages are summed row by row, then each block of
// kSoftmaxPixels rows goes channel-major, where the unaries (planes) are
// subtracted and math.h's softmax runs one pixel per vector lane.
template <typename scalar, int64_t kWidth>
BOXLOSS_CPU_CLONES void pixel_pass(const scalar* __restrict unary, int64_t num_pixels, const uint8_t* __restrict valid,
                                   KernelView<scalar, kAppearanceSimplex> a, KernelView<scalar, kSmoothnessSimplex> s,
                                   bool messages, int64_t channels, int64_t runtime_stride, int64_t p0, int64_t p1,
                                   scalar* __restrict rows, scalar* __restrict block) {
  const int64_t stride = kWidth > 0 ? kWidth : runtime_stride;
  for (int64_t b0 = p0; b0 < p1; b0 += kSoftmaxPixels) {
    const int64_t n = std::min<int64_t>(kSoftmaxPixels, p1 - b0);
    scalar* __restrict first = rows + (b0 - p0) * stride;
    for (int64_t t = 0; t < kSoftmaxPixels; ++t) {
      const int64_t p = b0 + t;
      scalar* __restrict row = first + t * stride;
      for (int64_t c = 0; c < stride; ++c) row[c] = scalar(0);
      if (t >= n || !messages || (valid != nullptr && !valid[p])) continue;
      if (a.active) {
        if (p + kPrefetchAhead < p1) {
          for (int r = 0; r < kAppearanceSimplex; ++r) {
            prefetch_row(a.grid + static_cast<int64_t>(a.index[(p + kPrefetchAhead) * kAppearanceSimplex + r]) * stride,
                         stride, false);
          }
        }
        const scalar f = a.scale * a.norm[p];
#pragma GCC unroll 6
        for (int r = 0; r < kAppearanceSimplex; ++r) {
          const scalar w = f * a.weight[p * kAppearanceSimplex + r];
          const scalar* __restrict g = a.grid + static_cast<int64_t>(a.index[p * kAppearanceSimplex + r]) * stride;
          for (int64_t c = 0; c < stride; ++c) row[c] += w * g[c];
        }
      }
      if (s.active) {
        const scalar f = s.scale * s.norm[p];
#pragma GCC unroll 3
        for (int r = 0; r < kSmoothnessSimplex; ++r) {
          const scalar w = f * s.weight[p * kSmoothnessSimplex + r];
          const scalar* __restrict g = s.grid + static_cast<int64_t>(s.index[p * kSmoothnessSimplex + r]) * stride;
          for (int64_t c = 0; c < stride; ++c) row[c] += w * g[c];
        }
      }
    }
    // Rows -> channel-major block; logits = messages - U; softmax; back.
    // Lanes past the end hold logits 0 and are not written back.
    rows_to_block<scalar, kWidth>(first, stride, block);
    for (int64_t c = 0; c < channels; ++c) {
      const scalar* __restrict plane = unary + c * num_pixels + b0;
      scalar* __restrict lane = block + c * kSoftmaxPixels;
      if (n == kSoftmaxPixels) {
        for (int t = 0; t < kSoftmaxPixels; ++t) lane[t] -= plane[t];
      } else {
        for (int64_t t = 0; t < n; ++t) lane[t] -= plane[t];
      }
    }
    softmax_pixels<scalar, kSoftmaxPixels>(block, channels);
    block_to_rows<scalar, kWidth>(block, stride, n, first);
  }
}

// Adds columns [c0, c0 + width) of the rows of pixels [p0, p1) (row of pixel
// p at rows + (p - p0) stride) into both kernels' grids, in pixel order.
// Invalid pixels send nothing.  A kernel whose vertices are numbered by first
// use in pixel order (Kernel::first_use) needs no zeroed grid: the first
// pixel to touch a vertex writes its row (`next` counts the vertices touched
// so far, invalid pixels included), the others add to it.  0 + x = x, so the
// sums are the same bit for bit as into a zeroed grid.
template <typename scalar, int kSimplex, bool kFirstUse, int64_t kWidth>
BOXLOSS_ALWAYS_INLINE void splat_kernel_pixel(KernelView<scalar, kSimplex> k, int64_t p, bool is_valid, int64_t stride,
                                              int64_t c0, int64_t width, const scalar* __restrict q, int64_t* next) {
  const scalar norm = k.norm[p];
#pragma GCC unroll 6
  for (int r = 0; r < kSimplex; ++r) {
    const int64_t v = k.index[p * kSimplex + r];
    const scalar w = k.weight[p * kSimplex + r] * norm;
    scalar* __restrict g = k.grid + v * stride + c0;
    if (kFirstUse && v == *next) {
      ++*next;
      if (is_valid) {
        for (int64_t c = 0; c < (kWidth > 0 ? kWidth : width); ++c) g[c] = w * q[c];
      } else {
        for (int64_t c = 0; c < (kWidth > 0 ? kWidth : width); ++c) g[c] = scalar(0);
      }
    } else if (is_valid) {
      for (int64_t c = 0; c < (kWidth > 0 ? kWidth : width); ++c) g[c] += w * q[c];
    }
  }
}

template <typename scalar, int64_t kWidth, bool kFirstUse>
BOXLOSS_CPU_CLONES void splat_pass(const uint8_t* __restrict valid, KernelView<scalar, kAppearanceSimplex> a,
                                   KernelView<scalar, kSmoothnessSimplex> s, int64_t stride, int64_t c0,
                                   int64_t runtime_width, int64_t p0, int64_t p1, const scalar* __restrict rows,
                                   int64_t* a_next, int64_t* s_next) {
  const int64_t width = kWidth > 0 ? kWidth : runtime_width;
  for (int64_t p = p0; p < p1; ++p) {
    if (a.active && p + kPrefetchAhead < p1) {
      for (int r = 0; r < kAppearanceSimplex; ++r) {
        prefetch_row(
            a.grid + static_cast<int64_t>(a.index[(p + kPrefetchAhead) * kAppearanceSimplex + r]) * stride + c0, width,
            true);
      }
    }
    const bool is_valid = valid == nullptr || valid[p] != 0;
    if (!kFirstUse && !is_valid) continue;
    const scalar* __restrict q = rows + (p - p0) * stride + c0;
    if (a.active)
      splat_kernel_pixel<scalar, kAppearanceSimplex, kFirstUse, kWidth>(a, p, is_valid, stride, c0, width, q, a_next);
    if (s.active)
      splat_kernel_pixel<scalar, kSmoothnessSimplex, kFirstUse, kWidth>(s, p, is_valid, stride, c0, width, q, s_next);
  }
}

// The blur runs in place along chains.  Along one axis, the vertices fall
// into chains, each vertex's up neighbour the next in its chain (u is v's
// neighbour up exactly when v is u's neighbour down).  Walking a chain
// upwards and carrying the previous vertex's old row, every row is read once
// and written once, with the same arithmetic as from a second grid
// (old + (down + up) / 2): about two thirds of the memory traffic, and the
// passes dominate the loop at BANA's sigmas.  The walk order is built once
// per image (chain_order).

// Vertices of each axis in chain order: every chain from its bottom (no
// neighbour down) upwards, chains in the order of their bottom vertex.
// Returns false if the links do not form chains covering every vertex once
// (impossible for a lattice the builds made).
bool chain_order(const int32_t* neighbours, int64_t axis_stride, int64_t num_vertices, int axes, int32_t* order,
                 const RangeRunner& runner) {
  std::vector<uint8_t> ok(static_cast<size_t>(axes), 0);
  runner(axes, 1, [&](int64_t a0, int64_t a1) {
    for (int64_t axis = a0; axis < a1; ++axis) {
      const int32_t* n = neighbours + axis * axis_stride;
      int32_t* o = order + axis * num_vertices;
      int64_t k = 0;
      bool good = true;
      for (int64_t v = 0; v < num_vertices && good; ++v) {
        if (n[2 * v] >= 0) continue;
        for (int64_t u = v; u >= 0 && good; u = n[2 * u + 1]) {
          good = k < num_vertices && u < num_vertices;
          if (good) o[k++] = static_cast<int32_t>(u);
        }
      }
      ok[static_cast<size_t>(axis)] = good && k == num_vertices ? 1 : 0;
    }
  });
  for (uint8_t b : ok) {
    if (!b) return false;
  }
  return true;
}

// Blurs the chains that start in [i0, i1) of one axis's chain order in place.
template <typename scalar, int64_t kWidth>
BOXLOSS_CPU_CLONES void blur_chains(const int32_t* __restrict neighbours, const int32_t* __restrict order,
                                    scalar* __restrict grid, int64_t num_vertices, int64_t runtime_stride, int64_t i0,
                                    int64_t i1, scalar* __restrict previous) {
  const int64_t stride = kWidth > 0 ? kWidth : runtime_stride;
  const scalar half = scalar(0.5);
  // Start and end on the bottom of a chain.
  while (i0 < num_vertices && i0 > 0 && neighbours[2 * static_cast<int64_t>(order[i0])] >= 0) ++i0;
  while (i1 < num_vertices && neighbours[2 * static_cast<int64_t>(order[i1])] >= 0) ++i1;
  for (int64_t i = i0; i < i1; ++i) {
    if (i + kBlurPrefetchAhead < i1) {
      prefetch_row(grid + static_cast<int64_t>(order[i + kBlurPrefetchAhead]) * stride, stride, true);
    }
    const int64_t v = order[i];
    if (neighbours[2 * v] < 0) {
      for (int64_t c = 0; c < stride; ++c) previous[c] = scalar(0);
    }
    const int32_t up = neighbours[2 * v + 1];
    scalar* row = grid + v * stride;
    const scalar* above = grid + (up < 0 ? num_vertices : up) * stride;
    for (int64_t c = 0; c < stride; ++c) {
      const scalar old = row[c];
      row[c] = old + half * (previous[c] + above[c]);
      previous[c] = old;
    }
  }
}

// Blurs `grid` along the `axes` axes in place.
template <typename scalar, int64_t kWidth>
void blur_in_place(const int32_t* neighbours, int64_t axis_stride, const int32_t* order, int64_t num_vertices, int axes,
                   int64_t stride, scalar* grid, const RangeRunner& runner) {
  const int64_t grain = std::max<int64_t>(256, (int64_t{1} << 16) / std::max<int64_t>(1, stride));
  for (int axis = 0; axis < axes; ++axis) {
    runner(num_vertices, grain, [&](int64_t i0, int64_t i1) {
      AlignedBuffer<scalar> previous(stride);
      blur_chains<scalar, kWidth>(neighbours + axis * axis_stride, order + axis * num_vertices, grid, num_vertices,
                                  stride, i0, i1, previous.get());
    });
  }
}

// Q rows of pixels [p0, p1) (row of p at rows + (p - p0) stride) -> planes.
template <typename scalar>
void rows_to_planes(const scalar* __restrict rows, int64_t stride, int64_t channels, int64_t num_pixels, int64_t p0,
                    int64_t p1, scalar* __restrict out) {
  for (int64_t c = 0; c < channels; ++c) {
    scalar* __restrict plane = out + c * num_pixels;
    for (int64_t p = p0; p < p1; ++p) plane[p] = rows[(p - p0) * stride + c];
  }
}

// Blurs kernel k's `splatted` grid in place; it becomes k.result.
template <typename scalar, int64_t kWidth>
void blur_kernel(Kernel<scalar>& k, int64_t stride, const RangeRunner& runner) {
  blur_in_place<scalar, kWidth>(k.neighbours, k.axis_stride, k.order.get(), k.num_vertices, k.simplex, stride,
                                k.splatted, runner);
  k.result = k.splatted;
}

// The normaliser of kernel k (the filter of the valid mask, one channel) and
// its weight scale; allocates the grids of `stride` values per row.
template <typename scalar, int kSimplex, int kDim>
void prepare_kernel(const KernelLattice<scalar>& lattice, const uint8_t* valid, int64_t num_pixels, int64_t stride,
                    const RangeRunner& runner, Kernel<scalar>* k) {
  k->active = lattice.weight > 0.0;
  if (!k->active) return;
  k->simplex = kSimplex;
  k->index = lattice.splat_index;
  k->neighbours = lattice.neighbours;
  k->axis_stride = lattice.axis_stride;
  k->num_vertices = lattice.num_vertices;
  const int64_t V = lattice.num_vertices;
  const int32_t* index = lattice.splat_index;
  const scalar* weight = lattice.splat_weight;
  {
    // L m: splat the mask, blur, slice (one channel).
    k->order = AlignedBuffer<int32_t>(kSimplex * V);
    if (!chain_order(lattice.neighbours, lattice.axis_stride, V, kSimplex, k->order.get(), runner)) {
      throw std::runtime_error(
          "dense_crf_inference: a lattice's neighbour table does not form chains (internal error)");
    }
    AlignedBuffer<scalar> mask_grid(V + 1, true);
    scalar* src = mask_grid.get();
    for (int64_t p = 0; p < num_pixels; ++p) {
      if (valid != nullptr && !valid[p]) continue;
      for (int r = 0; r < kSimplex; ++r) src[index[p * kSimplex + r]] += weight[p * kSimplex + r];
    }
    blur_in_place<scalar, 1>(lattice.neighbours, lattice.axis_stride, k->order.get(), V, kSimplex, 1, src, runner);
    const scalar alpha = permutohedral::alpha<scalar, kDim>();
    k->scale = static_cast<scalar>(lattice.weight) * alpha;
    k->weight = weight;
    k->norm = AlignedBuffer<scalar>(num_pixels);
    scalar* norm = k->norm.get();
    const scalar* filtered = src;
    runner(num_pixels, int64_t{1} << 12, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        scalar sum = scalar(0);
        for (int r = 0; r < kSimplex; ++r) sum += weight[p * kSimplex + r] * filtered[index[p * kSimplex + r]];
        const bool is_valid = valid == nullptr || valid[p] != 0;
        norm[p] = is_valid ? normaliser(alpha * sum) : scalar(0);
      }
    });
  }
  // The CPU builds number vertices by first use in pixel order; checked, not assumed.
  int64_t next = 0;
  bool first_use = true;
  for (int64_t i = 0; i < num_pixels * kSimplex && first_use; ++i) {
    const int64_t v = index[i];
    first_use = v <= next;
    next += v == next ? 1 : 0;
  }
  k->first_use = first_use && next == V;
  k->grid_a = AlignedBuffer<scalar>((V + 1) * stride, true);
  k->grid_b = AlignedBuffer<scalar>((V + 1) * stride, true);
  k->result = k->grid_b.get();
}

// Makes the grid that is not k's result the splat target, its vertex rows
// [0, V) zeroed unless the splat writes them (row V stays zero: nothing writes it).
template <typename scalar>
void start_splat(Kernel<scalar>& k, int64_t stride, const RangeRunner& runner) {
  if (!k.active) return;
  scalar* grid = k.other(k.result);
  k.splatted = grid;
  if (k.first_use) return;  // the splat writes every row
  const int64_t rows_per_chunk = std::max<int64_t>(1, (int64_t{1} << 16) / stride);
  runner((k.num_vertices + rows_per_chunk - 1) / rows_per_chunk, 1, [&](int64_t b0, int64_t b1) {
    const int64_t v0 = b0 * rows_per_chunk;
    const int64_t v1 = std::min(k.num_vertices, b1 * rows_per_chunk);
    std::memset(grid + v0 * stride, 0, static_cast<size_t>((v1 - v0) * stride) * sizeof(scalar));
  });
}

template <typename scalar, int64_t kWidth>
void run_image(const MeanFieldImage<scalar>& image, int64_t stride, bool split, const RangeRunner& runner) {
  const int64_t N = image.num_pixels;
  const int64_t C = image.channels;
  Kernel<scalar> appearance, smoothness;
  prepare_kernel<scalar, kAppearanceSimplex, kAppearanceSimplex - 1>(image.appearance, image.valid, N, stride, runner,
                                                                     &appearance);
  prepare_kernel<scalar, kSmoothnessSimplex, kSmoothnessSimplex - 1>(image.smoothness, image.valid, N, stride, runner,
                                                                     &smoothness);
  // Both kernels' splats write first touches, or both go into zeroed grids.
  const bool first_use = (!appearance.active || appearance.first_use) && (!smoothness.active || smoothness.first_use);
  appearance.first_use = smoothness.first_use = first_use;
  const bool parallel = runner.workers > 1;
  const int64_t tiles = (N + kTile - 1) / kTile;
  // Whole softmax blocks: the last block of the image zeroes and transposes rows past its end.
  AlignedBuffer<scalar> rows((parallel ? round_up(N, kSoftmaxPixels) : kTile) * stride);
  // A channel-major softmax block per tile task (at most one task per tile runs at once).
  AlignedBuffer<scalar> blocks(tiles * kSoftmaxPixels * stride);
  const int64_t block = kBlock<scalar>;
  for (int64_t t = 0; t <= image.iterations; ++t) {
    const bool messages = t > 0;
    const bool last = t == image.iterations;
    if (messages) {
      if (appearance.active) blur_kernel<scalar, kWidth>(appearance, stride, runner);
      if (smoothness.active) blur_kernel<scalar, kWidth>(smoothness, stride, runner);
    }
    if (!last) {
      start_splat(appearance, stride, runner);
      start_splat(smoothness, stride, runner);
    }
    const auto a_slice = slice_view<scalar, kAppearanceSimplex>(appearance);
    const auto s_slice = slice_view<scalar, kSmoothnessSimplex>(smoothness);
    const auto a_splat = splat_view<scalar, kAppearanceSimplex>(appearance);
    const auto s_splat = splat_view<scalar, kSmoothnessSimplex>(smoothness);
    const auto splat = [&](auto fixed_width, int64_t c0, int64_t width, int64_t p0, int64_t p1, const scalar* src,
                           int64_t* a_next, int64_t* s_next) {
      constexpr int64_t kFixed = decltype(fixed_width)::value;
      if (first_use) {
        splat_pass<scalar, kFixed, true>(image.valid, a_splat, s_splat, stride, c0, width, p0, p1, src, a_next, s_next);
      } else {
        splat_pass<scalar, kFixed, false>(image.valid, a_splat, s_splat, stride, c0, width, p0, p1, src, a_next,
                                          s_next);
      }
    };
    const std::integral_constant<int64_t, kWidth> row_width;
    const std::integral_constant<int64_t, kBlock<scalar>> block_width;
    if (!parallel) {
      int64_t a_next = 0, s_next = 0;
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t p0 = tile * kTile, p1 = std::min(N, p0 + kTile);
        pixel_pass<scalar, kWidth>(image.unary, N, image.valid, a_slice, s_slice, messages, C, stride, p0, p1,
                                   rows.get(), blocks.get());
        if (last) {
          rows_to_planes(rows.get(), stride, C, N, p0, p1, image.out);
        } else {
          splat(row_width, 0, stride, p0, p1, rows.get(), &a_next, &s_next);
        }
      }
      continue;
    }
    runner(tiles, 4, [&](int64_t t0, int64_t t1) {
      const int64_t p0 = t0 * kTile, p1 = std::min(N, t1 * kTile);
      pixel_pass<scalar, kWidth>(image.unary, N, image.valid, a_slice, s_slice, messages, C, stride, p0, p1,
                                 rows.get() + p0 * stride, blocks.get() + t0 * kSoftmaxPixels * stride);
    });
    if (last) {
      runner(tiles, 4, [&](int64_t t0, int64_t t1) {
        const int64_t p0 = t0 * kTile, p1 = std::min(N, t1 * kTile);
        rows_to_planes(rows.get() + p0 * stride, stride, C, N, p0, p1, image.out);
      });
    } else if (split) {
      runner(stride / block, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          int64_t a_block_next = 0, s_block_next = 0;
          splat(block_width, b * block, block, 0, N, rows.get(), &a_block_next, &s_block_next);
        }
      });
    } else {
      int64_t a_all_next = 0, s_all_next = 0;
      splat(row_width, 0, stride, 0, N, rows.get(), &a_all_next, &s_all_next);
    }
  }
}

}  // namespace

template <typename scalar>
int32_t mean_field_image(const MeanFieldImage<scalar>& image, const RangeRunner& given_runner) {
  const int64_t N = image.num_pixels;
  const int64_t C = image.channels;
  if (N == 0 || C == 0) return 0;
  const RangeRunner runner = N >= image.parallel_pixels ? given_runner : RangeRunner(permutohedral::cpu::run_serially);
  // Rows of whole 32-byte groups (16 bytes for up to 4 floats or 2 doubles).
  const int64_t group = C <= 16 / static_cast<int64_t>(sizeof(scalar)) ? 16 / sizeof(scalar) : 32 / sizeof(scalar);
  // Split the splat among threads by 64-byte channel blocks when there are two blocks or more.
  const int64_t block = kBlock<scalar>;
  const bool split = runner.workers > 1 && C > block;
  const int64_t stride = split ? round_up(C, block) : round_up(C, group);
  const int64_t tiles = (N + kTile - 1) / kTile;
  std::vector<int32_t> tile_status(static_cast<size_t>(tiles), 0);
  runner(tiles, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      tile_status[static_cast<size_t>(t)] = unary_status(image.unary, C, N, t * kTile, std::min(N, (t + 1) * kTile));
    }
  });
  int32_t status = 0;
  for (int32_t s : tile_status) status |= s;
  if (status != 0) return status;
  with_row_width<scalar>(stride, [&](auto width) { run_image<scalar, width()>(image, stride, split, runner); });
  return 0;
}

template int32_t mean_field_image<float>(const MeanFieldImage<float>&, const RangeRunner&);
template int32_t mean_field_image<double>(const MeanFieldImage<double>&, const RangeRunner&);

}  // namespace cpu
}  // namespace crf_inference
}  // namespace boxloss
