// Torch-free launchers of the CUDA Sparse-CRF kernels.  The torch op
// (csrc/ops/sparse_crf/sparse_crf_cuda.cpp) allocates the buffers and passes
// its stream; these functions only launch and report the launch status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "boxloss/sparse_crf/problem.h"

namespace boxloss {
namespace sparse_crf {
namespace cuda {

// Storage type of probs and image; accumulation is float for the first three
// and double for kFloat64.
enum class DType : int32_t { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

constexpr int kThreadsPerBlock = 256;

// Number of partial sums the forward kernel writes per image.
int64_t forward_blocks_per_image(const Problem& problem);

// partial_sums: (batch, forward_blocks_per_image) of the accumulation type
// (float, or double for kFloat64), each the sum over one block of pixels of
// w_pq * sum_c phi, in a fixed order, so the loss is deterministic.
// status: (batch,) int32, zeroed by the caller; StatusBits are OR-ed in.
cudaError_t launch_forward(const Problem& problem, DType dtype, void* partial_sums, int32_t* status,
                           cudaStream_t stream);

// image_scale: (batch,) of the accumulation type, dL/dloss_b / |P_b|.
// grad: (batch, num_channels, height, width) of the storage type; selected
// channels are written, others left untouched.
cudaError_t launch_backward(const Problem& problem, DType dtype, const void* image_scale, void* grad,
                            cudaStream_t stream);

}  // namespace cuda
}  // namespace sparse_crf
}  // namespace boxloss
