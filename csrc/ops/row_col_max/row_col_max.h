// Device-independent part of the boxloss::box_row_col_max ops: argument checks
// (one place for the box convention's errors) and the Problem the kernels read.
#pragma once

#include <ATen/ATen.h>

#include "boxloss/row_col_max/problem.h"

namespace boxloss {
namespace ops {

struct RowColMaxCall {
  at::Tensor probs;              // contiguous, float or double (float16/bfloat16 run in float)
  at::Tensor boxes;              // (K, 4) contiguous double
  at::Tensor box_batch;          // (K,) contiguous int64
  at::Tensor box_labels;         // (K,) contiguous int64
  row_col_max::Problem problem;  // ranges filled in by the caller after resolving the boxes
};

// Checks shapes, dtypes, devices and spatial_scale (TypeError / ValueError
// naming the argument and what it got) and prepares the buffers.
RowColMaxCall prepare_row_col_max_call(const at::Tensor& probs, const at::Tensor& boxes, const at::Tensor& box_batch,
                                       const at::Tensor& box_labels, double spatial_scale);

// Raises a ValueError naming the first bad box and what is wrong with it when
// a BoxStatus bit is set.  `status` holds one int per box, on the CPU.
void raise_for_box_status(const at::Tensor& status, const RowColMaxCall& call);
void raise_for_box_status(const char* op, const at::Tensor& status, const at::Tensor& boxes,
                          const at::Tensor& box_batch, const at::Tensor& box_labels, int64_t batch,
                          int64_t num_channels);

// Raises when a box's covered pixels hold NaN.  `status` on the CPU.
void raise_for_probs_status(const at::Tensor& status);

// The float or double dtype the kernels run in for `dtype`.
at::ScalarType row_col_max_compute_dtype(at::ScalarType dtype);

// The backward's arguments, checked and made contiguous in the compute dtype.
struct RowColMaxBackwardCall {
  at::Tensor grad_row_max, grad_col_max, row_index, col_index;
  at::ScalarType dtype;  // float or double
  int64_t num_boxes, height, width;
};

RowColMaxBackwardCall prepare_row_col_max_backward(const at::Tensor& grad_row_max, const at::Tensor& grad_col_max,
                                                   const at::Tensor& row_index, const at::Tensor& col_index,
                                                   at::IntArrayRef probs_shape);

}  // namespace ops
}  // namespace boxloss
