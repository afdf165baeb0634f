// CPU core of the box row/column-max primitive.  Each box's covered region of
// its class plane is read once, row by row: the row's maximum is a reduction
// over unit-stride memory, the column maxima an element-wise update of a
// small buffer, and both inner loops are branch-free so that they vectorise.
#include "boxloss/row_col_max/cpu.h"

#include <vector>

#include "boxloss/common/cpu_clones.h"

namespace boxloss {
namespace row_col_max {
namespace cpu {
namespace {

// Maximum of x[0..n), n >= 1, in independent partial maxima so the compiler
// vectorises the reduction (NaN is detected separately by the caller).
template <typename scalar>
BOXLOSS_ALWAYS_INLINE scalar row_maximum(const scalar* __restrict x, int64_t n) {
  constexpr int kLanes = 8;
  scalar partial[kLanes];
  for (int l = 0; l < kLanes; ++l) partial[l] = x[0];
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) partial[l] = x[j + l] > partial[l] ? x[j + l] : partial[l];
  }
  for (; j < n; ++j) partial[0] = x[j] > partial[0] ? x[j] : partial[0];
  scalar best = partial[0];
  for (int l = 1; l < kLanes; ++l) best = partial[l] > best ? partial[l] : best;
  return best;
}

template <typename scalar>
BOXLOSS_CPU_CLONES void forward_box(const Problem& problem, int64_t k, const Outputs<scalar>& out,
                                    scalar* __restrict col_best, int64_t* __restrict col_row) {
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
  const int64_t n = col_end - col_begin;
  int64_t nan_count = 0;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const scalar* __restrict x = plane + r * width + col_begin;
    const scalar m = row_maximum(x, n);
    int64_t arg = 0;
    while (arg < n - 1 && !(x[arg] == m)) ++arg;  // the first maximum: the lowest index
    row_max[r] = m;
    row_index[r] = base + r * width + col_begin + arg;
    if (r == row_begin) {
      for (int64_t j = 0; j < n; ++j) {
        col_best[j] = x[j];
        col_row[j] = r;
        nan_count += x[j] != x[j];
      }
    } else {
      // Strictly greater: of equal values the earlier row (lower index) stays.
      for (int64_t j = 0; j < n; ++j) {
        const bool greater = x[j] > col_best[j];
        col_best[j] = greater ? x[j] : col_best[j];
        col_row[j] = greater ? r : col_row[j];
        nan_count += x[j] != x[j];
      }
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    col_max[col_begin + j] = col_best[j];
    col_index[col_begin + j] = base + col_row[j] * width + col_begin + j;
  }
  if (nan_count != 0) out.status[k] = kProbsNaN;
}

}  // namespace

void resolve_boxes(const double* boxes, const int64_t* box_batch, const int64_t* box_labels, int64_t begin,
                   int64_t end, double spatial_scale, int64_t batch, int64_t num_channels, int64_t height,
                   int64_t width, int64_t* ranges, int32_t* status) {
  for (int64_t k = begin; k < end; ++k) {
    const double* b = boxes + 4 * k;
    status[k] = boxes::box_status(b[0], b[1], b[2], b[3], box_batch[k], box_labels[k], batch, num_channels);
    const boxes::BoxPixels px = status[k] == 0
                                    ? boxes::box_pixels(b[0], b[1], b[2], b[3], spatial_scale, height, width)
                                    : boxes::BoxPixels{0, 0, 0, 0};
    ranges[4 * k + 0] = px.row_begin;
    ranges[4 * k + 1] = px.row_end;
    ranges[4 * k + 2] = px.col_begin;
    ranges[4 * k + 3] = px.col_end;
  }
}

template <typename scalar>
void forward_boxes(const Problem& problem, int64_t begin, int64_t end, const Outputs<scalar>& out) {
  std::vector<scalar> col_best(static_cast<size_t>(problem.width));
  std::vector<int64_t> col_row(static_cast<size_t>(problem.width));
  for (int64_t k = begin; k < end; ++k) forward_box<scalar>(problem, k, out, col_best.data(), col_row.data());
}

template <typename scalar>
void backward_boxes(int64_t num_boxes, int64_t height, int64_t width, const scalar* grad_row_max,
                    const scalar* grad_col_max, const int64_t* row_index, const int64_t* col_index,
                    scalar* grad) {
  for (int64_t k = 0; k < num_boxes; ++k) {
    for (int64_t r = k * height; r < (k + 1) * height; ++r) {
      if (row_index[r] >= 0) grad[row_index[r]] += grad_row_max[r];
    }
    for (int64_t c = k * width; c < (k + 1) * width; ++c) {
      if (col_index[c] >= 0) grad[col_index[c]] += grad_col_max[c];
    }
  }
}

template void forward_boxes<float>(const Problem&, int64_t, int64_t, const Outputs<float>&);
template void forward_boxes<double>(const Problem&, int64_t, int64_t, const Outputs<double>&);
template void backward_boxes<float>(int64_t, int64_t, int64_t, const float*, const float*, const int64_t*,
                                    const int64_t*, float*);
template void backward_boxes<double>(int64_t, int64_t, int64_t, const double*, const double*, const int64_t*,
                                     const int64_t*, double*);

}  // namespace cpu
}  // namespace row_col_max
}  // namespace boxloss
