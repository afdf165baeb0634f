// CUDA kernels of background attention (the per-pixel step between the GEMMs
// the torch op runs) and background-aware pooling.  The math is
// boxloss/background_attention/math.h, shared with the CPU core.
//   mark_inside:  one block per box, threads over its pixels (all write 1).
//   attention:    one thread per pixel.
//   pool forward: one block per (box, bin); thread 0 sums the bin's weights
//                 into shared memory, then threads stride over channels.
//   pool backward: one block per (box, bin); feature gradients by threads over
//                 (channel, pixel) pairs, attention gradients by threads over
//                 pixels (a dot product over channels each); atomic adds, as
//                 boxes may overlap.
#include "boxloss/background_attention/cuda.h"

namespace boxloss {
namespace background_attention {
namespace cuda {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < 1 ? 1 : (b > 65535 * 64 ? 65535 * 64 : b));
}

__global__ void mark_inside_kernel(const int64_t* __restrict ranges, const int64_t* __restrict box_batch,
                                   int64_t height, int64_t width, uint8_t* __restrict inside) {
  const int64_t k = blockIdx.x;
  const int64_t* r = ranges + 4 * k;
  const int64_t bw = r[3] - r[2], count = (r[1] - r[0]) * bw;
  uint8_t* plane = inside + box_batch[k] * height * width;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    plane[(r[0] + i / bw) * width + r[2] + i % bw] = 1;
  }
}

template <typename scalar>
__global__ void attention_forward_kernel(AttentionProblem<scalar> p, const scalar* __restrict dots,
                                         scalar* __restrict attention) {
  const int64_t n = p.batch * p.pixels;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    attention[i] = static_cast<scalar>(p.attention_at(dots, i));
  }
}

template <typename scalar>
__global__ void attention_backward_kernel(AttentionProblem<scalar> p, const scalar* __restrict grad_attention,
                                          scalar* __restrict dots, scalar* __restrict coef) {
  using acc = acc_t<scalar>;
  const int64_t n = p.batch * p.pixels;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    coef[i] = static_cast<scalar>(p.attention_backward_at(dots, static_cast<acc>(grad_attention[i]), i));
  }
}

template <typename scalar>
__global__ void pool_forward_kernel(PoolProblem<scalar> p, scalar* __restrict pooled, scalar* __restrict weight_sum) {
  using acc = acc_t<scalar>;
  __shared__ acc shared_ws;
  const int64_t bins = p.bins(), plane = p.height * p.width;
  const int64_t i = blockIdx.x, k = i / bins, bin = i % bins;
  Bin rows, cols;
  p.bin_pixels(k, bin, &rows, &cols);
  const scalar* attention = p.attention + p.box_batch[k] * plane;
  if (threadIdx.x == 0) {
    shared_ws = bin_weight_sum<scalar, acc>(attention, p.width, rows, cols);
    weight_sum[i] = static_cast<scalar>(shared_ws);
  }
  __syncthreads();
  const acc ws = shared_ws;
  const scalar* features = p.features + p.box_batch[k] * p.channels * plane;
  for (int64_t d = threadIdx.x; d < p.channels; d += blockDim.x) {
    pooled[(k * p.channels + d) * bins + bin] =
        static_cast<scalar>(bin_pool<scalar, acc>(features + d * plane, attention, p.width, rows, cols, ws));
  }
}

template <typename scalar>
__global__ void pool_backward_features_kernel(PoolProblem<scalar> p, const scalar* __restrict grad_pooled,
                                              const scalar* __restrict weight_sum, scalar* __restrict grad_features) {
  using acc = acc_t<scalar>;
  const int64_t bins = p.bins(), plane = p.height * p.width;
  const int64_t i = blockIdx.x, k = i / bins, bin = i % bins;
  Bin rows, cols;
  p.bin_pixels(k, bin, &rows, &cols);
  const int64_t bw = cols.end - cols.begin, count = (rows.end - rows.begin) * bw;
  if (count <= 0) return;
  const acc ws = static_cast<acc>(weight_sum[i]);
  const scalar* attention = p.attention + p.box_batch[k] * plane;
  scalar* gf = grad_features + p.box_batch[k] * p.channels * plane;
  for (int64_t t = threadIdx.x; t < count * p.channels; t += blockDim.x) {
    const int64_t d = t / count, j = t % count;
    const int64_t offset = (rows.begin + j / bw) * p.width + cols.begin + j % bw;
    const acc w = pixel_weight(static_cast<acc>(attention[offset]), ws, count);
    atomicAdd(gf + d * plane + offset,
              static_cast<scalar>(static_cast<acc>(grad_pooled[(k * p.channels + d) * bins + bin]) * w));
  }
}

template <typename scalar>
__global__ void pool_backward_attention_kernel(PoolProblem<scalar> p, const scalar* __restrict grad_pooled,
                                               const scalar* __restrict pooled, const scalar* __restrict weight_sum,
                                               scalar* __restrict grad_attention) {
  using acc = acc_t<scalar>;
  const int64_t bins = p.bins(), plane = p.height * p.width;
  const int64_t i = blockIdx.x, k = i / bins, bin = i % bins;
  const acc ws = static_cast<acc>(weight_sum[i]);
  if (plain_bin(ws)) return;
  Bin rows, cols;
  p.bin_pixels(k, bin, &rows, &cols);
  const int64_t bw = cols.end - cols.begin, count = (rows.end - rows.begin) * bw;
  const scalar* g = grad_pooled + k * p.channels * bins + bin;
  const scalar* r = pooled + k * p.channels * bins + bin;
  acc g_dot_r = 0;
  for (int64_t d = 0; d < p.channels; ++d) g_dot_r += static_cast<acc>(g[d * bins]) * static_cast<acc>(r[d * bins]);
  const scalar* features = p.features + p.box_batch[k] * p.channels * plane;
  for (int64_t j = threadIdx.x; j < count; j += blockDim.x) {
    const int64_t offset = (rows.begin + j / bw) * p.width + cols.begin + j % bw;
    acc g_dot_f = 0;
    for (int64_t d = 0; d < p.channels; ++d) {
      g_dot_f += static_cast<acc>(g[d * bins]) * static_cast<acc>(features[d * plane + offset]);
    }
    atomicAdd(grad_attention + p.box_batch[k] * plane + offset,
              static_cast<scalar>(attention_grad(g_dot_f, g_dot_r, ws)));
  }
}

}  // namespace

cudaError_t launch_mark_inside(const int64_t* ranges, const int64_t* box_batch, int64_t num_boxes, int64_t height,
                               int64_t width, uint8_t* inside, cudaStream_t stream) {
  if (num_boxes == 0) return cudaSuccess;
  mark_inside_kernel<<<static_cast<unsigned>(num_boxes), kThreads, 0, stream>>>(ranges, box_batch, height, width,
                                                                                inside);
  return cudaGetLastError();
}

template <typename scalar>
cudaError_t launch_attention_forward(const AttentionProblem<scalar>& p, const scalar* dots, scalar* attention,
                                     cudaStream_t stream) {
  const int64_t n = p.batch * p.pixels;
  if (n == 0) return cudaSuccess;
  attention_forward_kernel<scalar><<<blocks_for(n), kThreads, 0, stream>>>(p, dots, attention);
  return cudaGetLastError();
}

template <typename scalar>
cudaError_t launch_attention_backward(const AttentionProblem<scalar>& p, const scalar* grad_attention, scalar* dots,
                                      scalar* coef, cudaStream_t stream) {
  const int64_t n = p.batch * p.pixels;
  if (n == 0) return cudaSuccess;
  attention_backward_kernel<scalar><<<blocks_for(n), kThreads, 0, stream>>>(p, grad_attention, dots, coef);
  return cudaGetLastError();
}

template <typename scalar>
cudaError_t launch_pool_forward(const PoolProblem<scalar>& p, scalar* pooled, scalar* weight_sum, cudaStream_t stream) {
  const int64_t n = p.num_boxes * p.bins();
  if (n == 0) return cudaSuccess;
  pool_forward_kernel<scalar><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(p, pooled, weight_sum);
  return cudaGetLastError();
}

template <typename scalar>
cudaError_t launch_pool_backward(const PoolProblem<scalar>& p, const scalar* grad_pooled, const scalar* pooled,
                                 const scalar* weight_sum, scalar* grad_features, scalar* grad_attention,
                                 cudaStream_t stream) {
  const int64_t n = p.num_boxes * p.bins();
  if (n == 0) return cudaSuccess;
  pool_backward_features_kernel<scalar>
      <<<static_cast<unsigned>(n), kThreads, 0, stream>>>(p, grad_pooled, weight_sum, grad_features);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  pool_backward_attention_kernel<scalar>
      <<<static_cast<unsigned>(n), kThreads, 0, stream>>>(p, grad_pooled, pooled, weight_sum, grad_attention);
  return cudaGetLastError();
}

#define BOXLOSS_INSTANTIATE(scalar)                                                                               \
  template cudaError_t launch_attention_forward<scalar>(const AttentionProblem<scalar>&, const scalar*, scalar*,  \
                                                        cudaStream_t);                                            \
  template cudaError_t launch_attention_backward<scalar>(const AttentionProblem<scalar>&, const scalar*, scalar*, \
                                                         scalar*, cudaStream_t);                                  \
  template cudaError_t launch_pool_forward<scalar>(const PoolProblem<scalar>&, scalar*, scalar*, cudaStream_t);   \
  template cudaError_t launch_pool_backward<scalar>(const PoolProblem<scalar>&, const scalar*, const scalar*,     \
                                                    const scalar*, scalar*, scalar*, cudaStream_t);
BOXLOSS_INSTANTIATE(float)
BOXLOSS_INSTANTIATE(double)
#undef BOXLOSS_INSTANTIATE

}  // namespace cuda
}  // namespace background_attention
}  // namespace boxloss
