// CUDA kernels of the Sparse-CRF ops: device guard, current stream and
// buffers around the torch-free launchers of csrc/kernels/sparse_crf.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "boxloss/sparse_crf/cuda.h"
#include "sparse_crf.h"

namespace boxloss {
namespace ops {
namespace {

sparse_crf::cuda::DType kernel_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return sparse_crf::cuda::DType::kFloat16;
    case at::kBFloat16: return sparse_crf::cuda::DType::kBFloat16;
    case at::kDouble: return sparse_crf::cuda::DType::kFloat64;
    default: return sparse_crf::cuda::DType::kFloat32;
  }
}

at::Tensor sparse_crf_loss_cuda(const at::Tensor& probs, const at::Tensor& image,
                                const std::optional<at::Tensor>& valid_mask, at::OptionalIntArrayRef channels,
                                double sigma, int64_t neighbourhood, int64_t dilation, c10::string_view kind) {
  TORCH_CHECK_VALUE(probs.device().is_cuda(), "sparse_crf_loss: probs must be a CUDA tensor here");
  const c10::cuda::CUDAGuard guard(probs.device());
  SparseCRFCall call = prepare_sparse_crf_call("sparse_crf_loss", probs, image, valid_mask, channels, sigma,
                                               neighbourhood, dilation, kind, probs.scalar_type());
  const sparse_crf::Problem& p = call.problem;
  const at::ScalarType acc = accumulation_dtype(probs.scalar_type());
  const int64_t blocks = sparse_crf::cuda::forward_blocks_per_image(p);
  at::Tensor partials = at::empty({p.batch, blocks}, probs.options().dtype(acc));
  at::Tensor status = at::zeros({p.batch}, probs.options().dtype(at::kInt));
  C10_CUDA_CHECK(sparse_crf::cuda::launch_forward(p, kernel_dtype(probs.scalar_type()), partials.data_ptr(),
                                                  status.data_ptr<int32_t>(), at::cuda::getCurrentCUDAStream()));
  // One small device-to-host copy: bad input raises instead of returning NaN.
  raise_for_input_status(status.cpu(), call);
  return divide_by_counts(partials.sum(1), valid_pixel_counts(call, acc)).to(probs.scalar_type());
}

at::Tensor sparse_crf_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& probs, const at::Tensor& image,
                                         const std::optional<at::Tensor>& valid_mask, at::OptionalIntArrayRef channels,
                                         double sigma, int64_t neighbourhood, int64_t dilation, c10::string_view kind) {
  const c10::cuda::CUDAGuard guard(probs.device());
  SparseCRFCall call = prepare_sparse_crf_call("_sparse_crf_loss_backward", probs, image, valid_mask, channels, sigma,
                                               neighbourhood, dilation, kind, probs.scalar_type());
  const sparse_crf::Problem& p = call.problem;
  TORCH_CHECK_VALUE(grad.dim() == 1 && grad.size(0) == p.batch,
                    "_sparse_crf_loss_backward: grad must have shape (B,) = (", p.batch, ",), got ", grad.sizes());
  const at::ScalarType acc = accumulation_dtype(probs.scalar_type());
  const at::Tensor scale = divide_by_counts(grad.to(probs.device(), acc), valid_pixel_counts(call, acc)).contiguous();
  at::Tensor out = call.channels.defined() ? at::zeros_like(call.probs) : at::empty_like(call.probs);
  C10_CUDA_CHECK(sparse_crf::cuda::launch_backward(p, kernel_dtype(probs.scalar_type()), scale.data_ptr(),
                                                   out.data_ptr(), at::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(boxloss, CUDA, m) {
  m.impl("sparse_crf_loss", &sparse_crf_loss_cuda);
  m.impl("_sparse_crf_loss_backward", &sparse_crf_loss_backward_cuda);
}

}  // namespace ops
}  // namespace boxloss
