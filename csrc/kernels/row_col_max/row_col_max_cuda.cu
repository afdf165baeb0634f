// CUDA kernels of the box row/column-max primitive.  Rows: one warp per (box,
// map row), lanes stride over the box's columns and reduce (value, index)
// pairs with shuffles.  Columns: one thread per (box, map column), walking
// down the box's rows, so a warp reads consecutive addresses.  Both keep the
// lowest index among equal maxima, as the CPU core does.  The box convention
// is the host/device code of boxloss/boxes/box_convention.h.
#include <algorithm>

#include "boxloss/row_col_max/cuda.h"

namespace boxloss {
namespace row_col_max {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;

__global__ void resolve_boxes_kernel(const double* __restrict boxes, const int64_t* __restrict box_batch,
                                     const int64_t* __restrict box_labels, int64_t num_boxes, double spatial_scale,
                                     int64_t batch, int64_t num_channels, int64_t height, int64_t width,
                                     int64_t* __restrict ranges, int32_t* __restrict status) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= num_boxes) return;
  resolve_box(boxes, box_batch, box_labels, k, spatial_scale, batch, num_channels, height, width, ranges, status);
}

template <typename scalar>
__global__ void row_max_kernel(Problem problem, Outputs<scalar> out) {
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (warp >= problem.num_boxes * problem.height) return;
  const int64_t k = warp / problem.height;
  const int64_t r = warp - k * problem.height;
  const int64_t* range = problem.ranges + 4 * k;
  const bool covered = r >= range[0] && r < range[1] && range[3] > range[2];
  if (!covered) {
    if (lane == 0) {
      out.row_max[warp] = scalar(0);
      out.row_index[warp] = -1;
    }
    return;
  }
  const int64_t base = problem.plane_offset(k);
  const scalar* row = static_cast<const scalar*>(problem.probs) + base + r * problem.width;
  scalar best = scalar(0);
  int64_t best_index = INT64_MAX;
  bool nan = false;
  for (int64_t c = range[2] + lane; c < range[3]; c += 32) {
    const scalar v = row[c];
    nan |= v != v;
    if (best_index == INT64_MAX || better(v, c, best, best_index)) {
      best = v;
      best_index = c;
    }
  }
  for (int shift = 16; shift > 0; shift >>= 1) {
    const scalar other = __shfl_down_sync(0xffffffffu, best, shift);
    const int64_t other_index = __shfl_down_sync(0xffffffffu, best_index, shift);
    if (other_index != INT64_MAX && (best_index == INT64_MAX || better(other, other_index, best, best_index))) {
      best = other;
      best_index = other_index;
    }
  }
  nan = __any_sync(0xffffffffu, nan);
  if (lane == 0) {
    out.row_max[warp] = best;
    out.row_index[warp] = base + r * problem.width + best_index;
    if (nan) atomicOr(out.status + k, kProbsNaN);
  }
}

template <typename scalar>
__global__ void col_max_kernel(Problem problem, Outputs<scalar> out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= problem.num_boxes * problem.width) return;
  const int64_t k = i / problem.width;
  const int64_t c = i - k * problem.width;
  const int64_t* range = problem.ranges + 4 * k;
  if (!(c >= range[2] && c < range[3] && range[1] > range[0])) {
    out.col_max[i] = scalar(0);
    out.col_index[i] = -1;
    return;
  }
  const int64_t base = problem.plane_offset(k);
  const scalar* column = static_cast<const scalar*>(problem.probs) + base + c;
  scalar best = column[range[0] * problem.width];
  int64_t best_row = range[0];
  bool nan = best != best;
  for (int64_t r = range[0] + 1; r < range[1]; ++r) {
    const scalar v = column[r * problem.width];
    nan |= v != v;
    if (v > best) {  // strictly: of equal values the upper row (lower index) stays
      best = v;
      best_row = r;
    }
  }
  out.col_max[i] = best;
  out.col_index[i] = base + best_row * problem.width + c;
  if (nan) atomicOr(out.status + k, kProbsNaN);
}

template <typename scalar>
__global__ void backward_kernel(int64_t rows, int64_t entries, const scalar* __restrict grad_row_max,
                                const scalar* __restrict grad_col_max, const int64_t* __restrict row_index,
                                const int64_t* __restrict col_index, scalar* __restrict grad) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= entries) return;
  if (i < rows) {
    if (row_index[i] >= 0) atomicAdd(grad + row_index[i], grad_row_max[i]);
  } else {
    const int64_t j = i - rows;
    if (col_index[j] >= 0) atomicAdd(grad + col_index[j], grad_col_max[j]);
  }
}

unsigned int blocks_for(int64_t items, int64_t per_block) {
  return static_cast<unsigned int>((items + per_block - 1) / per_block);
}

}  // namespace

cudaError_t launch_resolve_boxes(const double* boxes, const int64_t* box_batch, const int64_t* box_labels,
                                 int64_t num_boxes, double spatial_scale, int64_t batch, int64_t num_channels,
                                 int64_t height, int64_t width, int64_t* ranges, int32_t* status, cudaStream_t stream) {
  if (num_boxes == 0) return cudaSuccess;
  resolve_boxes_kernel<<<blocks_for(num_boxes, kThreads), kThreads, 0, stream>>>(
      boxes, box_batch, box_labels, num_boxes, spatial_scale, batch, num_channels, height, width, ranges, status);
  return cudaGetLastError();
}

template <typename scalar>
cudaError_t launch_forward(const Problem& problem, const Outputs<scalar>& out, cudaStream_t stream) {
  if (problem.num_boxes == 0) return cudaSuccess;
  row_max_kernel<scalar>
      <<<blocks_for(problem.num_boxes * problem.height, kWarpsPerBlock), kThreads, 0, stream>>>(problem, out);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  col_max_kernel<scalar>
      <<<blocks_for(problem.num_boxes * problem.width, kThreads), kThreads, 0, stream>>>(problem, out);
  return cudaGetLastError();
}

template <typename scalar>
cudaError_t launch_backward(int64_t num_boxes, int64_t height, int64_t width, const scalar* grad_row_max,
                            const scalar* grad_col_max, const int64_t* row_index, const int64_t* col_index,
                            scalar* grad, cudaStream_t stream) {
  const int64_t rows = num_boxes * height;
  const int64_t entries = rows + num_boxes * width;
  if (entries == 0) return cudaSuccess;
  backward_kernel<scalar><<<blocks_for(entries, kThreads), kThreads, 0, stream>>>(
      rows, entries, grad_row_max, grad_col_max, row_index, col_index, grad);
  return cudaGetLastError();
}

template cudaError_t launch_forward<float>(const Problem&, const Outputs<float>&, cudaStream_t);
template cudaError_t launch_forward<double>(const Problem&, const Outputs<double>&, cudaStream_t);
template cudaError_t launch_backward<float>(int64_t, int64_t, int64_t, const float*, const float*, const int64_t*,
                                            const int64_t*, float*, cudaStream_t);
template cudaError_t launch_backward<double>(int64_t, int64_t, int64_t, const double*, const double*, const int64_t*,
                                             const int64_t*, double*, cudaStream_t);

}  // namespace cuda
}  // namespace row_col_max
}  // namespace boxloss
