// Schemas and device-independent checks of the DenseCRF loss ops.
#include "dense_crf.h"

#include <torch/library.h>

#include <sstream>

#include "boxloss/dense_crf/math.h"

namespace boxloss {
namespace ops {

DenseCRFCall prepare_dense_crf_call(const char* op, const at::Tensor& probs,
                                    const std::optional<at::Tensor>& valid_mask, const at::Tensor& splat_index,
                                    const at::Tensor& splat_weight, const at::Tensor& blur_neighbours,
                                    const at::Tensor& vertex_offsets) {
  TORCH_CHECK_TYPE(probs.defined(), op, ": probs must be a tensor");
  TORCH_CHECK_VALUE(probs.dim() == 4, op, ": probs must have shape (B, C, H, W), got shape ", shape_string(probs));
  const auto dtype = probs.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
                   ": probs must be float16, bfloat16, float32 or float64, got ", dtype);
  const int64_t B = probs.size(0), C = probs.size(1), H = probs.size(2), W = probs.size(3);
  TORCH_CHECK_VALUE(B > 0 && C > 0 && H > 0 && W > 0, op, ": probs must be non-empty in every dimension, got shape ",
                    shape_string(probs));
  DenseCRFCall call;
  const at::ScalarType compute = lattice_compute_dtype(dtype);
  call.lattice =
      check_lattice(op, splat_index, splat_weight, blur_neighbours, vertex_offsets, B, H * W, probs.device(), compute);
  if (valid_mask.has_value() && valid_mask->defined()) {
    const at::Tensor& mask = *valid_mask;
    TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, op, ": valid_mask must be a bool tensor, got ",
                     mask.scalar_type());
    TORCH_CHECK_VALUE(mask.dim() == 3 && mask.size(0) == B && mask.size(1) == H && mask.size(2) == W, op,
                      ": valid_mask must have shape (B, H, W) = (", B, ", ", H, ", ", W, "), got shape ",
                      shape_string(mask));
    TORCH_CHECK_VALUE(mask.device() == probs.device(), op, ": valid_mask must be on the device of probs (",
                      probs.device(), "), got ", mask.device());
    call.valid = mask.contiguous().view(at::kByte);
  }
  call.probs = probs.to(compute).contiguous();
  call.batch = B;
  call.channels = C;
  call.num_pixels = H * W;
  return call;
}

at::Tensor images_with_pairs(const DenseCRFCall& call) {
  if (call.valid.defined()) return call.valid.view({call.batch, call.num_pixels}).sum(1) >= 2;
  return at::full({call.batch}, call.num_pixels >= 2, call.probs.options().dtype(at::kBool));
}

void raise_for_dense_crf_probs_status(const char* op, const std::vector<int32_t>& status, const at::Tensor& probs) {
  std::vector<int64_t> bad;
  for (size_t b = 0; b < status.size(); ++b) {
    if (status[b] & dense_crf::kProbsOutOfRange) bad.push_back(static_cast<int64_t>(b));
  }
  if (bad.empty()) return;
  std::ostringstream what;
  if (probs.isnan().any().item<bool>()) {
    what << "NaN";
  } else if (probs.isinf().any().item<bool>()) {
    what << "Inf";
  } else {
    what << "values outside [0, 1] (min " << probs.min().item<double>() << ", max " << probs.max().item<double>()
         << "; pass softmax outputs, not logits)";
  }
  TORCH_CHECK_VALUE(false, op, ": probs must hold probabilities in [0, 1], but it contains ", what.str(),
                    " in batch element(s) ", at::IntArrayRef(bad));
}

TORCH_LIBRARY_FRAGMENT(boxloss, m) {
  m.def(
      "dense_crf_loss(Tensor probs, Tensor? valid_mask, Tensor splat_index, Tensor splat_weight, "
      "Tensor blur_neighbours, Tensor vertex_offsets) -> (Tensor energy, Tensor normaliser)");
  // The backward filters the masked probabilities again (forward and reverse order)
  // rather than receiving the forward's filtered values: nothing of the size of the
  // probabilities is kept between the forward and the backward.
  m.def(
      "_dense_crf_loss_backward(Tensor grad_energy, Tensor probs, Tensor? valid_mask, Tensor splat_index, "
      "Tensor splat_weight, Tensor blur_neighbours, Tensor vertex_offsets) -> Tensor");
}

}  // namespace ops
}  // namespace boxloss
