// Schemas and device-independent checks of the box row/column-max ops.
#include "row_col_max.h"

#include <torch/library.h>

#include <sstream>

namespace boxloss {
namespace ops {
namespace {

constexpr const char* kOp = "box_row_col_max";

std::string shape_of(const at::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

}  // namespace

at::ScalarType row_col_max_compute_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

RowColMaxCall prepare_row_col_max_call(const at::Tensor& probs, const at::Tensor& boxes, const at::Tensor& box_batch,
                                       const at::Tensor& box_labels, double spatial_scale) {
  TORCH_CHECK_VALUE(probs.dim() == 4, kOp, ": probs must have shape (B, C, H, W), got shape ", shape_of(probs));
  const auto dtype = probs.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, kOp,
                   ": probs must be float16, bfloat16, float32 or float64, got ", dtype);
  const int64_t B = probs.size(0), C = probs.size(1), H = probs.size(2), W = probs.size(3);
  TORCH_CHECK_VALUE(B > 0 && C > 0 && H > 0 && W > 0, kOp, ": probs must be non-empty in every dimension, got shape ",
                    shape_of(probs));
  TORCH_CHECK_VALUE(boxes.dim() == 2 && boxes.size(1) == 4, kOp,
                    ": boxes must have shape (K, 4) holding x0, y0, x1, y1, got shape ", shape_of(boxes));
  TORCH_CHECK_TYPE(boxes.is_floating_point(), kOp, ": boxes must be a floating-point tensor, got ",
                   boxes.scalar_type());
  const int64_t K = boxes.size(0);
  TORCH_CHECK_VALUE(box_batch.dim() == 1 && box_batch.size(0) == K, kOp, ": box_batch must have shape (K,) = (", K,
                    ",), got shape ", shape_of(box_batch));
  TORCH_CHECK_VALUE(box_labels.dim() == 1 && box_labels.size(0) == K, kOp, ": box_labels must have shape (K,) = (", K,
                    ",), got shape ", shape_of(box_labels));
  TORCH_CHECK_TYPE(box_batch.scalar_type() == at::kLong, kOp, ": box_batch must be an int64 tensor, got ",
                   box_batch.scalar_type());
  TORCH_CHECK_TYPE(box_labels.scalar_type() == at::kLong, kOp, ": box_labels must be an int64 tensor, got ",
                   box_labels.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"boxes", &boxes},
                                {"box_batch", &box_batch},
                                {"box_labels", &box_labels}}) {
    TORCH_CHECK_VALUE(t->device() == probs.device(), kOp, ": ", name, " must be on the device of probs (",
                      probs.device(), "), got ", t->device());
  }
  TORCH_CHECK_VALUE(std::isfinite(spatial_scale) && spatial_scale > 0, kOp,
                    ": spatial_scale must be a positive finite number, got ", spatial_scale);

  RowColMaxCall call;
  call.probs = probs.to(row_col_max_compute_dtype(dtype)).contiguous();
  call.boxes = boxes.to(at::kDouble).contiguous();
  call.box_batch = box_batch.contiguous();
  call.box_labels = box_labels.contiguous();
  row_col_max::Problem& p = call.problem;
  p.probs = call.probs.data_ptr();
  p.box_batch = call.box_batch.data_ptr<int64_t>();
  p.box_labels = call.box_labels.data_ptr<int64_t>();
  p.batch = B;
  p.num_channels = C;
  p.height = H;
  p.width = W;
  p.num_boxes = K;
  return call;
}

void raise_for_box_status(const char* op, const at::Tensor& status, const at::Tensor& boxes,
                          const at::Tensor& box_batch, const at::Tensor& box_labels, int64_t batch,
                          int64_t num_channels) {
  const at::Tensor flags = status.to(at::kInt).contiguous();
  const int32_t* s = flags.data_ptr<int32_t>();
  for (int64_t k = 0; k < flags.numel(); ++k) {
    if (s[k] == 0) continue;
    const at::Tensor box = boxes[k].to(at::kDouble).cpu();
    const double* b = box.data_ptr<double>();
    std::ostringstream coords;
    coords << "(" << b[0] << ", " << b[1] << ", " << b[2] << ", " << b[3] << ")";
    if (s[k] & boxes::kBoxNaN) {
      TORCH_CHECK_VALUE(false, op, ": boxes must not hold NaN, got boxes[", k, "] = ", coords.str());
    }
    if (s[k] & boxes::kBoxInverted) {
      TORCH_CHECK_VALUE(false, op, ": boxes must have x1 >= x0 and y1 >= y0 (x0, y0, x1, y1 order), got boxes[", k,
                        "] = ", coords.str());
    }
    if (s[k] & boxes::kBoxBatchOutOfRange) {
      TORCH_CHECK_VALUE(false, op, ": box_batch must lie in [0, ", batch, ") for a batch of ", batch,
                        ", got box_batch[", k, "] = ", box_batch[k].item<int64_t>());
    }
    TORCH_CHECK_VALUE(false, op, ": box_labels must lie in [0, ", num_channels, ") for ", num_channels,
                      " channels, got box_labels[", k, "] = ", box_labels[k].item<int64_t>());
  }
}

void raise_for_box_status(const at::Tensor& status, const RowColMaxCall& call) {
  raise_for_box_status(kOp, status, call.boxes, call.box_batch, call.box_labels, call.problem.batch,
                       call.problem.num_channels);
}

void raise_for_probs_status(const at::Tensor& status) {
  const at::Tensor flags = status.to(at::kInt).contiguous();
  const int32_t* s = flags.data_ptr<int32_t>();
  for (int64_t k = 0; k < flags.numel(); ++k) {
    TORCH_CHECK_VALUE(!(s[k] & row_col_max::kProbsNaN), kOp,
                      ": probs must not hold NaN inside a box, but the pixels of boxes[", k, "] do");
  }
}

RowColMaxBackwardCall prepare_row_col_max_backward(const at::Tensor& grad_row_max, const at::Tensor& grad_col_max,
                                                   const at::Tensor& row_index, const at::Tensor& col_index,
                                                   at::IntArrayRef probs_shape) {
  constexpr const char* op = "_box_row_col_max_backward";
  TORCH_CHECK_VALUE(probs_shape.size() == 4, op, ": probs_shape must have 4 entries, got ", probs_shape);
  const int64_t H = probs_shape[2], W = probs_shape[3];
  TORCH_CHECK_VALUE(grad_row_max.dim() == 2 && grad_row_max.size(1) == H && row_index.sizes() == grad_row_max.sizes(),
                    op, ": grad_row_max and row_index must have shape (K, H) with H = ", H, ", got ",
                    shape_of(grad_row_max), " and ", shape_of(row_index));
  TORCH_CHECK_VALUE(grad_col_max.dim() == 2 && grad_col_max.size(1) == W && col_index.sizes() == grad_col_max.sizes() &&
                        grad_col_max.size(0) == grad_row_max.size(0),
                    op, ": grad_col_max and col_index must have shape (K, W) with W = ", W, ", got ",
                    shape_of(grad_col_max), " and ", shape_of(col_index));
  TORCH_CHECK_TYPE(row_index.scalar_type() == at::kLong && col_index.scalar_type() == at::kLong, op,
                   ": row_index and col_index must be int64");
  TORCH_CHECK_TYPE(grad_row_max.scalar_type() == grad_col_max.scalar_type(), op,
                   ": grad_row_max and grad_col_max must share a dtype");
  RowColMaxBackwardCall call;
  call.dtype = row_col_max_compute_dtype(grad_row_max.scalar_type());
  call.grad_row_max = grad_row_max.to(call.dtype).contiguous();
  call.grad_col_max = grad_col_max.to(call.dtype).contiguous();
  call.row_index = row_index.contiguous();
  call.col_index = col_index.contiguous();
  call.num_boxes = grad_row_max.size(0);
  call.height = H;
  call.width = W;
  return call;
}

TORCH_LIBRARY_FRAGMENT(boxloss, m) {
  m.def(
      "box_row_col_max(Tensor probs, Tensor boxes, Tensor box_batch, Tensor box_labels, float spatial_scale) -> "
      "(Tensor row_max, Tensor col_max, Tensor row_index, Tensor col_index, Tensor ranges)");
  m.def(
      "_box_row_col_max_backward(Tensor grad_row_max, Tensor grad_col_max, Tensor row_index, Tensor col_index, "
      "SymInt[] probs_shape) -> Tensor");
}

}  // namespace ops
}  // namespace boxloss
