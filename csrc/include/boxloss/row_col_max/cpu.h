// Torch-free CPU core of the box row/column-max primitive.  It works on a
// range of boxes, so the caller chooses the parallelism.
#pragma once

#include <cstdint>
#include <vector>

#include "boxloss/row_col_max/problem.h"

namespace boxloss {
namespace row_col_max {
namespace cpu {

// ranges[k] and status[k] for boxes k in [begin, end): the covered pixels
// (box_pixels) and the BoxStatus bits.  `boxes` is (num_boxes, 4) double.
void resolve_boxes(const double* boxes, const int64_t* box_batch, const int64_t* box_labels, int64_t begin, int64_t end,
                   double spatial_scale, int64_t batch, int64_t num_channels, int64_t height, int64_t width,
                   int64_t* ranges, int32_t* status);

// Row and column maxima of boxes k in [begin, end) (float or double).
template <typename scalar>
void forward_boxes(const Problem& problem, int64_t begin, int64_t end, const Outputs<scalar>& out);

// The boxes grouped by the (image, channel) plane their pixels lie in, in box
// order within a plane, so that the backward can run plane by plane in
// parallel without atomics.  Empty boxes are left out.
struct BackwardPlan {
  std::vector<int64_t> plane_offsets;  // (num_planes + 1,)
  std::vector<int64_t> boxes;          // box indices, plane by plane
  bool valid = true;                   // false: an index is below -1, past the last plane, or a box's
                                       // indices span two planes (not the forward's output)
};

BackwardPlan plan_backward(int64_t num_boxes, int64_t num_planes, int64_t height, int64_t width,
                           const int64_t* row_index, const int64_t* col_index);

// For planes p in [plane_begin, plane_end): zeroes grad's plane p, then adds
// grad_max at the arg-max index of every row and column maximum of the plane's
// boxes (rows then columns of each box, boxes in order), so the result is
// deterministic and independent of the split into ranges.
template <typename scalar>
void backward_planes(const BackwardPlan& plan, int64_t plane_begin, int64_t plane_end, int64_t height, int64_t width,
                     const scalar* grad_row_max, const scalar* grad_col_max, const int64_t* row_index,
                     const int64_t* col_index, scalar* grad);

// Both steps over all num_planes planes; grad need not be zeroed.  Writes
// nothing when the plan is not valid.
template <typename scalar>
void backward_boxes(int64_t num_boxes, int64_t num_planes, int64_t height, int64_t width, const scalar* grad_row_max,
                    const scalar* grad_col_max, const int64_t* row_index, const int64_t* col_index, scalar* grad);

}  // namespace cpu
}  // namespace row_col_max
}  // namespace boxloss
