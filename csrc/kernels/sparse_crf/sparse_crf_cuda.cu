// CUDA kernels of the Sparse-CRF loss.  One thread per pixel; the colour
// weight, the pairwise term and the reduction are fused, and the per-pixel
// math is the host/device code of boxloss/sparse_crf/math.h that the CPU
// kernel runs too (pair_weights for one pair here, for a run of a row there).
// No [B, neighbours, H, W] tensor exists in either pass.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "boxloss/common/block_sum.cuh"
#include "boxloss/sparse_crf/cuda.h"

namespace boxloss {
namespace sparse_crf {
namespace cuda {
namespace {

template <typename T>
__device__ __forceinline__ acc_t<T> to_acc(T v) {
  return static_cast<acc_t<T>>(v);
}
template <>
__device__ __forceinline__ float to_acc<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ acc_t<T> load(const T* ptr) {
  return to_acc(__ldg(ptr));
}

template <typename T>
__device__ __forceinline__ T store_cast(acc_t<T> v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half store_cast<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 store_cast<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// w_pq for p = (y, x) and q = p + offset: pair_weights (math.h) for this one
// pair, 0 when q is outside the image.
template <typename T>
__device__ __forceinline__ acc_t<T> pair_weight_at(const Problem& problem, const T* image, int64_t b, int64_t y,
                                                   int64_t x, Offset offset, acc_t<T> exponent_scale) {
  using acc = acc_t<T>;
  const int64_t y2 = y + offset.dy;
  const int64_t x2 = x + offset.dx;
  if (y2 < 0 || y2 >= problem.height || x2 < 0 || x2 >= problem.width) return acc(0);
  const int64_t plane = problem.plane();
  const int64_t p = y * problem.width + x;
  const int64_t q = y2 * problem.width + x2;
  const uint8_t* valid = problem.valid == nullptr ? nullptr : problem.valid + b * plane;
  const T* img = image + b * problem.image_channels * plane;
  acc squared, weight;
  pair_weights<0>(
      img + p, img + q, plane, problem.image_channels, valid == nullptr ? nullptr : valid + p,
      valid == nullptr ? nullptr : valid + q, 1, exponent_scale, [](T v) { return to_acc(v); }, &squared, &weight);
  return weight;
}

template <typename T, Kind kind>
__global__ void __launch_bounds__(kThreadsPerBlock)
    forward_kernel(Problem problem, int64_t batch_begin, int64_t blocks_per_image, acc_t<T>* __restrict__ partial_sums,
                   int32_t* __restrict__ status) {
  using acc = acc_t<T>;
  const int64_t b = batch_begin + blockIdx.y;
  const int64_t plane = problem.plane();
  const int64_t pixel = static_cast<int64_t>(blockIdx.x) * kThreadsPerBlock + threadIdx.x;
  const T* probs = static_cast<const T*>(problem.probs) + b * problem.num_channels * plane;
  const T* image = static_cast<const T*>(problem.image);
  acc total = acc(0);
  if (pixel < plane) {
    const int64_t y = pixel / problem.width;
    const int64_t x = pixel % problem.width;
    int32_t bad = 0;
    for (int64_t s = 0; s < problem.num_selected; ++s) {
      bad |= outside_unit_interval(load(probs + problem.channel_at(s) * plane + pixel)) ? kProbsOutOfRange : 0;
    }
    const T* img = image + b * problem.image_channels * plane;
    for (int64_t k = 0; k < problem.image_channels; ++k) {
      bad |= is_finite(load(img + k * plane + pixel)) ? 0 : kImageNotFinite;
    }
    if (bad) atomicOr(status + b, bad);

    const acc exponent_scale = weight_exponent_scale<acc>(problem.sigma);
    const int32_t pairs_per_pixel = problem.neighbourhood / 2;
    for (int32_t o = 0; o < pairs_per_pixel; ++o) {
      const Offset offset = neighbour_offset(o, problem.dilation);
      const acc w = pair_weight_at<T>(problem, image, b, y, x, offset, exponent_scale);
      if (w == acc(0)) continue;
      const int64_t q = pixel + offset.dy * problem.width + offset.dx;
      acc term = acc(0);
      for (int64_t s = 0; s < problem.num_selected; ++s) {
        const T* channel = probs + problem.channel_at(s) * plane;
        term += Term<kind>::value(load(channel + pixel), load(channel + q));
      }
      total += w * term;
    }
  }
  total = cuda_common::block_sum<kThreadsPerBlock>(total);
  if (threadIdx.x == 0) partial_sums[b * blocks_per_image + blockIdx.x] = total;
}

template <typename T, Kind kind>
__global__ void __launch_bounds__(kThreadsPerBlock)
    backward_kernel(Problem problem, int64_t batch_begin, const acc_t<T>* __restrict__ image_scale,
                    T* __restrict__ grad) {
  using acc = acc_t<T>;
  const int64_t b = batch_begin + blockIdx.y;
  const int64_t plane = problem.plane();
  const int64_t pixel = static_cast<int64_t>(blockIdx.x) * kThreadsPerBlock + threadIdx.x;
  if (pixel >= plane) return;
  const int64_t y = pixel / problem.width;
  const int64_t x = pixel % problem.width;
  const T* probs = static_cast<const T*>(problem.probs) + b * problem.num_channels * plane;
  const T* image = static_cast<const T*>(problem.image);
  const acc exponent_scale = weight_exponent_scale<acc>(problem.sigma);

  acc weights[8];
  int64_t neighbours[8];
  const int32_t num_offsets = problem.neighbourhood;
#pragma unroll
  for (int32_t j = 0; j < 8; ++j) {
    weights[j] = acc(0);
    neighbours[j] = pixel;
    if (j < num_offsets) {
      const Offset offset = neighbour_offset(backward_offset_index(j, num_offsets), problem.dilation);
      weights[j] = pair_weight_at<T>(problem, image, b, y, x, offset, exponent_scale);
      if (weights[j] != acc(0)) neighbours[j] = pixel + offset.dy * problem.width + offset.dx;
    }
  }
  const acc scale = image_scale[b];
  T* grad_image = grad + b * problem.num_channels * plane;
  for (int64_t s = 0; s < problem.num_selected; ++s) {
    const int64_t c = problem.channel_at(s);
    const T* channel = probs + c * plane;
    const acc a = load(channel + pixel);
    acc g = acc(0);
#pragma unroll
    for (int32_t j = 0; j < 8; ++j) {
      if (weights[j] != acc(0)) g += weights[j] * Term<kind>::grad_first(a, load(channel + neighbours[j]));
    }
    grad_image[c * plane + pixel] = store_cast<T>(g * scale);
  }
}

// Grid: x over blocks of pixels of one image, y over images (in chunks of the
// 65535 limit of gridDim.y).
template <typename Launch>
cudaError_t for_each_batch_chunk(const Problem& problem, Launch launch) {
  const int64_t max_grid_y = 65535;
  for (int64_t begin = 0; begin < problem.batch; begin += max_grid_y) {
    const int64_t count = std::min(max_grid_y, problem.batch - begin);
    const dim3 grid(static_cast<unsigned>(forward_blocks_per_image(problem)), static_cast<unsigned>(count));
    launch(grid, begin);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_forward_typed(const Problem& problem, void* partial_sums, int32_t* status, cudaStream_t stream) {
  const int64_t blocks = forward_blocks_per_image(problem);
  auto* partials = static_cast<acc_t<T>*>(partial_sums);
  return for_each_batch_chunk(problem, [&](dim3 grid, int64_t begin) {
    if (problem.kind == Kind::L1) {
      forward_kernel<T, Kind::L1><<<grid, kThreadsPerBlock, 0, stream>>>(problem, begin, blocks, partials, status);
    } else {
      forward_kernel<T, Kind::Potts><<<grid, kThreadsPerBlock, 0, stream>>>(problem, begin, blocks, partials, status);
    }
  });
}

template <typename T>
cudaError_t launch_backward_typed(const Problem& problem, const void* image_scale, void* grad, cudaStream_t stream) {
  const auto* scale = static_cast<const acc_t<T>*>(image_scale);
  auto* out = static_cast<T*>(grad);
  return for_each_batch_chunk(problem, [&](dim3 grid, int64_t begin) {
    if (problem.kind == Kind::L1) {
      backward_kernel<T, Kind::L1><<<grid, kThreadsPerBlock, 0, stream>>>(problem, begin, scale, out);
    } else {
      backward_kernel<T, Kind::Potts><<<grid, kThreadsPerBlock, 0, stream>>>(problem, begin, scale, out);
    }
  });
}

}  // namespace

int64_t forward_blocks_per_image(const Problem& problem) {
  return (problem.plane() + kThreadsPerBlock - 1) / kThreadsPerBlock;
}

cudaError_t launch_forward(const Problem& problem, DType dtype, void* partial_sums, int32_t* status,
                           cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16: return launch_forward_typed<__half>(problem, partial_sums, status, stream);
    case DType::kBFloat16: return launch_forward_typed<__nv_bfloat16>(problem, partial_sums, status, stream);
    case DType::kFloat32: return launch_forward_typed<float>(problem, partial_sums, status, stream);
    case DType::kFloat64: return launch_forward_typed<double>(problem, partial_sums, status, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_backward(const Problem& problem, DType dtype, const void* image_scale, void* grad,
                            cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16: return launch_backward_typed<__half>(problem, image_scale, grad, stream);
    case DType::kBFloat16: return launch_backward_typed<__nv_bfloat16>(problem, image_scale, grad, stream);
    case DType::kFloat32: return launch_backward_typed<float>(problem, image_scale, grad, stream);
    case DType::kFloat64: return launch_backward_typed<double>(problem, image_scale, grad, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace sparse_crf
}  // namespace boxloss
