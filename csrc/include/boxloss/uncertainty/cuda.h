// Torch-free launchers of the CUDA uncertainty kernels.  The torch ops
// (csrc/ops/uncertainty/uncertainty_cuda.cpp) allocate the buffers and pass
// their stream; these functions only launch and report the launch status.
// Scalar types: float and double (float16 / bfloat16 run in float).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "boxloss/uncertainty/problem.h"

namespace boxloss {
namespace uncertainty {
namespace cuda {

constexpr int kThreadsPerBlock = 256;

// status: one int32, zeroed by the caller; BinaryStatus bits are OR-ed in.
template <typename scalar>
cudaError_t launch_binary_forward(const BinaryProblem& problem, scalar* loss, int32_t* status, cudaStream_t stream);

template <typename scalar>
cudaError_t launch_binary_backward(const BinaryProblem& problem, const scalar* grad, scalar* grad_mu,
                                   scalar* grad_log_var, cudaStream_t stream);

// status: one int32, zeroed by the caller; ClassStatus bits are OR-ed in.
template <typename scalar>
cudaError_t launch_class_forward(const ClassProblem& problem, scalar* loss, scalar* sample_lse, int32_t* status,
                                 cudaStream_t stream);

template <typename scalar>
cudaError_t launch_class_backward(const ClassProblem& problem, const scalar* grad, const scalar* sample_lse,
                                  scalar* grad_mu, scalar* grad_log_var, cudaStream_t stream);

}  // namespace cuda
}  // namespace uncertainty
}  // namespace boxloss
