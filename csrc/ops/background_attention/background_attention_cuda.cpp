// CUDA kernels of the background-attention and pooling ops: device guard,
// current stream and the torch-free launchers of
// csrc/kernels/background_attention around the shared body.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "background_attention.h"
#include "boxloss/background_attention/cuda.h"
#include "boxloss/row_col_max/cuda.h"

namespace boxloss {
namespace ops {
namespace {

namespace ba = background_attention;

cudaStream_t stream() { return at::cuda::getCurrentCUDAStream(); }

void resolve_boxes_cuda(const at::Tensor& boxes, const at::Tensor& box_batch, double spatial_scale, int64_t batch,
                        int64_t height, int64_t width, at::Tensor& ranges, at::Tensor& status) {
  const int64_t K = boxes.size(0);
  const at::Tensor labels = at::zeros({K}, box_batch.options());
  C10_CUDA_CHECK(row_col_max::cuda::launch_resolve_boxes(
      boxes.data_ptr<double>(), box_batch.data_ptr<int64_t>(), labels.data_ptr<int64_t>(), K, spatial_scale, batch, 1,
      height, width, ranges.data_ptr<int64_t>(), status.data_ptr<int32_t>(), stream()));
}

void mark_inside_cuda(const at::Tensor& ranges, const at::Tensor& box_batch, at::Tensor& inside) {
  C10_CUDA_CHECK(ba::cuda::launch_mark_inside(ranges.data_ptr<int64_t>(), box_batch.data_ptr<int64_t>(), ranges.size(0),
                                              inside.size(1), inside.size(2), inside.data_ptr<uint8_t>(), stream()));
}

void attention_forward_cuda(const at::Tensor& dots, const at::Tensor& norms, const at::Tensor& valid,
                            const at::Tensor& num_valid, const at::Tensor& inside, const at::Tensor& fallback,
                            at::Tensor& attention) {
  AT_DISPATCH_FLOATING_TYPES(dots.scalar_type(), "background_attention_cuda", [&] {
    const auto p = attention_problem<scalar_t>(dots, norms, valid, num_valid, inside, fallback);
    C10_CUDA_CHECK(ba::cuda::launch_attention_forward<scalar_t>(p, dots.data_ptr<scalar_t>(),
                                                                attention.data_ptr<scalar_t>(), stream()));
  });
}

void attention_backward_cuda(const at::Tensor& grad_attention, at::Tensor& dots, const at::Tensor& norms,
                             const at::Tensor& valid, const at::Tensor& num_valid, const at::Tensor& inside,
                             const at::Tensor& fallback, at::Tensor& coef) {
  AT_DISPATCH_FLOATING_TYPES(dots.scalar_type(), "_background_attention_backward_cuda", [&] {
    const auto p = attention_problem<scalar_t>(dots, norms, valid, num_valid, inside, fallback);
    C10_CUDA_CHECK(ba::cuda::launch_attention_backward<scalar_t>(
        p, grad_attention.data_ptr<scalar_t>(), dots.data_ptr<scalar_t>(), coef.data_ptr<scalar_t>(), stream()));
  });
}

void pool_forward_cuda(const at::Tensor& features, const at::Tensor& attention, const at::Tensor& ranges,
                       const at::Tensor& box_batch, int64_t output_size, at::Tensor& pooled, at::Tensor& weight_sum) {
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "background_aware_pool_cuda", [&] {
    const auto p = pool_problem<scalar_t>(features, attention, ranges, box_batch, output_size);
    C10_CUDA_CHECK(ba::cuda::launch_pool_forward<scalar_t>(p, pooled.data_ptr<scalar_t>(),
                                                           weight_sum.data_ptr<scalar_t>(), stream()));
  });
}

void pool_backward_cuda(const at::Tensor& grad_pooled, const at::Tensor& features, const at::Tensor& attention,
                        const at::Tensor& pooled, const at::Tensor& weight_sum, const at::Tensor& ranges,
                        const at::Tensor& box_batch, int64_t output_size, at::Tensor& grad_features,
                        at::Tensor& grad_attention) {
  const int64_t B = features.size(0);
  // A bad batch index would write outside the gradients: one small reduction and host copy.
  const at::Tensor bounds = at::stack({box_batch.min(), box_batch.max()}).cpu();
  TORCH_CHECK_VALUE(bounds[0].item<int64_t>() >= 0 && bounds[1].item<int64_t>() < B,
                    "_background_aware_pool_backward: box_batch must lie in [0, ", B, ")");
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "_background_aware_pool_backward_cuda", [&] {
    const auto p = pool_problem<scalar_t>(features, attention, ranges, box_batch, output_size);
    C10_CUDA_CHECK(ba::cuda::launch_pool_backward<scalar_t>(
        p, grad_pooled.data_ptr<scalar_t>(), pooled.data_ptr<scalar_t>(), weight_sum.data_ptr<scalar_t>(),
        grad_features.data_ptr<scalar_t>(), grad_attention.data_ptr<scalar_t>(), stream()));
  });
}

const BackgroundAttentionKernels kCudaKernels{resolve_boxes_cuda,      mark_inside_cuda,  attention_forward_cuda,
                                              attention_backward_cuda, pool_forward_cuda, pool_backward_cuda};

AttentionResult background_attention_cuda(const at::Tensor& features, const at::Tensor& boxes,
                                          const at::Tensor& box_batch, int64_t grid_size, double spatial_scale,
                                          const std::optional<at::Tensor>& bg_mask, double min_background) {
  const c10::cuda::CUDAGuard guard(features.device());
  return background_attention_impl(features, boxes, box_batch, grid_size, spatial_scale, bg_mask, min_background,
                                   kCudaKernels);
}

at::Tensor background_attention_backward_cuda(const at::Tensor& grad_attention, const at::Tensor& grad_queries,
                                              const at::Tensor& features, const at::Tensor& queries,
                                              const at::Tensor& valid, const at::Tensor& fallback,
                                              const at::Tensor& inside, const at::Tensor& background,
                                              int64_t grid_size) {
  const c10::cuda::CUDAGuard guard(features.device());
  return background_attention_backward_impl(grad_attention, grad_queries, features, queries, valid, fallback, inside,
                                            background, grid_size, kCudaKernels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> background_aware_pool_cuda(const at::Tensor& features,
                                                                          const at::Tensor& attention,
                                                                          const at::Tensor& boxes,
                                                                          const at::Tensor& box_batch,
                                                                          int64_t output_size, double spatial_scale) {
  const c10::cuda::CUDAGuard guard(features.device());
  return background_aware_pool_impl(features, attention, boxes, box_batch, output_size, spatial_scale, kCudaKernels);
}

std::tuple<at::Tensor, at::Tensor> background_aware_pool_backward_cuda(
    const at::Tensor& grad_pooled, const at::Tensor& features, const at::Tensor& attention, const at::Tensor& pooled,
    const at::Tensor& weight_sum, const at::Tensor& ranges, const at::Tensor& box_batch, int64_t output_size) {
  const c10::cuda::CUDAGuard guard(features.device());
  return background_aware_pool_backward_impl(grad_pooled, features, attention, pooled, weight_sum, ranges, box_batch,
                                             output_size, kCudaKernels);
}

PoolingResult background_attention_pool_cuda(const at::Tensor& features, const at::Tensor& boxes,
                                             const at::Tensor& box_batch, int64_t grid_size, int64_t output_size,
                                             double spatial_scale, const std::optional<at::Tensor>& bg_mask,
                                             double min_background) {
  const c10::cuda::CUDAGuard guard(features.device());
  return background_attention_pool_impl(features, boxes, box_batch, grid_size, output_size, spatial_scale, bg_mask,
                                        min_background, kCudaKernels);
}

at::Tensor background_attention_pool_backward_cuda(const at::Tensor& grad_pooled, const at::Tensor& grad_attention,
                                                   const at::Tensor& grad_queries, const at::Tensor& features,
                                                   const at::Tensor& attention, const at::Tensor& queries,
                                                   const at::Tensor& valid, const at::Tensor& fallback,
                                                   const at::Tensor& pooled, const at::Tensor& weight_sum,
                                                   const at::Tensor& ranges, const at::Tensor& box_batch,
                                                   const at::Tensor& inside, const at::Tensor& background,
                                                   int64_t grid_size, int64_t output_size) {
  const c10::cuda::CUDAGuard guard(features.device());
  return background_attention_pool_backward_impl(grad_pooled, grad_attention, grad_queries, features, attention,
                                                 queries, valid, fallback, pooled, weight_sum, ranges, box_batch,
                                                 inside, background, grid_size, output_size, kCudaKernels);
}

}  // namespace

TORCH_LIBRARY_IMPL(boxloss, CUDA, m) {
  m.impl("background_attention", &background_attention_cuda);
  m.impl("_background_attention_backward", &background_attention_backward_cuda);
  m.impl("background_aware_pool", &background_aware_pool_cuda);
  m.impl("_background_aware_pool_backward", &background_aware_pool_backward_cuda);
  m.impl("background_attention_pool", &background_attention_pool_cuda);
  m.impl("_background_attention_pool_backward", &background_attention_pool_backward_cuda);
}

}  // namespace ops
}  // namespace boxloss
