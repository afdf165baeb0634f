// Schemas and device-independent checks of the Sparse-CRF ops.
#include "sparse_crf.h"

#include <torch/library.h>

#include <sstream>
#include <vector>

namespace boxloss {
namespace ops {
namespace {

std::string shape_of(const at::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

at::ScalarType accumulation_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

SparseCRFCall prepare_sparse_crf_call(const char* op, const at::Tensor& probs, const at::Tensor& image,
                                      const std::optional<at::Tensor>& valid_mask, at::OptionalIntArrayRef channels,
                                      double sigma, int64_t neighbourhood, int64_t dilation, c10::string_view kind,
                                      at::ScalarType compute_dtype) {
  TORCH_CHECK_TYPE(probs.defined() && image.defined(), op, ": probs and image must be tensors");
  TORCH_CHECK_VALUE(probs.dim() == 4, op, ": probs must have shape (B, C, H, W), got shape ", shape_of(probs));
  TORCH_CHECK_VALUE(image.dim() == 4, op, ": image must have shape (B, K, H, W), got shape ", shape_of(image));
  TORCH_CHECK_TYPE(is_supported_float(probs.scalar_type()), op,
                   ": probs must be float16, bfloat16, float32 or float64, got ", probs.scalar_type());
  TORCH_CHECK_TYPE(image.scalar_type() == probs.scalar_type(), op, ": image must have the dtype of probs (",
                   probs.scalar_type(), "), got ", image.scalar_type());
  TORCH_CHECK_VALUE(image.device() == probs.device(), op, ": image must be on the device of probs (", probs.device(),
                    "), got ", image.device());
  const int64_t B = probs.size(0), C = probs.size(1), H = probs.size(2), W = probs.size(3);
  TORCH_CHECK_VALUE(B > 0 && C > 0 && H > 0 && W > 0, op, ": probs must be non-empty in every dimension, got shape ",
                    shape_of(probs));
  TORCH_CHECK_VALUE(image.size(0) == B && image.size(2) == H && image.size(3) == W, op,
                    ": image must match probs in B, H and W (probs ", shape_of(probs), "), got ", shape_of(image));
  TORCH_CHECK_VALUE(image.size(1) > 0, op, ": image must have at least one channel, got shape ", shape_of(image));
  TORCH_CHECK_VALUE(std::isfinite(sigma) && sigma > 0, op, ": sigma must be a positive finite number, got ", sigma);
  TORCH_CHECK_VALUE(neighbourhood == 4 || neighbourhood == 8, op, ": neighbourhood must be 4 or 8, got ",
                    neighbourhood);
  TORCH_CHECK_VALUE(dilation >= 1 && dilation <= (int64_t{1} << 30), op, ": dilation must be a positive integer, got ",
                    dilation);
  sparse_crf::Kind parsed_kind;
  if (kind == "l1") {
    parsed_kind = sparse_crf::Kind::L1;
  } else if (kind == "potts") {
    parsed_kind = sparse_crf::Kind::Potts;
  } else {
    TORCH_CHECK_VALUE(false, op, ": kind must be 'l1' or 'potts', got '", std::string(kind), "'");
  }

  SparseCRFCall call;
  if (valid_mask.has_value() && valid_mask->defined()) {
    const at::Tensor& mask = *valid_mask;
    TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, op, ": valid_mask must be a bool tensor, got ",
                     mask.scalar_type());
    TORCH_CHECK_VALUE(mask.dim() == 3 && mask.size(0) == B && mask.size(1) == H && mask.size(2) == W, op,
                      ": valid_mask must have shape (B, H, W) = (", B, ", ", H, ", ", W, "), got shape ",
                      shape_of(mask));
    TORCH_CHECK_VALUE(mask.device() == probs.device(), op, ": valid_mask must be on the device of probs (",
                      probs.device(), "), got ", mask.device());
    call.valid = mask.contiguous().view(at::kByte);
  }

  std::vector<int32_t> selected;
  if (channels.has_value()) {
    std::vector<bool> seen(static_cast<size_t>(C), false);
    TORCH_CHECK_VALUE(!channels->empty(), op, ": channels must name at least one channel, got []");
    for (int64_t c : *channels) {
      TORCH_CHECK_VALUE(c >= -C && c < C, op, ": channels must lie in [", -C, ", ", C - 1, "] for probs with ", C,
                        " channels, got ", c);
      const int64_t normalised = c < 0 ? c + C : c;
      TORCH_CHECK_VALUE(!seen[normalised], op, ": channels must not repeat a channel, got ", *channels);
      seen[normalised] = true;
      selected.push_back(static_cast<int32_t>(normalised));
    }
    call.channels = at::tensor(selected, at::TensorOptions().dtype(at::kInt)).to(probs.device());
  }

  call.probs = probs.to(compute_dtype).contiguous();
  call.image = image.to(compute_dtype).contiguous();

  sparse_crf::Problem& p = call.problem;
  p.probs = call.probs.data_ptr();
  p.image = call.image.data_ptr();
  p.valid = call.valid.defined() ? call.valid.data_ptr<uint8_t>() : nullptr;
  p.channels = call.channels.defined() ? call.channels.data_ptr<int32_t>() : nullptr;
  p.batch = B;
  p.num_channels = C;
  p.height = H;
  p.width = W;
  p.image_channels = image.size(1);
  p.num_selected = call.channels.defined() ? static_cast<int64_t>(selected.size()) : C;
  p.neighbourhood = static_cast<int32_t>(neighbourhood);
  p.dilation = static_cast<int32_t>(dilation);
  p.sigma = sigma;
  p.kind = parsed_kind;
  return call;
}

at::Tensor valid_pixel_counts(const SparseCRFCall& call, at::ScalarType dtype) {
  const auto& p = call.problem;
  if (call.valid.defined()) {
    return call.valid.view({p.batch, p.plane()}).sum(1, /*keepdim=*/false, dtype);
  }
  return at::full({p.batch}, static_cast<double>(p.plane()), call.probs.options().dtype(dtype));
}

at::Tensor divide_by_counts(const at::Tensor& sums, const at::Tensor& counts) {
  return at::where(counts > 0, sums / counts.clamp_min(1), at::zeros_like(sums));
}

void raise_for_input_status(const at::Tensor& status, const SparseCRFCall& call) {
  const at::Tensor flags = status.to(at::kInt).contiguous();
  const int32_t* s = flags.data_ptr<int32_t>();
  std::vector<int64_t> bad_probs, bad_image;
  for (int64_t b = 0; b < flags.numel(); ++b) {
    if (s[b] & sparse_crf::kProbsOutOfRange) bad_probs.push_back(b);
    if (s[b] & sparse_crf::kImageNotFinite) bad_image.push_back(b);
  }
  if (bad_probs.empty() && bad_image.empty()) return;
  if (!bad_image.empty()) {
    const bool has_nan = call.image.isnan().any().item<bool>();
    TORCH_CHECK_VALUE(false, "sparse_crf_loss: image must be finite, but it contains ", has_nan ? "NaN" : "Inf",
                      " in batch element(s) ", at::IntArrayRef(bad_image));
  }
  at::Tensor probs = call.probs;
  if (call.channels.defined()) probs = probs.index_select(1, call.channels);
  const bool has_nan = probs.isnan().any().item<bool>();
  const bool has_inf = probs.isinf().any().item<bool>();
  std::ostringstream what;
  if (has_nan) {
    what << "NaN";
  } else if (has_inf) {
    what << "Inf";
  } else {
    what << "values outside [0, 1] (min " << probs.min().item<double>() << ", max " << probs.max().item<double>()
         << "; pass softmax or sigmoid outputs, not logits)";
  }
  TORCH_CHECK_VALUE(false, "sparse_crf_loss: probs must hold probabilities in [0, 1], but it contains ", what.str(),
                    " in batch element(s) ", at::IntArrayRef(bad_probs));
}

TORCH_LIBRARY_FRAGMENT(boxloss, m) {
  m.def(
      "sparse_crf_loss(Tensor probs, Tensor image, Tensor? valid_mask, int[]? channels, float sigma, "
      "int neighbourhood, int dilation, str kind) -> Tensor");
  m.def(
      "_sparse_crf_loss_backward(Tensor grad, Tensor probs, Tensor image, Tensor? valid_mask, "
      "int[]? channels, float sigma, int neighbourhood, int dilation, str kind) -> Tensor");
}

}  // namespace ops
}  // namespace boxloss
