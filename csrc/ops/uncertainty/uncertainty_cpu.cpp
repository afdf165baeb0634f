// CPU kernels of the uncertainty ops: at::parallel_for around the torch-free
// core of csrc/kernels/uncertainty.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <tuple>

#include "boxloss/uncertainty/cpu.h"
#include "uncertainty.h"

namespace boxloss {
namespace ops {
namespace {

namespace ucpu = uncertainty::cpu;

// About 2^16 pixels per task for the elementwise binary loss.
constexpr int64_t kBinaryGrain = int64_t{1} << 16;

// Chunks per grab: about 2^17 (sample, class, pixel) terms.
int64_t class_grain(const uncertainty::ClassProblem& p) {
  const int64_t per_chunk = ucpu::kClassLanes * p.num_classes * p.samples;
  return std::max<int64_t>(1, (int64_t{1} << 17) / std::max<int64_t>(1, per_chunk));
}

// Runs f(begin, end) over [0, total) in grabs of `grain` items that the
// threads take from a shared counter, so that a thread the OS preempts (a
// shared machine) or whose chunks cost more (pixels outside the boxes cost
// almost nothing) does not hold up the others as a static split would.
// Every item is computed the same way whichever thread takes it, so the
// results do not depend on the schedule.
template <typename F>
void for_each_grab(int64_t total, int64_t grain, F f) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), (total + grain - 1) / grain);
  at::parallel_for(0, std::max<int64_t>(workers, 1), 1, [&](int64_t, int64_t) {
    for (;;) {
      const int64_t begin = next.fetch_add(grain);
      if (begin >= total) break;
      f(begin, std::min(total, begin + grain));
    }
  });
}

at::Tensor uncertainty_bce_loss_cpu(const at::Tensor& mu, const at::Tensor& log_var, const at::Tensor& target,
                                    const std::optional<at::Tensor>& box_mask,
                                    const std::optional<at::Tensor>& pixel_perfect, double tau, double temperature,
                                    bool bootstrap, bool route_gradients) {
  BinaryCall call = prepare_binary_call("uncertainty_bce_loss", mu, log_var, target, box_mask, pixel_perfect, tau,
                                        temperature, bootstrap, route_gradients);
  const auto& p = call.problem;
  at::Tensor loss = at::empty_like(call.mu);
  std::atomic<int32_t> status{0};
  at::parallel_for(0, p.num_pixels(), kBinaryGrain, [&](int64_t begin, int64_t end) {
    const int32_t s = call.mu.scalar_type() == at::kDouble
                          ? ucpu::binary_forward<double>(p, begin, end, loss.data_ptr<double>())
                          : ucpu::binary_forward<float>(p, begin, end, loss.data_ptr<float>());
    status.fetch_or(s);
  });
  raise_for_binary_status(status.load(), call);
  return loss.to(mu.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> uncertainty_bce_loss_backward_cpu(
    const at::Tensor& grad, const at::Tensor& mu, const at::Tensor& log_var, const at::Tensor& target,
    const std::optional<at::Tensor>& box_mask, const std::optional<at::Tensor>& pixel_perfect, double tau,
    double temperature, bool bootstrap, bool route_gradients) {
  const char* op = "_uncertainty_bce_loss_backward";
  BinaryCall call = prepare_binary_call(op, mu, log_var, target, box_mask, pixel_perfect, tau, temperature, bootstrap,
                                        route_gradients);
  const auto& p = call.problem;
  const at::Tensor g = per_pixel_input(op, "grad", grad, call.mu);
  at::Tensor grad_mu = at::empty_like(call.mu);
  at::Tensor grad_log_var = at::empty_like(call.mu);
  at::parallel_for(0, p.num_pixels(), kBinaryGrain, [&](int64_t begin, int64_t end) {
    if (call.mu.scalar_type() == at::kDouble) {
      ucpu::binary_backward<double>(p, g.data_ptr<double>(), begin, end, grad_mu.data_ptr<double>(),
                                    grad_log_var.data_ptr<double>());
    } else {
      ucpu::binary_backward<float>(p, g.data_ptr<float>(), begin, end, grad_mu.data_ptr<float>(),
                                   grad_log_var.data_ptr<float>());
    }
  });
  return {grad_mu.to(mu.scalar_type()), grad_log_var.to(mu.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> uncertainty_ce_loss_cpu(const at::Tensor& mu, const at::Tensor& log_var,
                                                           const at::Tensor& target,
                                                           const std::optional<at::Tensor>& box_mask,
                                                           const std::optional<at::Tensor>& pixel_perfect,
                                                           const at::Tensor& seed, int64_t samples, double tau,
                                                           bool bootstrap, bool route_gradients, int64_t ignore_index) {
  ClassCall call = prepare_class_call("uncertainty_ce_loss", mu, log_var, target, box_mask, pixel_perfect, seed,
                                      samples, tau, bootstrap, route_gradients, ignore_index);
  const auto& p = call.problem;
  const auto options = call.mu.options();
  at::Tensor loss = at::empty({p.batch, mu.size(2), mu.size(3)}, options);
  at::Tensor sample_lse = at::empty({p.batch, mu.size(2), mu.size(3)}, options);
  std::atomic<int32_t> status{0};
  for_each_grab(ucpu::class_chunks(p), class_grain(p), [&](int64_t begin, int64_t end) {
    const int32_t s =
        call.mu.scalar_type() == at::kDouble
            ? ucpu::class_forward<double>(p, begin, end, loss.data_ptr<double>(), sample_lse.data_ptr<double>())
            : ucpu::class_forward<float>(p, begin, end, loss.data_ptr<float>(), sample_lse.data_ptr<float>());
    status.fetch_or(s);
  });
  raise_for_class_status(status.load(), call);
  return {loss.to(mu.scalar_type()), sample_lse.to(mu.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> uncertainty_ce_loss_backward_cpu(
    const at::Tensor& grad, const at::Tensor& mu, const at::Tensor& log_var, const at::Tensor& target,
    const std::optional<at::Tensor>& box_mask, const std::optional<at::Tensor>& pixel_perfect, const at::Tensor& seed,
    const at::Tensor& sample_lse, int64_t samples, double tau, bool bootstrap, bool route_gradients,
    int64_t ignore_index) {
  const char* op = "_uncertainty_ce_loss_backward";
  ClassCall call = prepare_class_call(op, mu, log_var, target, box_mask, pixel_perfect, seed, samples, tau, bootstrap,
                                      route_gradients, ignore_index);
  const auto& p = call.problem;
  const at::Tensor g = per_pixel_input(op, "grad", grad, call.mu);
  const at::Tensor lse = per_pixel_input(op, "sample_lse", sample_lse, call.mu);
  at::Tensor grad_mu = at::empty_like(call.mu);
  at::Tensor grad_log_var = at::empty_like(call.mu);
  for_each_grab(ucpu::class_chunks(p), class_grain(p), [&](int64_t begin, int64_t end) {
    if (call.mu.scalar_type() == at::kDouble) {
      ucpu::class_backward<double>(p, g.data_ptr<double>(), lse.data_ptr<double>(), begin, end,
                                   grad_mu.data_ptr<double>(), grad_log_var.data_ptr<double>());
    } else {
      ucpu::class_backward<float>(p, g.data_ptr<float>(), lse.data_ptr<float>(), begin, end, grad_mu.data_ptr<float>(),
                                  grad_log_var.data_ptr<float>());
    }
  });
  return {grad_mu.to(mu.scalar_type()), grad_log_var.to(mu.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(boxloss, CPU, m) {
  m.impl("uncertainty_bce_loss", &uncertainty_bce_loss_cpu);
  m.impl("_uncertainty_bce_loss_backward", &uncertainty_bce_loss_backward_cpu);
  m.impl("uncertainty_ce_loss", &uncertainty_ce_loss_cpu);
  m.impl("_uncertainty_ce_loss_backward", &uncertainty_ce_loss_backward_cpu);
}

}  // namespace ops
}  // namespace boxloss
