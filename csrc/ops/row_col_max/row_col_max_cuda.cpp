// CUDA kernels of the box row/column-max ops: device guard, current stream
// and buffers around the torch-free launchers of csrc/kernels/row_col_max.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "boxloss/row_col_max/cuda.h"
#include "row_col_max.h"

namespace boxloss {
namespace ops {
namespace {

using Result = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename scalar>
cudaError_t launch_forward(const row_col_max::Problem& p, at::Tensor& row_max, at::Tensor& row_index,
                           at::Tensor& col_max, at::Tensor& col_index, at::Tensor& status) {
  row_col_max::Outputs<scalar> out;
  out.row_max = row_max.data_ptr<scalar>();
  out.row_index = row_index.data_ptr<int64_t>();
  out.col_max = col_max.data_ptr<scalar>();
  out.col_index = col_index.data_ptr<int64_t>();
  out.status = status.data_ptr<int32_t>();
  return row_col_max::cuda::launch_forward<scalar>(p, out, at::cuda::getCurrentCUDAStream());
}

Result box_row_col_max_cuda(const at::Tensor& probs, const at::Tensor& boxes, const at::Tensor& box_batch,
                            const at::Tensor& box_labels, double spatial_scale) {
  const c10::cuda::CUDAGuard guard(probs.device());
  RowColMaxCall call = prepare_row_col_max_call(probs, boxes, box_batch, box_labels, spatial_scale);
  row_col_max::Problem& p = call.problem;
  const auto index_options = probs.options().dtype(at::kLong);
  at::Tensor ranges = at::empty({p.num_boxes, 4}, index_options);
  at::Tensor status = at::zeros({p.num_boxes}, probs.options().dtype(at::kInt));
  C10_CUDA_CHECK(row_col_max::cuda::launch_resolve_boxes(
      call.boxes.data_ptr<double>(), p.box_batch, p.box_labels, p.num_boxes, spatial_scale, p.batch, p.num_channels,
      p.height, p.width, ranges.data_ptr<int64_t>(), status.data_ptr<int32_t>(), at::cuda::getCurrentCUDAStream()));
  // One small device-to-host copy: bad boxes raise instead of reading out of bounds.
  raise_for_box_status(status.cpu(), call);
  p.ranges = ranges.data_ptr<int64_t>();

  at::Tensor row_max = at::empty({p.num_boxes, p.height}, call.probs.options());
  at::Tensor col_max = at::empty({p.num_boxes, p.width}, call.probs.options());
  at::Tensor row_index = at::empty({p.num_boxes, p.height}, index_options);
  at::Tensor col_index = at::empty({p.num_boxes, p.width}, index_options);
  if (call.probs.scalar_type() == at::kDouble) {
    C10_CUDA_CHECK(launch_forward<double>(p, row_max, row_index, col_max, col_index, status));
  } else {
    C10_CUDA_CHECK(launch_forward<float>(p, row_max, row_index, col_max, col_index, status));
  }
  raise_for_probs_status(status.cpu());
  return {row_max.to(probs.scalar_type()), col_max.to(probs.scalar_type()), row_index, col_index, ranges};
}

at::Tensor box_row_col_max_backward_cuda(const at::Tensor& grad_row_max, const at::Tensor& grad_col_max,
                                         const at::Tensor& row_index, const at::Tensor& col_index,
                                         at::IntArrayRef probs_shape) {
  const c10::cuda::CUDAGuard guard(grad_row_max.device());
  const RowColMaxBackwardCall call =
      prepare_row_col_max_backward(grad_row_max, grad_col_max, row_index, col_index, probs_shape);
  const at::ScalarType dtype = call.dtype;
  const at::Tensor &grow = call.grad_row_max, &gcol = call.grad_col_max;
  const at::Tensor &rindex = call.row_index, &cindex = call.col_index;
  const int64_t K = call.num_boxes, H = call.height, W = call.width;
  if (K > 0) {
    // A bad index would write outside grad: one small reduction and host copy.
    const at::Tensor bounds =
        at::stack({at::minimum(rindex.min(), cindex.min()), at::maximum(rindex.max(), cindex.max())}).cpu();
    const int64_t numel = c10::multiply_integers(probs_shape);
    TORCH_CHECK_VALUE(bounds[0].item<int64_t>() >= -1 && bounds[1].item<int64_t>() < numel,
                      "_box_row_col_max_backward: row_index and col_index must be the indices box_row_col_max "
                      "returned for a probs of shape ",
                      probs_shape, " (in [-1, ", numel, "))");
  }
  at::Tensor grad = at::zeros(probs_shape, grow.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (dtype == at::kDouble) {
    C10_CUDA_CHECK(row_col_max::cuda::launch_backward<double>(K, H, W, grow.data_ptr<double>(), gcol.data_ptr<double>(),
                                                              rindex.data_ptr<int64_t>(), cindex.data_ptr<int64_t>(),
                                                              grad.data_ptr<double>(), stream));
  } else {
    C10_CUDA_CHECK(row_col_max::cuda::launch_backward<float>(K, H, W, grow.data_ptr<float>(), gcol.data_ptr<float>(),
                                                             rindex.data_ptr<int64_t>(), cindex.data_ptr<int64_t>(),
                                                             grad.data_ptr<float>(), stream));
  }
  return grad.to(grad_row_max.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(boxloss, CUDA, m) {
  m.impl("box_row_col_max", &box_row_col_max_cuda);
  m.impl("_box_row_col_max_backward", &box_row_col_max_backward_cuda);
}

}  // namespace ops
}  // namespace boxloss
