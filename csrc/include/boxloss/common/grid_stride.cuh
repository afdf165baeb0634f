// Grid-stride loops of the CUDA kernels: the grid a launch over `work` items
// gets, and a thread's first index and stride.  Device code only: included by
// .cu files.
#pragma once

#include <algorithm>
#include <cstdint>

namespace boxloss {
namespace cuda_common {

// Blocks of kThreads threads for `work` items: one item per thread up to
// 65535 * 8 blocks, at least one block; the kernels loop with global_stride
// over the rest.
template <int kThreads>
inline int grid_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 65535 * 8)));
}

__device__ __forceinline__ int64_t global_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t global_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

}  // namespace cuda_common
}  // namespace boxloss
