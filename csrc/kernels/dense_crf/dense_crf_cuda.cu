// CUDA passes of the DenseCRF loss around the lattice filter: one thread per
// pixel for E and Z (block sums in a fixed order), one per (pixel, channel)
// for the gradient.  The per-pixel math is dense_crf/math.h.
#include <algorithm>

#include "boxloss/common/block_sum.cuh"
#include "boxloss/dense_crf/cuda.h"
#include "boxloss/permutohedral/math.h"

namespace boxloss {
namespace dense_crf {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads)
    energy_kernel(const T* __restrict__ probs, int64_t batch_begin, int64_t channels, int64_t n,
                  const uint8_t* __restrict__ mask, const T* __restrict__ filtered, const T* __restrict__ splat_weight,
                  int64_t blocks_per_image, T* __restrict__ partial_energy, T* __restrict__ partial_normaliser,
                  int32_t* __restrict__ status) {
  const int64_t b = batch_begin + blockIdx.y;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  T e = T(0), z = T(0);
  if (p < n) {
    const bool valid = mask == nullptr || mask[b * n + p];
    const T c = permutohedral::self_affinity_lower_bound(splat_weight + (b * n + p) * permutohedral::kVertices);
    const T* f = filtered + b * (channels + 1) * n;
    const T f_mask = f[channels * n + p];
    bool bad = false;
    for (int64_t k = 0; k < channels; ++k) {
      const T s = probs[(b * channels + k) * n + p];
      bad = bad || outside_unit_interval(s);
      if (valid) e += energy_term(s, f[k * n + p], f_mask, c);
    }
    if (valid) z = normaliser_term(f_mask, c);
    if (bad) atomicOr(status + b, kProbsOutOfRange);
  }
  e = cuda_common::block_sum<kThreads>(e);
  z = cuda_common::block_sum<kThreads>(z);
  if (threadIdx.x == 0) {
    partial_energy[b * blocks_per_image + blockIdx.x] = e;
    partial_normaliser[b * blocks_per_image + blockIdx.x] = z;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    gradient_kernel(const T* __restrict__ probs, int64_t batch, int64_t channels, int64_t n,
                    const uint8_t* __restrict__ mask, const T* __restrict__ filtered, const T* __restrict__ reversed,
                    const T* __restrict__ splat_weight, const T* __restrict__ scale, T* __restrict__ grad) {
  const int64_t total = batch * channels * n;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = i % n;
    const int64_t k = (i / n) % channels;
    const int64_t b = i / (n * channels);
    const bool valid = mask == nullptr || mask[b * n + p];
    T g = T(0);
    if (valid) {
      const T c = permutohedral::self_affinity_lower_bound(splat_weight + (b * n + p) * permutohedral::kVertices);
      const T* f = filtered + b * (channels + 1) * n;
      const T* r = reversed + b * (channels + 1) * n;
      g = scale[b] * gradient_term(probs[i], f[k * n + p], r[k * n + p], f[channels * n + p], r[channels * n + p], c);
    }
    grad[i] = g;
  }
}

}  // namespace

int64_t energy_blocks_per_image(int64_t num_pixels) { return (num_pixels + kThreads - 1) / kThreads; }

template <typename scalar>
cudaError_t launch_energy(const scalar* probs, int64_t batch, int64_t channels, int64_t num_pixels, const uint8_t* mask,
                          const scalar* filtered, const scalar* splat_weight, scalar* partial_energy,
                          scalar* partial_normaliser, int32_t* status, cudaStream_t stream) {
  const int64_t blocks = energy_blocks_per_image(num_pixels);
  const int64_t max_grid_y = 65535;
  for (int64_t begin = 0; begin < batch; begin += max_grid_y) {
    const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(std::min(max_grid_y, batch - begin)));
    energy_kernel<scalar><<<grid, kThreads, 0, stream>>>(probs, begin, channels, num_pixels, mask, filtered,
                                                         splat_weight, blocks, partial_energy, partial_normaliser,
                                                         status);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename scalar>
cudaError_t launch_gradient(const scalar* probs, int64_t batch, int64_t channels, int64_t num_pixels,
                            const uint8_t* mask, const scalar* filtered, const scalar* reversed,
                            const scalar* splat_weight, const scalar* scale, scalar* grad, cudaStream_t stream) {
  const int64_t total = batch * channels * num_pixels;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 65535 * 8);
  gradient_kernel<scalar><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      probs, batch, channels, num_pixels, mask, filtered, reversed, splat_weight, scale, grad);
  return cudaGetLastError();
}

template cudaError_t launch_energy<float>(const float*, int64_t, int64_t, int64_t, const uint8_t*, const float*,
                                          const float*, float*, float*, int32_t*, cudaStream_t);
template cudaError_t launch_energy<double>(const double*, int64_t, int64_t, int64_t, const uint8_t*, const double*,
                                           const double*, double*, double*, int32_t*, cudaStream_t);
template cudaError_t launch_gradient<float>(const float*, int64_t, int64_t, int64_t, const uint8_t*, const float*,
                                            const float*, const float*, const float*, float*, cudaStream_t);
template cudaError_t launch_gradient<double>(const double*, int64_t, int64_t, int64_t, const uint8_t*, const double*,
                                             const double*, const double*, const double*, double*, cudaStream_t);

}  // namespace cuda
}  // namespace dense_crf
}  // namespace boxloss
