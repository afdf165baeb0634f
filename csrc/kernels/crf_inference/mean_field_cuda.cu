// CUDA mean-field loop of DenseCRF inference.  The per-pixel math (the
// softmax, its flush, the normaliser, the unary checks) is the host/device
// code of boxloss/crf_inference/math.h that the CPU core runs too.
//
// One thread per pixel (all images at once) forms its logits from both
// kernels' blurred grids, takes the softmax in place in its row of `rows` and
// adds its probabilities into the next grids with atomicAdd; one thread per
// (vertex, channel) runs each blur pass.
#include <algorithm>

#include "boxloss/common/grid_stride.cuh"
#include "boxloss/crf_inference/cuda.h"
#include "boxloss/permutohedral/math.h"

namespace boxloss {
namespace crf_inference {
namespace cuda {
namespace {

using cuda_common::global_index;
using cuda_common::global_stride;

int grid_for(int64_t work) { return cuda_common::grid_for<kThreads>(work); }

// Vertex rows and splat weights of pixel p of image b, per kernel.
template <typename T>
struct AppearanceRows {
  static constexpr int kSimplex = 6;
  static constexpr int kDim = 5;
  AppearanceLattice<T> lattice;
  int64_t num_pixels;
  __device__ int64_t rows() const { return lattice.total_vertices; }  // the zero row's index
  __device__ int64_t row(int64_t b, int64_t p, int r) const {
    return lattice.vertex_offsets[b] + lattice.splat_index[(b * num_pixels + p) * kSimplex + r];
  }
  __device__ T weight(int64_t b, int64_t p, int r) const {
    return lattice.splat_weight[(b * num_pixels + p) * kSimplex + r];
  }
};

template <typename T>
struct SmoothnessRows {
  static constexpr int kSimplex = 3;
  static constexpr int kDim = 2;
  SmoothnessLattice<T> lattice;
  int64_t num_pixels;
  int64_t batch;
  __device__ int64_t rows() const { return batch * lattice.num_vertices; }
  __device__ int64_t row(int64_t b, int64_t p, int r) const {
    return b * lattice.num_vertices + lattice.splat_index[p * kSimplex + r];
  }
  __device__ T weight(int64_t, int64_t p, int r) const { return lattice.splat_weight[p * kSimplex + r]; }
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    check_unary_kernel(const T* __restrict__ unary, int64_t batch, int64_t channels, int64_t n,
                       int32_t* __restrict__ status) {
  for (int64_t i = global_index(); i < batch * n; i += global_stride()) {
    const int64_t b = i / n;
    const int64_t p = i % n;
    int32_t bits = 0;
    bool all_infinite = true;
    for (int64_t c = 0; c < channels; ++c) {
      const T u = unary[(b * channels + c) * n + p];
      bits |= unary_value_status(u);
      all_infinite = all_infinite && is_positive_infinity(u);
    }
    if (all_infinite) bits |= kUnaryAllInfinite;
    if (bits != 0) atomicOr(status + b, bits);
  }
}

// grid[row] += weight for every valid pixel's simplex: the splat of the mask.
template <typename T, typename Rows>
__global__ void __launch_bounds__(kThreads)
    mask_splat_kernel(Rows lattice, const uint8_t* __restrict__ valid, int64_t batch, T* __restrict__ grid) {
  const int64_t n = lattice.num_pixels;
  for (int64_t i = global_index(); i < batch * n; i += global_stride()) {
    const int64_t b = i / n;
    const int64_t p = i % n;
    if (valid != nullptr && !valid[i]) continue;
    for (int r = 0; r < Rows::kSimplex; ++r) atomicAdd(grid + lattice.row(b, p, r), lattice.weight(b, p, r));
  }
}

// Normaliser n = 1 / sqrt(alpha sum_r w_r filtered[row_r] + 1e-20) of each
// valid pixel and its folded weights: splat w_r n, slice (w_k alpha) n w_r
// (both 0 at invalid pixels).
template <typename T, typename Rows>
__global__ void __launch_bounds__(kThreads)
    weights_kernel(Rows lattice, const uint8_t* __restrict__ valid, int64_t batch, T kernel_weight,
                   const T* __restrict__ filtered, T* __restrict__ splat_weight, T* __restrict__ slice_weight) {
  const int64_t n = lattice.num_pixels;
  const T alpha = permutohedral::alpha<T, Rows::kDim>();
  const T scale = kernel_weight * alpha;
  for (int64_t i = global_index(); i < batch * n; i += global_stride()) {
    const int64_t b = i / n;
    const int64_t p = i % n;
    T sum = T(0);
    for (int r = 0; r < Rows::kSimplex; ++r) sum += lattice.weight(b, p, r) * filtered[lattice.row(b, p, r)];
    const bool is_valid = valid == nullptr || valid[i] != 0;
    const T norm = is_valid ? normaliser(alpha * sum) : T(0);
    for (int r = 0; r < Rows::kSimplex; ++r) {
      const T w = lattice.weight(b, p, r);
      splat_weight[i * Rows::kSimplex + r] = w * norm;
      slice_weight[i * Rows::kSimplex + r] = scale * norm * w;
    }
  }
}

// One blur pass of the appearance lattice along `axis`: dst = src + (down + up) / 2.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    appearance_blur_kernel(AppearanceLattice<T> lattice, int axis, int64_t channels, const T* __restrict__ src,
                           T* __restrict__ dst) {
  const int64_t total = lattice.total_vertices;
  for (int64_t i = global_index(); i < total * channels; i += global_stride()) {
    const int64_t v = i / channels;
    const int64_t c = i % channels;
    const int64_t base = lattice.vertex_offsets[lattice.vertex_image[v]];
    const int32_t* pair = lattice.blur_neighbours + (static_cast<int64_t>(axis) * total + v) * 2;
    const int64_t down = pair[0] < 0 ? total : base + pair[0];
    const int64_t up = pair[1] < 0 ? total : base + pair[1];
    dst[i] = src[i] + T(0.5) * (src[down * channels + c] + src[up * channels + c]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    smoothness_blur_kernel(SmoothnessLattice<T> lattice, int64_t batch, int axis, int64_t channels,
                           const T* __restrict__ src, T* __restrict__ dst) {
  const int64_t vertices = lattice.num_vertices;
  const int64_t zero_row = batch * vertices;
  for (int64_t i = global_index(); i < zero_row * channels; i += global_stride()) {
    const int64_t g = i / channels;
    const int64_t c = i % channels;
    const int64_t b = g / vertices;
    const int64_t v = g % vertices;
    const int32_t* pair = lattice.blur_neighbours + (static_cast<int64_t>(axis) * vertices + v) * 2;
    const int64_t down = pair[0] < 0 ? zero_row : b * vertices + pair[0];
    const int64_t up = pair[1] < 0 ? zero_row : b * vertices + pair[1];
    dst[i] = src[i] + T(0.5) * (src[down * channels + c] + src[up * channels + c]);
  }
}

// What one pixel step reads and writes of a kernel.
template <typename T>
struct KernelStep {
  bool active;
  const T* slice_weight;
  const T* splat_weight;
  const T* result;  // blurred grid (read when messages)
  T* target;        // next splat (written when splat)
};

// One mean-field step of every pixel: logits, softmax in its row, then the
// splat of Q into both kernels' next grids, or Q into `out` after the last.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    pixel_kernel(MeanFieldBatch<T> mf, T* __restrict__ rows, AppearanceRows<T> a_rows, KernelStep<T> a,
                 SmoothnessRows<T> s_rows, KernelStep<T> s, bool messages, bool last) {
  const int64_t n = mf.num_pixels;
  const int64_t channels = mf.channels;
  for (int64_t i = global_index(); i < mf.batch * n; i += global_stride()) {
    const int64_t b = i / n;
    const int64_t p = i % n;
    const bool is_valid = mf.valid == nullptr || mf.valid[i] != 0;
    T* x = rows + i * channels;
    // The messages first, then minus U: the order of the CPU loop's sums.
    for (int64_t c = 0; c < channels; ++c) x[c] = T(0);
    if (messages && is_valid) {
      if (a.active) {
        for (int r = 0; r < AppearanceRows<T>::kSimplex; ++r) {
          const T w = a.slice_weight[i * AppearanceRows<T>::kSimplex + r];
          const T* g = a.result + a_rows.row(b, p, r) * channels;
          for (int64_t c = 0; c < channels; ++c) x[c] += w * g[c];
        }
      }
      if (s.active) {
        for (int r = 0; r < SmoothnessRows<T>::kSimplex; ++r) {
          const T w = s.slice_weight[i * SmoothnessRows<T>::kSimplex + r];
          const T* g = s.result + s_rows.row(b, p, r) * channels;
          for (int64_t c = 0; c < channels; ++c) x[c] += w * g[c];
        }
      }
    }
    for (int64_t c = 0; c < channels; ++c) x[c] -= mf.unary[(b * channels + c) * n + p];
    softmax_pixels<T, 1>(x, channels);
    if (last) {
      for (int64_t c = 0; c < channels; ++c) mf.out[(b * channels + c) * n + p] = x[c];
      continue;
    }
    if (!is_valid) continue;
    if (a.active) {
      for (int r = 0; r < AppearanceRows<T>::kSimplex; ++r) {
        const T w = a.splat_weight[i * AppearanceRows<T>::kSimplex + r];
        T* g = a.target + a_rows.row(b, p, r) * channels;
        for (int64_t c = 0; c < channels; ++c) atomicAdd(g + c, w * x[c]);
      }
    }
    if (s.active) {
      for (int r = 0; r < SmoothnessRows<T>::kSimplex; ++r) {
        const T w = s.splat_weight[i * SmoothnessRows<T>::kSimplex + r];
        T* g = s.target + s_rows.row(b, p, r) * channels;
        for (int64_t c = 0; c < channels; ++c) atomicAdd(g + c, w * x[c]);
      }
    }
  }
}

// A kernel's two grids as the loop uses them (see mean_field_cpu.cpp).
template <typename T>
struct GridPair {
  T* grid[2];
  T* splatted;
  T* result;
  T* other(const T* g) const { return g == grid[0] ? grid[1] : grid[0]; }
};

template <typename T>
cudaError_t blur_appearance(const AppearanceLattice<T>& lattice, int64_t channels, GridPair<T>* grids,
                            cudaStream_t stream) {
  T* src = grids->splatted;
  T* dst = grids->other(src);
  for (int axis = 0; axis < AppearanceRows<T>::kSimplex; ++axis) {
    appearance_blur_kernel<T>
        <<<grid_for(lattice.total_vertices * channels), kThreads, 0, stream>>>(lattice, axis, channels, src, dst);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    std::swap(src, dst);
  }
  grids->result = src;
  return cudaSuccess;
}

template <typename T>
cudaError_t blur_smoothness(const SmoothnessLattice<T>& lattice, int64_t batch, int64_t channels, GridPair<T>* grids,
                            cudaStream_t stream) {
  T* src = grids->splatted;
  T* dst = grids->other(src);
  for (int axis = 0; axis < SmoothnessRows<T>::kSimplex; ++axis) {
    smoothness_blur_kernel<T><<<grid_for(batch * lattice.num_vertices * channels), kThreads, 0, stream>>>(
        lattice, batch, axis, channels, src, dst);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    std::swap(src, dst);
  }
  grids->result = src;
  return cudaSuccess;
}

// The normaliser and folded weights of one kernel, through its two grids
// (used with one channel, then zeroed again).
template <typename T, typename Rows, typename Blur>
cudaError_t prepare_kernel(const MeanFieldBatch<T>& mf, const Rows& rows, double kernel_weight, GridPair<T>* grids,
                           int64_t grid_values, T* splat_weight, T* slice_weight, Blur&& blur, cudaStream_t stream) {
  const int64_t pixels = mf.batch * mf.num_pixels;
  mask_splat_kernel<T, Rows><<<grid_for(pixels), kThreads, 0, stream>>>(rows, mf.valid, mf.batch, grids->grid[0]);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  grids->splatted = grids->grid[0];
  err = blur(grids);
  if (err != cudaSuccess) return err;
  weights_kernel<T, Rows><<<grid_for(pixels), kThreads, 0, stream>>>(
      rows, mf.valid, mf.batch, static_cast<T>(kernel_weight), grids->result, splat_weight, slice_weight);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  for (int g = 0; g < 2; ++g) {
    err = cudaMemsetAsync(grids->grid[g], 0, static_cast<size_t>(grid_values) * sizeof(T), stream);
    if (err != cudaSuccess) return err;
  }
  grids->splatted = grids->grid[0];
  grids->result = grids->grid[1];
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_mean_field_typed(const MeanFieldBatch<T>& mf, const MeanFieldBuffers<T>& buffers,
                                    cudaStream_t stream) {
  const int64_t pixels = mf.batch * mf.num_pixels;
  const int64_t C = mf.channels;
  if (pixels == 0) return cudaSuccess;
  const bool appearance = mf.appearance.weight > 0.0;
  const bool smoothness = mf.smoothness.weight > 0.0;
  const AppearanceRows<T> a_rows{mf.appearance, mf.num_pixels};
  const SmoothnessRows<T> s_rows{mf.smoothness, mf.num_pixels, mf.batch};
  const int64_t a_rows_total = mf.appearance.total_vertices;
  const int64_t s_rows_total = mf.batch * mf.smoothness.num_vertices;
  GridPair<T> a_grids{{buffers.appearance_grid[0], buffers.appearance_grid[1]}, nullptr, nullptr};
  GridPair<T> s_grids{{buffers.smoothness_grid[0], buffers.smoothness_grid[1]}, nullptr, nullptr};
  cudaError_t err = cudaSuccess;

  // Normalisers with one channel per row.
  if (appearance) {
    err = prepare_kernel<T>(
        mf, a_rows, mf.appearance.weight, &a_grids, (a_rows_total + 1) * C, buffers.appearance_splat,
        buffers.appearance_slice, [&](GridPair<T>* g) { return blur_appearance<T>(mf.appearance, 1, g, stream); },
        stream);
    if (err != cudaSuccess) return err;
  }
  if (smoothness) {
    err = prepare_kernel<T>(
        mf, s_rows, mf.smoothness.weight, &s_grids, (s_rows_total + 1) * C, buffers.smoothness_splat,
        buffers.smoothness_slice,
        [&](GridPair<T>* g) { return blur_smoothness<T>(mf.smoothness, mf.batch, 1, g, stream); }, stream);
    if (err != cudaSuccess) return err;
  }

  for (int64_t t = 0; t <= mf.iterations; ++t) {
    const bool messages = t > 0;
    const bool last = t == mf.iterations;
    if (messages) {
      if (appearance && (err = blur_appearance<T>(mf.appearance, C, &a_grids, stream)) != cudaSuccess) return err;
      if (smoothness && (err = blur_smoothness<T>(mf.smoothness, mf.batch, C, &s_grids, stream)) != cudaSuccess) {
        return err;
      }
    }
    KernelStep<T> a{appearance, buffers.appearance_slice, buffers.appearance_splat, a_grids.result, nullptr};
    KernelStep<T> s{smoothness, buffers.smoothness_slice, buffers.smoothness_splat, s_grids.result, nullptr};
    if (!last) {
      // The next splat goes into the grid that is not the one being sliced;
      // its vertex rows are zeroed (the zero row after them stays zero).
      if (appearance) {
        a.target = a_grids.other(a_grids.result);
        err = cudaMemsetAsync(a.target, 0, static_cast<size_t>(a_rows_total * C) * sizeof(T), stream);
        if (err != cudaSuccess) return err;
        a_grids.splatted = a.target;
      }
      if (smoothness) {
        s.target = s_grids.other(s_grids.result);
        err = cudaMemsetAsync(s.target, 0, static_cast<size_t>(s_rows_total * C) * sizeof(T), stream);
        if (err != cudaSuccess) return err;
        s_grids.splatted = s.target;
      }
    }
    pixel_kernel<T><<<grid_for(pixels), kThreads, 0, stream>>>(mf, buffers.rows, a_rows, a, s_rows, s, messages, last);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

template <typename scalar>
cudaError_t launch_check_unary(const MeanFieldBatch<scalar>& batch, int32_t* status, cudaStream_t stream) {
  const int64_t pixels = batch.batch * batch.num_pixels;
  if (pixels == 0) return cudaSuccess;
  check_unary_kernel<scalar>
      <<<grid_for(pixels), kThreads, 0, stream>>>(batch.unary, batch.batch, batch.channels, batch.num_pixels, status);
  return cudaGetLastError();
}

template <typename scalar>
cudaError_t launch_mean_field(const MeanFieldBatch<scalar>& batch, const MeanFieldBuffers<scalar>& buffers,
                              cudaStream_t stream) {
  return launch_mean_field_typed<scalar>(batch, buffers, stream);
}

template cudaError_t launch_check_unary<float>(const MeanFieldBatch<float>&, int32_t*, cudaStream_t);
template cudaError_t launch_check_unary<double>(const MeanFieldBatch<double>&, int32_t*, cudaStream_t);
template cudaError_t launch_mean_field<float>(const MeanFieldBatch<float>&, const MeanFieldBuffers<float>&,
                                              cudaStream_t);
template cudaError_t launch_mean_field<double>(const MeanFieldBatch<double>&, const MeanFieldBuffers<double>&,
                                               cudaStream_t);

}  // namespace cuda
}  // namespace crf_inference
}  // namespace boxloss
