// Torch-free CPU core of the box row/column-max primitive.  It works on a
// range of boxes, so the caller chooses the parallelism.
#pragma once

#include <cstdint>

#include "boxloss/row_col_max/problem.h"

namespace boxloss {
namespace row_col_max {
namespace cpu {

// ranges[k] and status[k] for boxes k in [begin, end): the covered pixels
// (box_pixels) and the BoxStatus bits.  `boxes` is (num_boxes, 4) double.
void resolve_boxes(const double* boxes, const int64_t* box_batch, const int64_t* box_labels, int64_t begin,
                   int64_t end, double spatial_scale, int64_t batch, int64_t num_channels, int64_t height,
                   int64_t width, int64_t* ranges, int32_t* status);

// Row and column maxima of boxes k in [begin, end) (float or double).
template <typename scalar>
void forward_boxes(const Problem& problem, int64_t begin, int64_t end, const Outputs<scalar>& out);

// grad[index] += grad_max for every entry with index >= 0, entries taken in a
// fixed order (rows then columns of box 0, then box 1, ...), so the result is
// deterministic.  `grad` must be zeroed by the caller.
template <typename scalar>
void backward_boxes(int64_t num_boxes, int64_t height, int64_t width, const scalar* grad_row_max,
                    const scalar* grad_col_max, const int64_t* row_index, const int64_t* col_index,
                    scalar* grad);

}  // namespace cpu
}  // namespace row_col_max
}  // namespace boxloss
