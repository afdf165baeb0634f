// CUDA kernels of the uncertainty ops: device guard, current stream and
// buffers around the torch-free launchers of csrc/kernels/uncertainty.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "boxloss/uncertainty/cuda.h"
#include "uncertainty.h"

namespace boxloss {
namespace ops {
namespace {

namespace ucuda = uncertainty::cuda;

int32_t read_status(const at::Tensor& status) {
  // One 4-byte device-to-host copy: bad targets raise instead of being used.
  return status.cpu().item<int32_t>();
}

at::Tensor uncertainty_bce_loss_cuda(const at::Tensor& mu, const at::Tensor& log_var, const at::Tensor& target,
                                     const std::optional<at::Tensor>& box_mask,
                                     const std::optional<at::Tensor>& pixel_perfect, double tau, double temperature,
                                     bool bootstrap, bool route_gradients) {
  const c10::cuda::CUDAGuard guard(mu.device());
  BinaryCall call = prepare_binary_call("uncertainty_bce_loss", mu, log_var, target, box_mask, pixel_perfect, tau,
                                        temperature, bootstrap, route_gradients);
  at::Tensor loss = at::empty_like(call.mu);
  at::Tensor status = at::zeros({1}, mu.options().dtype(at::kInt));
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (call.mu.scalar_type() == at::kDouble) {
    C10_CUDA_CHECK(ucuda::launch_binary_forward<double>(call.problem, loss.data_ptr<double>(),
                                                        status.data_ptr<int32_t>(), stream));
  } else {
    C10_CUDA_CHECK(
        ucuda::launch_binary_forward<float>(call.problem, loss.data_ptr<float>(), status.data_ptr<int32_t>(), stream));
  }
  raise_for_binary_status(read_status(status), call);
  return loss.to(mu.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> uncertainty_bce_loss_backward_cuda(
    const at::Tensor& grad, const at::Tensor& mu, const at::Tensor& log_var, const at::Tensor& target,
    const std::optional<at::Tensor>& box_mask, const std::optional<at::Tensor>& pixel_perfect, double tau,
    double temperature, bool bootstrap, bool route_gradients) {
  const c10::cuda::CUDAGuard guard(mu.device());
  const char* op = "_uncertainty_bce_loss_backward";
  BinaryCall call = prepare_binary_call(op, mu, log_var, target, box_mask, pixel_perfect, tau, temperature, bootstrap,
                                        route_gradients);
  const at::Tensor g = per_pixel_input(op, "grad", grad, call.mu);
  at::Tensor grad_mu = at::empty_like(call.mu);
  at::Tensor grad_log_var = at::empty_like(call.mu);
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (call.mu.scalar_type() == at::kDouble) {
    C10_CUDA_CHECK(ucuda::launch_binary_backward<double>(call.problem, g.data_ptr<double>(), grad_mu.data_ptr<double>(),
                                                         grad_log_var.data_ptr<double>(), stream));
  } else {
    C10_CUDA_CHECK(ucuda::launch_binary_backward<float>(call.problem, g.data_ptr<float>(), grad_mu.data_ptr<float>(),
                                                        grad_log_var.data_ptr<float>(), stream));
  }
  return {grad_mu.to(mu.scalar_type()), grad_log_var.to(mu.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> uncertainty_ce_loss_cuda(
    const at::Tensor& mu, const at::Tensor& log_var, const at::Tensor& target,
    const std::optional<at::Tensor>& box_mask, const std::optional<at::Tensor>& pixel_perfect, const at::Tensor& seed,
    int64_t samples, double tau, bool bootstrap, bool route_gradients, int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(mu.device());
  ClassCall call = prepare_class_call("uncertainty_ce_loss", mu, log_var, target, box_mask, pixel_perfect, seed,
                                      samples, tau, bootstrap, route_gradients, ignore_index);
  const auto& p = call.problem;
  at::Tensor loss = at::empty({p.batch, mu.size(2), mu.size(3)}, call.mu.options());
  at::Tensor sample_lse = at::empty_like(loss);
  at::Tensor status = at::zeros({1}, mu.options().dtype(at::kInt));
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (call.mu.scalar_type() == at::kDouble) {
    C10_CUDA_CHECK(ucuda::launch_class_forward<double>(p, loss.data_ptr<double>(), sample_lse.data_ptr<double>(),
                                                       status.data_ptr<int32_t>(), stream));
  } else {
    C10_CUDA_CHECK(ucuda::launch_class_forward<float>(p, loss.data_ptr<float>(), sample_lse.data_ptr<float>(),
                                                      status.data_ptr<int32_t>(), stream));
  }
  raise_for_class_status(read_status(status), call);
  return {loss.to(mu.scalar_type()), sample_lse.to(mu.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> uncertainty_ce_loss_backward_cuda(
    const at::Tensor& grad, const at::Tensor& mu, const at::Tensor& log_var, const at::Tensor& target,
    const std::optional<at::Tensor>& box_mask, const std::optional<at::Tensor>& pixel_perfect, const at::Tensor& seed,
    const at::Tensor& sample_lse, int64_t samples, double tau, bool bootstrap, bool route_gradients,
    int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(mu.device());
  const char* op = "_uncertainty_ce_loss_backward";
  ClassCall call = prepare_class_call(op, mu, log_var, target, box_mask, pixel_perfect, seed, samples, tau, bootstrap,
                                      route_gradients, ignore_index);
  const at::Tensor g = per_pixel_input(op, "grad", grad, call.mu);
  const at::Tensor lse = per_pixel_input(op, "sample_lse", sample_lse, call.mu);
  at::Tensor grad_mu = at::empty_like(call.mu);
  at::Tensor grad_log_var = at::empty_like(call.mu);
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (call.mu.scalar_type() == at::kDouble) {
    C10_CUDA_CHECK(ucuda::launch_class_backward<double>(call.problem, g.data_ptr<double>(), lse.data_ptr<double>(),
                                                        grad_mu.data_ptr<double>(), grad_log_var.data_ptr<double>(),
                                                        stream));
  } else {
    C10_CUDA_CHECK(ucuda::launch_class_backward<float>(call.problem, g.data_ptr<float>(), lse.data_ptr<float>(),
                                                       grad_mu.data_ptr<float>(), grad_log_var.data_ptr<float>(),
                                                       stream));
  }
  return {grad_mu.to(mu.scalar_type()), grad_log_var.to(mu.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(boxloss, CUDA, m) {
  m.impl("uncertainty_bce_loss", &uncertainty_bce_loss_cuda);
  m.impl("_uncertainty_bce_loss_backward", &uncertainty_bce_loss_backward_cuda);
  m.impl("uncertainty_ce_loss", &uncertainty_ce_loss_cuda);
  m.impl("_uncertainty_ce_loss_backward", &uncertainty_ce_loss_backward_cuda);
}

}  // namespace ops
}  // namespace boxloss
