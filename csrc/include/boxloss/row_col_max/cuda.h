// Torch-free launchers of the CUDA box row/column-max kernels.  The torch op
// allocates the buffers and passes its stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "boxloss/row_col_max/problem.h"

namespace boxloss {
namespace row_col_max {
namespace cuda {

// Device version of cpu::resolve_boxes over all boxes.
cudaError_t launch_resolve_boxes(const double* boxes, const int64_t* box_batch, const int64_t* box_labels,
                                 int64_t num_boxes, double spatial_scale, int64_t batch, int64_t num_channels,
                                 int64_t height, int64_t width, int64_t* ranges, int32_t* status, cudaStream_t stream);

// Row and column maxima of all boxes; out.status must be zeroed by the caller.
template <typename scalar>
cudaError_t launch_forward(const Problem& problem, const Outputs<scalar>& out, cudaStream_t stream);

// grad[index] += grad_max for every entry with index >= 0 (atomic adds; grad
// zeroed by the caller).
template <typename scalar>
cudaError_t launch_backward(int64_t num_boxes, int64_t height, int64_t width, const scalar* grad_row_max,
                            const scalar* grad_col_max, const int64_t* row_index, const int64_t* col_index,
                            scalar* grad, cudaStream_t stream);

}  // namespace cuda
}  // namespace row_col_max
}  // namespace boxloss
