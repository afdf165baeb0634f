// CUDA kernels of the DenseCRF loss ops: the masked probabilities and the
// mask go through the lattice in one pass (C+1 channels), then one kernel
// forms E and Z (forward) or, after the same filter and its transpose, the
// gradient (backward).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../permutohedral/permutohedral_cuda.h"
#include "boxloss/dense_crf/cuda.h"
#include "dense_crf.h"

namespace boxloss {
namespace ops {
namespace {

template <typename scalar>
permutohedral::cuda::FilterInput<scalar> masked_input(const DenseCRFCall& call) {
  permutohedral::cuda::FilterInput<scalar> input;
  input.values = call.probs.data_ptr<scalar>();
  input.channels = call.channels;
  input.mask = call.valid.defined() ? call.valid.data_ptr<uint8_t>() : nullptr;
  input.append_mask = true;
  return input;
}

std::vector<int32_t> to_vector(const at::Tensor& t) {
  const at::Tensor host = t.to(at::kCPU, at::kInt).contiguous();
  return std::vector<int32_t>(host.data_ptr<int32_t>(), host.data_ptr<int32_t>() + host.numel());
}

std::tuple<at::Tensor, at::Tensor> dense_crf_loss_cuda(const at::Tensor& probs,
                                                       const std::optional<at::Tensor>& valid_mask,
                                                       const at::Tensor& splat_index, const at::Tensor& splat_weight,
                                                       const at::Tensor& blur_neighbours,
                                                       const at::Tensor& vertex_offsets) {
  constexpr const char* op = "dense_crf_loss";
  const c10::cuda::CUDAGuard guard(probs.device());
  const DenseCRFCall call =
      prepare_dense_crf_call(op, probs, valid_mask, splat_index, splat_weight, blur_neighbours, vertex_offsets);
  const int64_t B = call.batch, C = call.channels, N = call.num_pixels;
  // A temporary: the backward filters again rather than keep it.
  at::Tensor filtered = at::empty({B, C + 1, probs.size(2), probs.size(3)}, call.probs.options());
  const int64_t blocks = dense_crf::cuda::energy_blocks_per_image(N);
  at::Tensor partial_energy = at::empty({B, blocks}, call.probs.options());
  at::Tensor partial_normaliser = at::empty({B, blocks}, call.probs.options());
  at::Tensor probs_status = at::zeros({B}, call.probs.options().dtype(at::kInt));
  at::Tensor filter_status;
  AT_DISPATCH_FLOATING_TYPES(call.probs.scalar_type(), "dense_crf_loss_cuda", [&] {
    filter_status = cuda_filter<scalar_t>(call.lattice, masked_input<scalar_t>(call), false, filtered);
    C10_CUDA_CHECK(dense_crf::cuda::launch_energy<scalar_t>(
        call.probs.data_ptr<scalar_t>(), B, C, N, masked_input<scalar_t>(call).mask, filtered.data_ptr<scalar_t>(),
        call.lattice.splat_weight.data_ptr<scalar_t>(), partial_energy.data_ptr<scalar_t>(),
        partial_normaliser.data_ptr<scalar_t>(), probs_status.data_ptr<int32_t>(), at::cuda::getCurrentCUDAStream()));
  });
  // One small device-to-host copy: bad input raises instead of returning NaN.
  raise_for_dense_crf_probs_status(op, to_vector(probs_status), call.probs);
  raise_for_filter_status(op, "probs", to_vector(filter_status));
  const at::Tensor paired = images_with_pairs(call);
  at::Tensor energy = partial_energy.to(at::kDouble).sum(1);
  at::Tensor normaliser = partial_normaliser.to(at::kDouble).sum(1);
  energy = at::where(paired, energy, at::zeros_like(energy));
  normaliser = at::where(paired, normaliser, at::zeros_like(normaliser));
  return {energy.to(probs.scalar_type()), normaliser.to(probs.scalar_type())};
}

at::Tensor dense_crf_loss_backward_cuda(const at::Tensor& grad_energy, const at::Tensor& probs,
                                        const std::optional<at::Tensor>& valid_mask, const at::Tensor& splat_index,
                                        const at::Tensor& splat_weight, const at::Tensor& blur_neighbours,
                                        const at::Tensor& vertex_offsets) {
  constexpr const char* op = "_dense_crf_loss_backward";
  const c10::cuda::CUDAGuard guard(probs.device());
  const DenseCRFCall call =
      prepare_dense_crf_call(op, probs, valid_mask, splat_index, splat_weight, blur_neighbours, vertex_offsets);
  const int64_t B = call.batch, C = call.channels, N = call.num_pixels;
  TORCH_CHECK_VALUE(grad_energy.dim() == 1 && grad_energy.size(0) == B, op, ": grad_energy must have shape (B,) = (", B,
                    ",), got shape ", shape_string(grad_energy));
  const at::Tensor g = grad_energy.to(probs.device(), call.probs.scalar_type());
  const at::Tensor scale = at::where(images_with_pairs(call), g, at::zeros_like(g)).contiguous();
  at::Tensor forward = at::empty({B, C + 1, probs.size(2), probs.size(3)}, call.probs.options());
  at::Tensor reversed = at::empty_like(forward);
  at::Tensor grad = at::empty_like(call.probs);
  at::Tensor filter_status;
  AT_DISPATCH_FLOATING_TYPES(call.probs.scalar_type(), "_dense_crf_loss_backward_cuda", [&] {
    // The forward's filter again, then its transpose: the same lattice, blurred in reverse order.
    filter_status = cuda_filter<scalar_t>(call.lattice, masked_input<scalar_t>(call), false, forward);
    filter_status =
        filter_status.bitwise_or(cuda_filter<scalar_t>(call.lattice, masked_input<scalar_t>(call), true, reversed));
    C10_CUDA_CHECK(dense_crf::cuda::launch_gradient<scalar_t>(
        call.probs.data_ptr<scalar_t>(), B, C, N, masked_input<scalar_t>(call).mask, forward.data_ptr<scalar_t>(),
        reversed.data_ptr<scalar_t>(), call.lattice.splat_weight.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(),
        grad.data_ptr<scalar_t>(), at::cuda::getCurrentCUDAStream()));
  });
  raise_for_filter_status(op, "probs", to_vector(filter_status));
  return grad.to(probs.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(boxloss, CUDA, m) {
  m.impl("dense_crf_loss", &dense_crf_loss_cuda);
  m.impl("_dense_crf_loss_backward", &dense_crf_loss_backward_cuda);
}

}  // namespace ops
}  // namespace boxloss
