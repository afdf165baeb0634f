// CPU kernels of the DenseCRF loss ops: per image, the masked probabilities
// and the mask go through the lattice in one pass (C+1 channels), then one
// pass over the pixels forms E and Z (forward) or, after the same filter and
// its transpose, the gradient (backward).
#include <torch/library.h>

#include <memory>
#include <tuple>
#include <vector>

#include "../permutohedral/permutohedral_cpu.h"
#include "boxloss/dense_crf/cpu.h"
#include "boxloss/permutohedral/cpu.h"
#include "dense_crf.h"

namespace boxloss {
namespace ops {
namespace {

template <typename scalar>
permutohedral::cpu::FilterInput<scalar> masked_input(const DenseCRFCall& call, int64_t b) {
  permutohedral::cpu::FilterInput<scalar> input;
  input.values = call.probs.data_ptr<scalar>() + b * call.channels * call.num_pixels;
  input.channels = call.channels;
  input.mask = call.mask_of(b);
  input.append_mask = true;
  return input;
}

// The filtered values of one image, (C + 1) x N, allocated while the image is
// processed: nothing of the size of the batch's probabilities outlives a call.
template <typename scalar>
std::unique_ptr<scalar[]> filter_scratch(const DenseCRFCall& call) {
  return std::unique_ptr<scalar[]>(new scalar[static_cast<size_t>((call.channels + 1) * call.num_pixels)]);
}

std::tuple<at::Tensor, at::Tensor> dense_crf_loss_cpu(const at::Tensor& probs,
                                                      const std::optional<at::Tensor>& valid_mask,
                                                      const at::Tensor& splat_index, const at::Tensor& splat_weight,
                                                      const at::Tensor& blur_neighbours,
                                                      const at::Tensor& vertex_offsets) {
  constexpr const char* op = "dense_crf_loss";
  const DenseCRFCall call =
      prepare_dense_crf_call(op, probs, valid_mask, splat_index, splat_weight, blur_neighbours, vertex_offsets);
  const int64_t B = call.batch, C = call.channels, N = call.num_pixels;
  at::Tensor energy = at::empty({B}, call.probs.options().dtype(at::kDouble));
  at::Tensor normaliser = at::empty({B}, call.probs.options().dtype(at::kDouble));
  std::vector<int32_t> status(static_cast<size_t>(B), 0), filter_status(static_cast<size_t>(B), 0);
  AT_DISPATCH_FLOATING_TYPES(call.probs.scalar_type(), "dense_crf_loss_cpu", [&] {
    const auto lattice = call.lattice.view<scalar_t>();
    for_each_image(B, N, [&](int64_t b, const permutohedral::cpu::RangeRunner& runner) {
      // Every element is written by the filter: no need to zero it first.
      const std::unique_ptr<scalar_t[]> filtered = filter_scratch<scalar_t>(call);
      filter_status[b] = permutohedral::cpu::filter_image<scalar_t>(lattice, b, masked_input<scalar_t>(call, b), false,
                                                                    filtered.get(), runner);
      status[b] = dense_crf::cpu::energy_image<scalar_t>(
          call.probs.data_ptr<scalar_t>() + b * C * N, C, call.mask_of(b), filtered.get(), lattice.weight_of(b), N,
          energy.data_ptr<double>() + b, normaliser.data_ptr<double>() + b, runner);
    });
  });
  raise_for_dense_crf_probs_status(op, status, call.probs);
  raise_for_filter_status(op, "probs", filter_status);
  const at::Tensor paired = images_with_pairs(call);
  energy = at::where(paired, energy, at::zeros_like(energy));
  normaliser = at::where(paired, normaliser, at::zeros_like(normaliser));
  return {energy.to(probs.scalar_type()), normaliser.to(probs.scalar_type())};
}

at::Tensor dense_crf_loss_backward_cpu(const at::Tensor& grad_energy, const at::Tensor& probs,
                                       const std::optional<at::Tensor>& valid_mask, const at::Tensor& splat_index,
                                       const at::Tensor& splat_weight, const at::Tensor& blur_neighbours,
                                       const at::Tensor& vertex_offsets) {
  constexpr const char* op = "_dense_crf_loss_backward";
  const DenseCRFCall call =
      prepare_dense_crf_call(op, probs, valid_mask, splat_index, splat_weight, blur_neighbours, vertex_offsets);
  const int64_t B = call.batch, C = call.channels, N = call.num_pixels;
  TORCH_CHECK_VALUE(grad_energy.dim() == 1 && grad_energy.size(0) == B, op, ": grad_energy must have shape (B,) = (", B,
                    ",), got shape ", shape_string(grad_energy));
  const at::Tensor g = grad_energy.to(at::kCPU, call.probs.scalar_type());
  const at::Tensor scale = at::where(images_with_pairs(call), g, at::zeros_like(g)).contiguous();
  at::Tensor grad = at::empty_like(call.probs);
  std::vector<int32_t> filter_status(static_cast<size_t>(B), 0);
  AT_DISPATCH_FLOATING_TYPES(call.probs.scalar_type(), "_dense_crf_loss_backward_cpu", [&] {
    const auto lattice = call.lattice.view<scalar_t>();
    for_each_image(B, N, [&](int64_t b, const permutohedral::cpu::RangeRunner& runner) {
      // The forward's filter again (cheaper than keeping it: a filter pass costs a
      // fraction of the lattice build), then its transpose: the same lattice,
      // blurred in reverse order.
      const std::unique_ptr<scalar_t[]> filtered = filter_scratch<scalar_t>(call);
      const std::unique_ptr<scalar_t[]> reversed = filter_scratch<scalar_t>(call);
      const auto input = masked_input<scalar_t>(call, b);
      filter_status[b] = permutohedral::cpu::filter_image<scalar_t>(lattice, b, input, false, filtered.get(), runner) |
                         permutohedral::cpu::filter_image<scalar_t>(lattice, b, input, true, reversed.get(), runner);
      dense_crf::cpu::gradient_image<scalar_t>(
          call.probs.data_ptr<scalar_t>() + b * C * N, C, call.mask_of(b), filtered.get(), reversed.get(),
          lattice.weight_of(b), N, scale.data_ptr<scalar_t>()[b], grad.data_ptr<scalar_t>() + b * C * N, runner);
    });
  });
  raise_for_filter_status(op, "probs", filter_status);
  return grad.to(probs.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(boxloss, CPU, m) {
  m.impl("dense_crf_loss", &dense_crf_loss_cpu);
  m.impl("_dense_crf_loss_backward", &dense_crf_loss_backward_cpu);
}

}  // namespace ops
}  // namespace boxloss
