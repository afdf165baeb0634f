// CPU kernels of the box row/column-max ops: at::parallel_for over boxes
// around the torch-free core of csrc/kernels/row_col_max.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "boxloss/row_col_max/cpu.h"
#include "row_col_max.h"

namespace boxloss {
namespace ops {
namespace {

using Result = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename scalar>
row_col_max::Outputs<scalar> outputs_of(at::Tensor& row_max, at::Tensor& row_index, at::Tensor& col_max,
                                        at::Tensor& col_index, at::Tensor& status) {
  row_col_max::Outputs<scalar> out;
  out.row_max = row_max.data_ptr<scalar>();
  out.row_index = row_index.data_ptr<int64_t>();
  out.col_max = col_max.data_ptr<scalar>();
  out.col_index = col_index.data_ptr<int64_t>();
  out.status = status.data_ptr<int32_t>();
  return out;
}

Result box_row_col_max_cpu(const at::Tensor& probs, const at::Tensor& boxes, const at::Tensor& box_batch,
                           const at::Tensor& box_labels, double spatial_scale) {
  RowColMaxCall call = prepare_row_col_max_call(probs, boxes, box_batch, box_labels, spatial_scale);
  row_col_max::Problem& p = call.problem;
  const auto index_options = probs.options().dtype(at::kLong);
  at::Tensor ranges = at::empty({p.num_boxes, 4}, index_options);
  at::Tensor status = at::zeros({p.num_boxes}, probs.options().dtype(at::kInt));
  row_col_max::cpu::resolve_boxes(call.boxes.data_ptr<double>(), p.box_batch, p.box_labels, 0, p.num_boxes,
                                  spatial_scale, p.batch, p.num_channels, p.height, p.width, ranges.data_ptr<int64_t>(),
                                  status.data_ptr<int32_t>());
  raise_for_box_status(status, call);
  p.ranges = ranges.data_ptr<int64_t>();

  at::Tensor row_max = at::empty({p.num_boxes, p.height}, call.probs.options());
  at::Tensor col_max = at::empty({p.num_boxes, p.width}, call.probs.options());
  at::Tensor row_index = at::empty({p.num_boxes, p.height}, index_options);
  at::Tensor col_index = at::empty({p.num_boxes, p.width}, index_options);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, p.plane()));
  at::parallel_for(0, p.num_boxes, grain, [&](int64_t begin, int64_t end) {
    if (call.probs.scalar_type() == at::kDouble) {
      row_col_max::cpu::forward_boxes<double>(p, begin, end,
                                              outputs_of<double>(row_max, row_index, col_max, col_index, status));
    } else {
      row_col_max::cpu::forward_boxes<float>(p, begin, end,
                                             outputs_of<float>(row_max, row_index, col_max, col_index, status));
    }
  });
  raise_for_probs_status(status);
  return {row_max.to(probs.scalar_type()), col_max.to(probs.scalar_type()), row_index, col_index, ranges};
}

at::Tensor box_row_col_max_backward_cpu(const at::Tensor& grad_row_max, const at::Tensor& grad_col_max,
                                        const at::Tensor& row_index, const at::Tensor& col_index,
                                        at::IntArrayRef probs_shape) {
  const RowColMaxBackwardCall call =
      prepare_row_col_max_backward(grad_row_max, grad_col_max, row_index, col_index, probs_shape);
  const at::ScalarType dtype = call.dtype;
  const at::Tensor &grow = call.grad_row_max, &gcol = call.grad_col_max;
  const at::Tensor &rindex = call.row_index, &cindex = call.col_index;
  // Each plane is zeroed and scattered into by one task, while it is in cache.
  at::Tensor grad = at::empty(probs_shape, grow.options());
  const int64_t K = call.num_boxes, H = call.height, W = call.width;
  const int64_t planes = probs_shape[0] * probs_shape[1];
  const row_col_max::cpu::BackwardPlan plan =
      row_col_max::cpu::plan_backward(K, planes, H, W, rindex.data_ptr<int64_t>(), cindex.data_ptr<int64_t>());
  TORCH_CHECK_VALUE(plan.valid,
                    "_box_row_col_max_backward: row_index and col_index must be the indices "
                    "box_row_col_max returned for a probs of shape ",
                    probs_shape, " (each box's indices in one plane, -1 where a box has no row or column)");
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, H * W));
  at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
    if (dtype == at::kDouble) {
      row_col_max::cpu::backward_planes<double>(plan, begin, end, H, W, grow.data_ptr<double>(),
                                                gcol.data_ptr<double>(), rindex.data_ptr<int64_t>(),
                                                cindex.data_ptr<int64_t>(), grad.data_ptr<double>());
    } else {
      row_col_max::cpu::backward_planes<float>(plan, begin, end, H, W, grow.data_ptr<float>(), gcol.data_ptr<float>(),
                                               rindex.data_ptr<int64_t>(), cindex.data_ptr<int64_t>(),
                                               grad.data_ptr<float>());
    }
  });
  return grad.to(grad_row_max.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(boxloss, CPU, m) {
  m.impl("box_row_col_max", &box_row_col_max_cpu);
  m.impl("_box_row_col_max_backward", &box_row_col_max_backward_cpu);
}

}  // namespace ops
}  // namespace boxloss
