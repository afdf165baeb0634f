// The block-wide sum of the CUDA kernels' deterministic reductions (partial
// sums per block, added in a fixed order by the torch wrappers).  Device code
// only: included by .cu files.
#pragma once

namespace boxloss {
namespace cuda_common {

// Sum of v over the kThreads threads of a block (a multiple of 32), in a fixed
// order: a shuffle tree within each warp, then one over the warp sums in the
// first warp.  The total is valid in thread 0.  Every thread of the block
// calls it; a kernel may call it more than once.
template <int kThreads, typename T>
__device__ __forceinline__ T block_sum(T v) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block_sum: whole warps, at most 1024 threads");
  __shared__ T warp_sums[kThreads / 32];
  for (int shift = 16; shift > 0; shift >>= 1) v += __shfl_down_sync(0xffffffffu, v, shift);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  __syncthreads();  // warp_sums may still be read by a previous call
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : T(0);
  if (warp == 0) {
    for (int shift = 16; shift > 0; shift >>= 1) v += __shfl_down_sync(0xffffffffu, v, shift);
  }
  return v;
}

}  // namespace cuda_common
}  // namespace boxloss
