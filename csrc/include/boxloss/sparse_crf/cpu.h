// Torch-free CPU core of the Sparse-CRF loss.  It works on a range of image
// rows, so the caller chooses the parallelism (at::parallel_for in the torch
// op, a plain loop in the C++ unit tests).  Rows are numbered b * height + y.
#pragma once

#include <cstdint>

#include "boxloss/sparse_crf/problem.h"

namespace boxloss {
namespace sparse_crf {
namespace cpu {

// Forward: for each row r in [row_begin, row_end), row_sums[r] receives the
// sum over pairs whose first pixel p lies in row r of w_pq * sum_c phi, and
// row_status[r] the StatusBits of the row's inputs.  Not yet divided by |P|.
template <typename scalar>
void forward_rows(const Problem& problem, int64_t row_begin, int64_t row_end, double* row_sums, int32_t* row_status);

// Backward: for each row in [row_begin, row_end) and each selected channel c,
//   grad[b, c, y, x] = image_scale[b] * sum_{q ~ p} w_pq * d phi(x_p^c, x_q^c) / d x_p^c
// over all neighbours q of p (both directions).  Unselected channels are not
// written.  image_scale[b] is dL/dloss_b / |P_b|.
template <typename scalar>
void backward_rows(const Problem& problem, const acc_t<scalar>* image_scale, int64_t row_begin, int64_t row_end,
                   scalar* grad);

}  // namespace cpu
}  // namespace sparse_crf
}  // namespace boxloss
