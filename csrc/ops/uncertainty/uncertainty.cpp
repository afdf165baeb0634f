// Schemas and device-independent checks of the uncertainty-loss ops.
#include "uncertainty.h"

#include <torch/library.h>

#include <cmath>
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

// mu and log_var: a float tensor of the expected rank, non-empty, the same shape,
// dtype and device.
void check_mean_and_log_var(const char* op, const at::Tensor& mu, const at::Tensor& log_var, int64_t dim,
                            const char* layout) {
  TORCH_CHECK_TYPE(mu.defined() && log_var.defined(), op, ": mu and log_var must be tensors");
  TORCH_CHECK_VALUE(mu.dim() == dim, op, ": mu must have shape ", layout, ", got shape ", shape_of(mu));
  TORCH_CHECK_TYPE(is_supported_float(mu.scalar_type()), op, ": mu must be float16, bfloat16, float32 or float64, got ",
                   mu.scalar_type());
  TORCH_CHECK_VALUE(mu.numel() > 0, op, ": mu must be non-empty in every dimension, got shape ", shape_of(mu));
  TORCH_CHECK_VALUE(log_var.sizes() == mu.sizes(), op, ": log_var must have the shape of mu (", shape_of(mu),
                    "), got shape ", shape_of(log_var));
  TORCH_CHECK_TYPE(log_var.scalar_type() == mu.scalar_type(), op, ": log_var must have the dtype of mu (",
                   mu.scalar_type(), "), got ", log_var.scalar_type());
  TORCH_CHECK_VALUE(log_var.device() == mu.device(), op, ": log_var must be on the device of mu (", mu.device(),
                    "), got ", log_var.device());
}

// The optional box mask (B, H, W) and pixel-perfect flags (B,), as uint8 views.
void prepare_masks(const char* op, const at::Tensor& mu, int64_t B, int64_t H, int64_t W,
                   const std::optional<at::Tensor>& box_mask, const std::optional<at::Tensor>& pixel_perfect,
                   at::Tensor* mask_out, at::Tensor* pp_out) {
  if (box_mask.has_value() && box_mask->defined()) {
    const at::Tensor& m = *box_mask;
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, op, ": box_mask must be a bool tensor, got ", m.scalar_type());
    TORCH_CHECK_VALUE(m.dim() == 3 && m.size(0) == B && m.size(1) == H && m.size(2) == W, op,
                      ": box_mask must have shape (B, H, W) = (", B, ", ", H, ", ", W, "), got shape ", shape_of(m));
    TORCH_CHECK_VALUE(m.device() == mu.device(), op, ": box_mask must be on the device of mu (", mu.device(), "), got ",
                      m.device());
    *mask_out = m.contiguous().view(at::kByte);
  }
  if (pixel_perfect.has_value() && pixel_perfect->defined()) {
    const at::Tensor& pp = *pixel_perfect;
    TORCH_CHECK_TYPE(pp.scalar_type() == at::kBool, op, ": pixel_perfect must be a bool tensor, got ",
                     pp.scalar_type());
    TORCH_CHECK_VALUE(pp.dim() == 1 && pp.size(0) == B, op, ": pixel_perfect must have shape (B,) = (", B,
                      ",), got shape ", shape_of(pp));
    TORCH_CHECK_VALUE(pp.device() == mu.device(), op, ": pixel_perfect must be on the device of mu (", mu.device(),
                      "), got ", pp.device());
    *pp_out = pp.contiguous().view(at::kByte);
  }
}

}  // namespace

at::ScalarType uncertainty_compute_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

BinaryCall prepare_binary_call(const char* op, const at::Tensor& mu, const at::Tensor& log_var,
                               const at::Tensor& target, const std::optional<at::Tensor>& box_mask,
                               const std::optional<at::Tensor>& pixel_perfect, double tau, double temperature,
                               bool bootstrap, bool route_gradients) {
  check_mean_and_log_var(op, mu, log_var, 3, "(B, H, W)");
  TORCH_CHECK_TYPE(target.defined(), op, ": target must be a tensor");
  TORCH_CHECK_VALUE(target.sizes() == mu.sizes(), op, ": target must have the shape of mu (", shape_of(mu),
                    "), got shape ", shape_of(target));
  TORCH_CHECK_TYPE(target.scalar_type() == mu.scalar_type(), op, ": target must have the dtype of mu (",
                   mu.scalar_type(), "), got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.device() == mu.device(), op, ": target must be on the device of mu (", mu.device(),
                    "), got ", target.device());
  TORCH_CHECK_VALUE(std::isfinite(tau), op, ": tau must be a finite number, got ", tau);
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, op,
                    ": temperature must be a positive finite number, got ", temperature);
  const int64_t B = mu.size(0), H = mu.size(1), W = mu.size(2);
  BinaryCall call;
  prepare_masks(op, mu, B, H, W, box_mask, pixel_perfect, &call.box_mask, &call.pixel_perfect);
  const at::ScalarType dtype = uncertainty_compute_dtype(mu.scalar_type());
  call.mu = mu.to(dtype).contiguous();
  call.log_var = log_var.to(dtype).contiguous();
  call.target = target.to(dtype).contiguous();
  uncertainty::BinaryProblem& p = call.problem;
  p.mu = call.mu.data_ptr();
  p.log_var = call.log_var.data_ptr();
  p.target = call.target.data_ptr();
  p.box_mask = call.box_mask.defined() ? call.box_mask.data_ptr<uint8_t>() : nullptr;
  p.pixel_perfect = call.pixel_perfect.defined() ? call.pixel_perfect.data_ptr<uint8_t>() : nullptr;
  p.batch = B;
  p.plane = H * W;
  p.tau = tau;
  p.temperature = temperature;
  p.bootstrap = bootstrap;
  p.route_gradients = route_gradients;
  return call;
}

ClassCall prepare_class_call(const char* op, const at::Tensor& mu, const at::Tensor& log_var, const at::Tensor& target,
                             const std::optional<at::Tensor>& box_mask, const std::optional<at::Tensor>& pixel_perfect,
                             const at::Tensor& seed, int64_t samples, double tau, bool bootstrap, bool route_gradients,
                             int64_t ignore_index) {
  check_mean_and_log_var(op, mu, log_var, 4, "(B, C, H, W)");
  const int64_t B = mu.size(0), C = mu.size(1), H = mu.size(2), W = mu.size(3);
  TORCH_CHECK_TYPE(target.defined(), op, ": target must be a tensor");
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, op, ": target must be an int64 tensor of class indices, got ",
                   target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 3 && target.size(0) == B && target.size(1) == H && target.size(2) == W, op,
                    ": target must have shape (B, H, W) = (", B, ", ", H, ", ", W, "), got shape ", shape_of(target));
  TORCH_CHECK_VALUE(target.device() == mu.device(), op, ": target must be on the device of mu (", mu.device(),
                    "), got ", target.device());
  TORCH_CHECK_TYPE(seed.defined() && seed.scalar_type() == at::kLong, op,
                   ": seed must be an int64 tensor holding (seed, offset), got ",
                   seed.defined() ? c10::toString(seed.scalar_type()) : "None");
  TORCH_CHECK_VALUE(seed.dim() == 1 && seed.size(0) == 2 && seed.device().is_cpu(), op,
                    ": seed must be a CPU tensor of shape (2,) holding (seed, offset), got shape ", shape_of(seed),
                    " on ", seed.device());
  TORCH_CHECK_VALUE(samples >= 1 && samples <= (int64_t{1} << 31) - 1, op,
                    ": samples must be a positive integer below 2^31, got ", samples);
  TORCH_CHECK_VALUE(std::isfinite(tau) && tau > 0, op, ": tau must be a positive finite number, got ", tau);
  const at::Tensor seed_values = seed.contiguous();
  const int64_t key = seed_values.data_ptr<int64_t>()[0];
  const int64_t offset = seed_values.data_ptr<int64_t>()[1];
  TORCH_CHECK_VALUE(offset >= 0 && offset < (int64_t{1} << 32), op, ": the seed's offset must lie in [0, 2^32), got ",
                    offset);

  ClassCall call;
  prepare_masks(op, mu, B, H, W, box_mask, pixel_perfect, &call.box_mask, &call.pixel_perfect);
  const at::ScalarType dtype = uncertainty_compute_dtype(mu.scalar_type());
  call.mu = mu.to(dtype).contiguous();
  call.log_var = log_var.to(dtype).contiguous();
  call.target = target.contiguous();
  uncertainty::ClassProblem& p = call.problem;
  p.mu = call.mu.data_ptr();
  p.log_var = call.log_var.data_ptr();
  p.target = call.target.data_ptr<int64_t>();
  p.box_mask = call.box_mask.defined() ? call.box_mask.data_ptr<uint8_t>() : nullptr;
  p.pixel_perfect = call.pixel_perfect.defined() ? call.pixel_perfect.data_ptr<uint8_t>() : nullptr;
  p.batch = B;
  p.num_classes = C;
  p.plane = H * W;
  p.samples = samples;
  p.key = uncertainty::make_noise_key(static_cast<uint64_t>(key), static_cast<uint32_t>(offset));
  p.log_tau = std::log(tau);
  p.bootstrap = bootstrap;
  p.route_gradients = route_gradients;
  p.ignore_index = ignore_index;
  return call;
}

at::Tensor per_pixel_input(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  const std::vector<int64_t> want =
      like.dim() == 4 ? std::vector<int64_t>{like.size(0), like.size(2), like.size(3)} : like.sizes().vec();
  TORCH_CHECK_VALUE(t.defined() && t.sizes() == at::IntArrayRef(want), op, ": ", name, " must have shape ",
                    at::IntArrayRef(want), ", got ", t.defined() ? shape_of(t) : std::string("None"));
  TORCH_CHECK_TYPE(t.is_floating_point(), op, ": ", name, " must be a floating-point tensor, got ", t.scalar_type());
  return t.to(like.device(), like.scalar_type()).contiguous();
}

namespace {

// mu and log_var must be finite.  One sum over each proves that without a
// tensor-sized temporary; only when a sum is not finite (NaN, Inf, or finite
// values that overflow it) is each element tested.
void check_finite_inputs(const char* op, const at::Tensor& mu, const at::Tensor& log_var) {
  if (at::isfinite(mu.sum() + log_var.sum()).item<bool>()) return;
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"mu", &mu}, {"log_var", &log_var}}) {
    if (at::isfinite(*t).all().item<bool>()) continue;
    TORCH_CHECK_VALUE(false, op, ": ", name, " must be finite, but it contains ",
                      t->isnan().any().item<bool>() ? "NaN" : "Inf");
  }
}

}  // namespace

void raise_for_binary_status(int32_t status, const BinaryCall& call) {
  check_finite_inputs("uncertainty_bce_loss", call.mu, call.log_var);
  if (!(status & uncertainty::kTargetNotProbability)) return;
  const at::Tensor target = call.target;
  std::ostringstream what;
  if (target.isnan().any().item<bool>()) {
    what << "NaN";
  } else if (target.isinf().any().item<bool>()) {
    what << "Inf";
  } else {
    what << "values outside [0, 1] (min " << target.min().item<double>() << ", max " << target.max().item<double>()
         << ")";
  }
  TORCH_CHECK_VALUE(false,
                    "uncertainty_bce_loss: target must hold probabilities in [0, 1] (0 background, 1 object), "
                    "but it contains ",
                    what.str());
}

void raise_for_class_status(int32_t status, const ClassCall& call) {
  check_finite_inputs("uncertainty_ce_loss", call.mu, call.log_var);
  if (!(status & uncertainty::kTargetOutOfRange)) return;
  const auto& p = call.problem;
  const at::Tensor t = call.target;
  const at::Tensor bad = (t != p.ignore_index) & ((t < 0) | (t >= p.num_classes));
  const at::Tensor values = t.masked_select(bad);
  const int64_t count = values.numel();
  TORCH_CHECK_VALUE(false, "uncertainty_ce_loss: target must hold class indices in [0, ", p.num_classes - 1,
                    "] or ignore_index (", p.ignore_index, "), but ", count, " pixel(s) hold other values (min ",
                    values.min().item<int64_t>(), ", max ", values.max().item<int64_t>(), ")");
}

TORCH_LIBRARY_FRAGMENT(boxloss, m) {
  m.def(
      "uncertainty_bce_loss(Tensor mu, Tensor log_var, Tensor target, Tensor? box_mask, Tensor? pixel_perfect, "
      "float tau, float temperature, bool bootstrap, bool route_gradients) -> Tensor");
  m.def(
      "_uncertainty_bce_loss_backward(Tensor grad, Tensor mu, Tensor log_var, Tensor target, Tensor? box_mask, "
      "Tensor? pixel_perfect, float tau, float temperature, bool bootstrap, bool route_gradients) "
      "-> (Tensor, Tensor)");
  m.def(
      "uncertainty_ce_loss(Tensor mu, Tensor log_var, Tensor target, Tensor? box_mask, Tensor? pixel_perfect, "
      "Tensor seed, int samples, float tau, bool bootstrap, bool route_gradients, int ignore_index) "
      "-> (Tensor, Tensor)");
  m.def(
      "_uncertainty_ce_loss_backward(Tensor grad, Tensor mu, Tensor log_var, Tensor target, Tensor? box_mask, "
      "Tensor? pixel_perfect, Tensor seed, Tensor sample_lse, int samples, float tau, bool bootstrap, "
      "bool route_gradients, int ignore_index) -> (Tensor, Tensor)");
}

}  // namespace ops
}  // namespace boxloss
