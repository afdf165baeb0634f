// CPU core of the box row/column-max primitive.  Each box's covered region of
// its class plane is read once, row by row: the row's maximum is a reduction
// over unit-stride memory, the column maxima an element-wise update of a
// small buffer, and both inner loops are branch-free so that they vectorise.
#include "boxloss/row_col_max/cpu.h"

#include <algorithm>
#include <vector>

#include "boxloss/common/cpu_clones.h"

namespace boxloss {
namespace row_col_max {
namespace cpu {
namespace {

// Maximum of x[0..n), n >= 1, and its first index.  Each of kLanes partial
// maxima keeps the first index where its lane reached its value (strictly
// greater replaces), so the loop vectorises; the lanes are then merged taking,
// of equal values, the lowest index.
template <typename scalar>
BOXLOSS_ALWAYS_INLINE void row_maximum(const scalar* __restrict x, int32_t n, scalar& best, int32_t& arg) {
  constexpr int32_t kLanes = 16;
  best = x[0];
  arg = 0;
  if (n < 2 * kLanes) {
    for (int32_t j = 1; j < n; ++j) {
      if (x[j] > best) {
        best = x[j];
        arg = j;
      }
    }
    return;
  }
  scalar value[kLanes];
  int32_t index[kLanes];
  for (int32_t l = 0; l < kLanes; ++l) {
    value[l] = x[l];
    index[l] = l;
  }
  int32_t j = kLanes;
  for (; j + kLanes <= n; j += kLanes) {
    for (int32_t l = 0; l < kLanes; ++l) {
      const bool greater = x[j + l] > value[l];
      value[l] = greater ? x[j + l] : value[l];
      index[l] = greater ? j + l : index[l];
    }
  }
  for (; j < n; ++j) {  // the tail goes to lane 0, whose indices are all lower
    if (x[j] > value[0]) {
      value[0] = x[j];
      index[0] = j;
    }
  }
  best = value[0];
  arg = index[0];
  for (int32_t l = 1; l < kLanes; ++l) {
    if (value[l] > best || (value[l] == best && index[l] < arg)) {
      best = value[l];
      arg = index[l];
    }
  }
}

template <typename scalar>
BOXLOSS_CPU_CLONES void forward_box(const Problem& problem, int64_t k, const Outputs<scalar>& out,
                                    scalar* __restrict col_best, int32_t* __restrict col_row) {
  const int64_t height = problem.height, width = problem.width;
  scalar* row_max = out.row_max + k * height;
  int64_t* row_index = out.row_index + k * height;
  scalar* col_max = out.col_max + k * width;
  int64_t* col_index = out.col_index + k * width;
  for (int64_t r = 0; r < height; ++r) {
    row_max[r] = scalar(0);
    row_index[r] = -1;
  }
  for (int64_t c = 0; c < width; ++c) {
    col_max[c] = scalar(0);
    col_index[c] = -1;
  }
  out.status[k] = 0;
  const int64_t* range = problem.ranges + 4 * k;
  const int64_t row_begin = range[0], row_end = range[1], col_begin = range[2], col_end = range[3];
  if (row_end <= row_begin || col_end <= col_begin) return;

  const int64_t base = problem.plane_offset(k);
  const scalar* plane = static_cast<const scalar*>(problem.probs) + base;
  const int32_t n = static_cast<int32_t>(col_end - col_begin);
  int32_t nan_count = 0;
  {
    const scalar* __restrict x = plane + row_begin * width + col_begin;
    for (int32_t j = 0; j < n; ++j) {
      col_best[j] = x[j];
      col_row[j] = static_cast<int32_t>(row_begin);
    }
  }
  for (int64_t r = row_begin; r < row_end; ++r) {
    const scalar* __restrict x = plane + r * width + col_begin;
    scalar m;
    int32_t arg;
    row_maximum(x, n, m, arg);
    row_max[r] = m;
    row_index[r] = base + r * width + col_begin + arg;
    const int32_t row = static_cast<int32_t>(r);
    // Strictly greater: of equal values the earlier row (lower index) stays.
    for (int32_t j = 0; j < n; ++j) {
      const bool greater = x[j] > col_best[j];
      col_best[j] = greater ? x[j] : col_best[j];
      col_row[j] = greater ? row : col_row[j];
      nan_count += x[j] != x[j];
    }
  }
  for (int32_t j = 0; j < n; ++j) {
    col_max[col_begin + j] = col_best[j];
    col_index[col_begin + j] = base + static_cast<int64_t>(col_row[j]) * width + col_begin + j;
  }
  if (nan_count != 0) out.status[k] = kProbsNaN;
}

}  // namespace

void resolve_boxes(const double* boxes, const int64_t* box_batch, const int64_t* box_labels, int64_t begin, int64_t end,
                   double spatial_scale, int64_t batch, int64_t num_channels, int64_t height, int64_t width,
                   int64_t* ranges, int32_t* status) {
  for (int64_t k = begin; k < end; ++k) {
    resolve_box(boxes, box_batch, box_labels, k, spatial_scale, batch, num_channels, height, width, ranges, status);
  }
}

template <typename scalar>
void forward_boxes(const Problem& problem, int64_t begin, int64_t end, const Outputs<scalar>& out) {
  std::vector<scalar> col_best(static_cast<size_t>(problem.width));
  std::vector<int32_t> col_row(static_cast<size_t>(problem.width));
  for (int64_t k = begin; k < end; ++k) forward_box<scalar>(problem, k, out, col_best.data(), col_row.data());
}

BackwardPlan plan_backward(int64_t num_boxes, int64_t num_planes, int64_t height, int64_t width,
                           const int64_t* row_index, const int64_t* col_index) {
  const int64_t plane_size = height * width;
  std::vector<int64_t> box_plane(static_cast<size_t>(num_boxes), -1);
  BackwardPlan plan;
  plan.plane_offsets.assign(static_cast<size_t>(num_planes + 1), 0);
  for (int64_t k = 0; k < num_boxes && plan.valid; ++k) {
    // Every index of a box must lie in one plane, the box's, or the planes
    // could not be processed independently (and a bad index would write
    // outside grad).
    const int64_t* lists[2] = {row_index + k * height, col_index + k * width};
    const int64_t sizes[2] = {height, width};
    for (int list = 0; list < 2; ++list) {
      for (int64_t i = 0; i < sizes[list]; ++i) {
        const int64_t index = lists[list][i];
        if (index < 0) {
          plan.valid = plan.valid && index == -1;
          continue;
        }
        const int64_t p = index / plane_size;
        if (p >= num_planes || (box_plane[k] >= 0 && p != box_plane[k])) plan.valid = false;
        box_plane[k] = p;
      }
    }
    if (box_plane[k] >= 0 && plan.valid) ++plan.plane_offsets[box_plane[k] + 1];
  }
  if (!plan.valid) return plan;
  for (int64_t p = 0; p < num_planes; ++p) plan.plane_offsets[p + 1] += plan.plane_offsets[p];
  plan.boxes.resize(static_cast<size_t>(plan.plane_offsets[num_planes]));
  std::vector<int64_t> next(plan.plane_offsets.begin(), plan.plane_offsets.end() - 1);
  for (int64_t k = 0; k < num_boxes; ++k) {
    if (box_plane[k] >= 0) plan.boxes[next[box_plane[k]]++] = k;
  }
  return plan;
}

template <typename scalar>
void backward_planes(const BackwardPlan& plan, int64_t plane_begin, int64_t plane_end, int64_t height, int64_t width,
                     const scalar* grad_row_max, const scalar* grad_col_max, const int64_t* row_index,
                     const int64_t* col_index, scalar* grad) {
  const int64_t plane_size = height * width;
  for (int64_t p = plane_begin; p < plane_end; ++p) {
    std::fill(grad + p * plane_size, grad + (p + 1) * plane_size, scalar(0));
    for (int64_t i = plan.plane_offsets[p]; i < plan.plane_offsets[p + 1]; ++i) {
      const int64_t k = plan.boxes[i];
      for (int64_t r = k * height; r < (k + 1) * height; ++r) {
        if (row_index[r] >= 0) grad[row_index[r]] += grad_row_max[r];
      }
      for (int64_t c = k * width; c < (k + 1) * width; ++c) {
        if (col_index[c] >= 0) grad[col_index[c]] += grad_col_max[c];
      }
    }
  }
}

template <typename scalar>
void backward_boxes(int64_t num_boxes, int64_t num_planes, int64_t height, int64_t width, const scalar* grad_row_max,
                    const scalar* grad_col_max, const int64_t* row_index, const int64_t* col_index, scalar* grad) {
  const BackwardPlan plan = plan_backward(num_boxes, num_planes, height, width, row_index, col_index);
  if (!plan.valid) return;
  backward_planes(plan, 0, num_planes, height, width, grad_row_max, grad_col_max, row_index, col_index, grad);
}

template void forward_boxes<float>(const Problem&, int64_t, int64_t, const Outputs<float>&);
template void forward_boxes<double>(const Problem&, int64_t, int64_t, const Outputs<double>&);
template void backward_planes<float>(const BackwardPlan&, int64_t, int64_t, int64_t, int64_t, const float*,
                                     const float*, const int64_t*, const int64_t*, float*);
template void backward_planes<double>(const BackwardPlan&, int64_t, int64_t, int64_t, int64_t, const double*,
                                      const double*, const int64_t*, const int64_t*, double*);
template void backward_boxes<float>(int64_t, int64_t, int64_t, int64_t, const float*, const float*, const int64_t*,
                                    const int64_t*, float*);
template void backward_boxes<double>(int64_t, int64_t, int64_t, int64_t, const double*, const double*, const int64_t*,
                                     const int64_t*, double*);

}  // namespace cpu
}  // namespace row_col_max
}  // namespace boxloss
