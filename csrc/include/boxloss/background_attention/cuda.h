// Torch-free launchers of the CUDA background-attention and pooling kernels.
// The torch ops allocate the buffers and pass their stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "boxloss/background_attention/problem.h"

namespace boxloss {
namespace background_attention {
namespace cuda {

// As cpu::mark_inside over all boxes (inside zeroed by the caller).
cudaError_t launch_mark_inside(const int64_t* ranges, const int64_t* box_batch, int64_t num_boxes, int64_t height,
                               int64_t width, uint8_t* inside, cudaStream_t stream);

template <typename scalar>
cudaError_t launch_attention_forward(const AttentionProblem<scalar>& p, const scalar* dots, scalar* attention,
                                     cudaStream_t stream);

template <typename scalar>
cudaError_t launch_attention_backward(const AttentionProblem<scalar>& p, const scalar* grad_attention, scalar* dots,
                                      scalar* coef, cudaStream_t stream);

template <typename scalar>
cudaError_t launch_pool_forward(const PoolProblem<scalar>& p, scalar* pooled, scalar* weight_sum, cudaStream_t stream);

// Atomic adds into grad_features and grad_attention, zeroed by the caller.
template <typename scalar>
cudaError_t launch_pool_backward(const PoolProblem<scalar>& p, const scalar* grad_pooled, const scalar* pooled,
                                 const scalar* weight_sum, scalar* grad_features, scalar* grad_attention,
                                 cudaStream_t stream);

}  // namespace cuda
}  // namespace background_attention
}  // namespace boxloss
