// CUDA build of the permutohedral lattice and the filter through it.  The
// per-point math (locate, keys, hash, neighbour keys) is the host/device code
// of boxloss/permutohedral/math.h that the CPU core runs too.
//
// Build: one thread per pixel (all images at once) locates its simplex and
// inserts its d+1 vertex keys into its image's hash table: a slot holds the
// number of the (pixel, remainder) entry that claimed it with atomicCAS, and
// entries' keys are written and fenced before any claim, so a thread that
// finds a slot taken can compare keys.  The caller then numbers the occupied
// slots, and a second pass maps entries to vertex numbers and looks up every
// vertex's neighbours.
//
// Filter: one thread per (pixel, channel) for the splat (atomicAdd into the
// vertex rows) and the slice (a gather over the pixel's d+1 vertices), one
// per (vertex, channel) for each blur pass.
#include <algorithm>

#include "boxloss/common/grid_stride.cuh"
#include "boxloss/permutohedral/cuda.h"

namespace boxloss {
namespace permutohedral {
namespace cuda {
namespace {

using cuda_common::global_index;
using cuda_common::global_stride;

int grid_for(int64_t work) { return cuda_common::grid_for<kThreads>(work); }

// Slot (within the image's table) holding `key`, claimed for `entry` if no
// slot holds it yet.
__device__ int64_t insert_key(const BuildBuffers& buffers, int64_t b, const int32_t* key, int32_t entry) {
  const uint64_t mask = static_cast<uint64_t>(buffers.capacity - 1);
  int32_t* table = buffers.slot_entry + b * buffers.capacity;
  const uint32_t h = hash_key(key);
  for (int64_t probe = 0; probe < buffers.capacity; ++probe) {
    const int64_t s = static_cast<int64_t>((h + static_cast<uint64_t>(probe)) & mask);
    const int32_t owner = atomicCAS(table + s, -1, entry);
    if (owner == -1) return s;
    // The owner wrote and fenced its key before claiming the slot; read it
    // past the (incoherent) L1.
    const volatile int32_t* other = buffers.entry_keys + static_cast<int64_t>(owner) * kDim;
    bool equal = true;
    for (int i = 0; i < kDim; ++i) equal = equal && other[i] == key[i];
    if (equal) return s;
  }
  return -1;  // unreachable: a table is at most half full
}

// Slot holding `key` after the build, or -1.
__device__ int64_t find_key(const BuildBuffers& buffers, int64_t b, const int32_t* key) {
  const uint64_t mask = static_cast<uint64_t>(buffers.capacity - 1);
  const int32_t* table = buffers.slot_entry + b * buffers.capacity;
  const uint32_t h = hash_key(key);
  for (int64_t probe = 0; probe < buffers.capacity; ++probe) {
    const int64_t s = static_cast<int64_t>((h + static_cast<uint64_t>(probe)) & mask);
    const int32_t owner = table[s];
    if (owner < 0) return -1;
    if (keys_equal(buffers.entry_keys + static_cast<int64_t>(owner) * kDim, key)) return s;
  }
  return -1;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    insert_kernel(const T* __restrict__ image, int64_t batch, int64_t height, int64_t width, T inv_xy, T inv_rgb,
                  T* __restrict__ splat_weight, BuildBuffers buffers) {
  const int64_t num_pixels = height * width;
  for (int64_t g = global_index(); g < batch * num_pixels; g += global_stride()) {
    const int64_t b = g / num_pixels;
    const int64_t p = g % num_pixels;
    const T* img = image + b * 3 * num_pixels;
    const T red = img[p], green = img[num_pixels + p], blue = img[2 * num_pixels + p];
    const T feature[kDim] = {static_cast<T>(p % width) * inv_xy, static_cast<T>(p / width) * inv_xy, red * inv_rgb,
                             green * inv_rgb, blue * inv_rgb};
    Simplex<T> simplex;
    locate(feature, &simplex);
    T* weight = splat_weight + g * kVertices;
    int32_t* slot = buffers.entry_slot + g * kVertices;
    if (!simplex.ok) {
      const bool finite = math::is_finite(red) && math::is_finite(green) && math::is_finite(blue);
      atomicOr(buffers.status + b, finite ? kFeaturesTooLarge : kImageNotFinite);
      for (int r = 0; r < kVertices; ++r) {
        weight[r] = T(0);
        slot[r] = -1;
      }
      continue;
    }
    for (int r = 0; r < kVertices; ++r) {
      weight[r] = simplex.weights[r];
      int32_t* key = buffers.entry_keys + (g * kVertices + r) * kDim;
      for (int i = 0; i < kDim; ++i) key[i] = simplex.keys[r][i];
    }
    __threadfence();
    for (int r = 0; r < kVertices; ++r) {
      slot[r] = static_cast<int32_t>(insert_key(buffers, b, simplex.keys[r], static_cast<int32_t>(g * kVertices + r)));
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    number_entries_kernel(int64_t entries, int64_t entries_per_image, BuildBuffers buffers,
                          const int32_t* __restrict__ slot_vertex, int32_t* __restrict__ splat_index) {
  for (int64_t e = global_index(); e < entries; e += global_stride()) {
    const int64_t b = e / entries_per_image;
    const int32_t s = buffers.entry_slot[e];
    splat_index[e] = s < 0 ? 0 : slot_vertex[b * buffers.capacity + s];  // bad pixels: weight 0 on vertex 0
  }
}

__global__ void __launch_bounds__(kThreads)
    neighbours_kernel(int64_t total_vertices, BuildBuffers buffers, const int32_t* __restrict__ slot_vertex,
                      const int64_t* __restrict__ vertex_slot, int32_t* __restrict__ blur_neighbours) {
  for (int64_t v = global_index(); v < total_vertices; v += global_stride()) {
    const int64_t slot = vertex_slot[v];
    const int64_t b = slot / buffers.capacity;
    const int32_t* key = buffers.entry_keys + static_cast<int64_t>(buffers.slot_entry[slot]) * kDim;
    int32_t neighbour[kDim];
    for (int axis = 0; axis < kVertices; ++axis) {
      for (int side = 0; side < 2; ++side) {
        neighbour_key(key, axis, side, neighbour);
        const int64_t s = find_key(buffers, b, neighbour);
        blur_neighbours[(axis * total_vertices + v) * 2 + side] = s < 0 ? -1 : slot_vertex[b * buffers.capacity + s];
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    splat_kernel(Lattice<T> lattice, FilterInput<T> input, T* __restrict__ grid, int32_t* __restrict__ status) {
  const int64_t n = lattice.num_pixels;
  const int64_t channels = input.filtered_channels();
  const int64_t total = lattice.batch * channels * n;
  for (int64_t i = global_index(); i < total; i += global_stride()) {
    const int64_t p = i % n;
    const int64_t c = (i / n) % channels;
    const int64_t b = i / (n * channels);
    const uint8_t valid = input.mask == nullptr ? 1 : input.mask[b * n + p];
    T value;
    if (c < input.channels) {
      value = valid ? input.values[(b * input.channels + c) * n + p] : T(0);
      if (!math::is_finite(value)) atomicOr(status + b, kValuesNotFinite);
    } else {
      value = static_cast<T>(valid);
    }
    if (value == T(0)) continue;
    const int64_t base = lattice.vertex_offsets[b];
    const int64_t count = lattice.vertex_offsets[b + 1] - base;
    const int32_t* index = lattice.splat_index + (b * n + p) * kVertices;
    const T* weight = lattice.splat_weight + (b * n + p) * kVertices;
    for (int r = 0; r < kVertices; ++r) {
      const int32_t v = index[r];
      if (v < 0 || v >= count) {
        atomicOr(status + b, kLatticeCorrupt);
        continue;
      }
      atomicAdd(grid + (base + v) * channels + c, weight[r] * value);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    blur_kernel(Lattice<T> lattice, const int32_t* __restrict__ vertex_image, int axis, int64_t channels,
                const T* __restrict__ src, T* __restrict__ dst, int32_t* __restrict__ status) {
  const int64_t total_vertices = lattice.total_vertices;
  for (int64_t i = global_index(); i < total_vertices * channels; i += global_stride()) {
    const int64_t v = i / channels;
    const int64_t c = i % channels;
    const int64_t b = vertex_image[v];
    const int64_t base = lattice.vertex_offsets[b];
    const int64_t count = lattice.vertex_offsets[b + 1] - base;
    const int32_t* pair = lattice.blur_neighbours + (static_cast<int64_t>(axis) * total_vertices + v) * 2;
    int64_t rows[2];
    for (int side = 0; side < 2; ++side) {
      const int32_t nb = pair[side];
      if (nb < -1 || nb >= count) atomicOr(status + b, kLatticeCorrupt);
      rows[side] = (nb >= 0 && nb < count) ? base + nb : total_vertices;  // the zero row
    }
    dst[i] = src[i] + T(0.5) * (src[rows[0] * channels + c] + src[rows[1] * channels + c]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    slice_kernel(Lattice<T> lattice, int64_t channels, const T* __restrict__ grid, T* __restrict__ out) {
  const int64_t n = lattice.num_pixels;
  const int64_t total = lattice.batch * channels * n;
  const T scale = alpha<T>();
  for (int64_t i = global_index(); i < total; i += global_stride()) {
    const int64_t p = i % n;
    const int64_t c = (i / n) % channels;
    const int64_t b = i / (n * channels);
    const int64_t base = lattice.vertex_offsets[b];
    const int64_t count = lattice.vertex_offsets[b + 1] - base;
    const int32_t* index = lattice.splat_index + (b * n + p) * kVertices;
    const T* weight = lattice.splat_weight + (b * n + p) * kVertices;
    T acc = T(0);
    for (int r = 0; r < kVertices; ++r) {
      const int32_t v = index[r];
      const int64_t row = (v >= 0 && v < count) ? base + v : lattice.total_vertices;
      acc += weight[r] * grid[row * channels + c];
    }
    out[i] = scale * acc;
  }
}

template <typename T>
cudaError_t launch_insert_typed(const T* image, int64_t batch, int64_t height, int64_t width, double sigma_xy,
                                double sigma_rgb, T* splat_weight, const BuildBuffers& buffers, cudaStream_t stream) {
  insert_kernel<T><<<grid_for(batch * height * width), kThreads, 0, stream>>>(
      image, batch, height, width, static_cast<T>(1.0 / sigma_xy), static_cast<T>(1.0 / sigma_rgb), splat_weight,
      buffers);
  return cudaGetLastError();
}

}  // namespace

int64_t table_capacity(int64_t num_pixels) {
  int64_t capacity = 1024;
  while (capacity < 2 * kVertices * num_pixels) capacity <<= 1;
  return capacity;
}

cudaError_t launch_insert(const void* image, DType dtype, int64_t batch, int64_t height, int64_t width, double sigma_xy,
                          double sigma_rgb, void* splat_weight, const BuildBuffers& buffers, cudaStream_t stream) {
  if (dtype == DType::kFloat64) {
    return launch_insert_typed(static_cast<const double*>(image), batch, height, width, sigma_xy, sigma_rgb,
                               static_cast<double*>(splat_weight), buffers, stream);
  }
  return launch_insert_typed(static_cast<const float*>(image), batch, height, width, sigma_xy, sigma_rgb,
                             static_cast<float*>(splat_weight), buffers, stream);
}

cudaError_t launch_finish(int64_t batch, int64_t num_pixels, const BuildBuffers& buffers, const int32_t* slot_vertex,
                          const int64_t* vertex_slot, int64_t total_vertices, int32_t* splat_index,
                          int32_t* blur_neighbours, cudaStream_t stream) {
  const int64_t entries = batch * num_pixels * kVertices;
  number_entries_kernel<<<grid_for(entries), kThreads, 0, stream>>>(entries, num_pixels * kVertices, buffers,
                                                                    slot_vertex, splat_index);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || total_vertices == 0) return err;
  neighbours_kernel<<<grid_for(total_vertices), kThreads, 0, stream>>>(total_vertices, buffers, slot_vertex,
                                                                       vertex_slot, blur_neighbours);
  return cudaGetLastError();
}

template <typename scalar>
cudaError_t launch_filter(const Lattice<scalar>& lattice, const int32_t* vertex_image, const FilterInput<scalar>& input,
                          bool reverse, scalar* grid_a, scalar* grid_b, scalar* out, int32_t* status,
                          cudaStream_t stream) {
  const int64_t channels = input.filtered_channels();
  const int64_t pixels = lattice.batch * channels * lattice.num_pixels;
  if (pixels == 0) return cudaSuccess;
  splat_kernel<scalar><<<grid_for(pixels), kThreads, 0, stream>>>(lattice, input, grid_a, status);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  scalar* src = grid_a;
  scalar* dst = grid_b;
  const int64_t vertex_values = lattice.total_vertices * channels;
  for (int step = 0; step < kVertices && vertex_values > 0; ++step) {
    const int axis = reverse ? kDim - step : step;
    blur_kernel<scalar>
        <<<grid_for(vertex_values), kThreads, 0, stream>>>(lattice, vertex_image, axis, channels, src, dst, status);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    std::swap(src, dst);
  }
  slice_kernel<scalar><<<grid_for(pixels), kThreads, 0, stream>>>(lattice, channels, src, out);
  return cudaGetLastError();
}

template cudaError_t launch_filter<float>(const Lattice<float>&, const int32_t*, const FilterInput<float>&, bool,
                                          float*, float*, float*, int32_t*, cudaStream_t);
template cudaError_t launch_filter<double>(const Lattice<double>&, const int32_t*, const FilterInput<double>&, bool,
                                           double*, double*, double*, int32_t*, cudaStream_t);

}  // namespace cuda
}  // namespace permutohedral
}  // namespace boxloss
