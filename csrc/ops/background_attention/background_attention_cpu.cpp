// CPU kernels of the background-attention and pooling ops: at::parallel_for
// around the torch-free core of csrc/kernels/background_attention.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../row_col_max/row_col_max.h"
#include "background_attention.h"
#include "boxloss/background_attention/cpu.h"
#include "boxloss/row_col_max/cpu.h"

namespace boxloss {
namespace ops {
namespace {

namespace ba = background_attention;

void resolve_boxes_cpu(const at::Tensor& boxes, const at::Tensor& box_batch, double spatial_scale, int64_t batch,
                       int64_t height, int64_t width, at::Tensor& ranges, at::Tensor& status) {
  const int64_t K = boxes.size(0);
  const at::Tensor labels = at::zeros({K}, box_batch.options());
  row_col_max::cpu::resolve_boxes(boxes.data_ptr<double>(), box_batch.data_ptr<int64_t>(), labels.data_ptr<int64_t>(),
                                  0, K, spatial_scale, batch, 1, height, width, ranges.data_ptr<int64_t>(),
                                  status.data_ptr<int32_t>());
}

void mark_inside_cpu(const at::Tensor& ranges, const at::Tensor& box_batch, at::Tensor& inside) {
  ba::cpu::mark_inside(ranges.data_ptr<int64_t>(), box_batch.data_ptr<int64_t>(), ranges.size(0), inside.size(1),
                       inside.size(2), inside.data_ptr<uint8_t>());
}

void attention_forward_cpu(const at::Tensor& dots, const at::Tensor& norms, const at::Tensor& valid,
                           const at::Tensor& num_valid, const at::Tensor& inside, const at::Tensor& fallback,
                           at::Tensor& attention) {
  AT_DISPATCH_FLOATING_TYPES(dots.scalar_type(), "background_attention_cpu", [&] {
    const auto p = attention_problem<scalar_t>(dots, norms, valid, num_valid, inside, fallback);
    at::parallel_for(0, p.batch * p.pixels, 4096, [&](int64_t begin, int64_t end) {
      ba::cpu::attention_forward<scalar_t>(p, dots.data_ptr<scalar_t>(), begin, end, attention.data_ptr<scalar_t>());
    });
  });
}

void attention_backward_cpu(const at::Tensor& grad_attention, at::Tensor& dots, const at::Tensor& norms,
                            const at::Tensor& valid, const at::Tensor& num_valid, const at::Tensor& inside,
                            const at::Tensor& fallback, at::Tensor& coef) {
  AT_DISPATCH_FLOATING_TYPES(dots.scalar_type(), "_background_attention_backward_cpu", [&] {
    const auto p = attention_problem<scalar_t>(dots, norms, valid, num_valid, inside, fallback);
    at::parallel_for(0, p.batch * p.pixels, 4096, [&](int64_t begin, int64_t end) {
      ba::cpu::attention_backward<scalar_t>(p, grad_attention.data_ptr<scalar_t>(), dots.data_ptr<scalar_t>(), begin,
                                            end, coef.data_ptr<scalar_t>());
    });
  });
}

void pool_forward_cpu(const at::Tensor& features, const at::Tensor& attention, const at::Tensor& ranges,
                      const at::Tensor& box_batch, int64_t output_size, at::Tensor& pooled, at::Tensor& weight_sum) {
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "background_aware_pool_cpu", [&] {
    const auto p = pool_problem<scalar_t>(features, attention, ranges, box_batch, output_size);
    at::parallel_for(0, p.num_boxes * p.bins(), 1, [&](int64_t begin, int64_t end) {
      ba::cpu::pool_forward<scalar_t>(p, begin, end, pooled.data_ptr<scalar_t>(), weight_sum.data_ptr<scalar_t>());
    });
  });
}

void pool_backward_cpu(const at::Tensor& grad_pooled, const at::Tensor& features, const at::Tensor& attention,
                       const at::Tensor& pooled, const at::Tensor& weight_sum, const at::Tensor& ranges,
                       const at::Tensor& box_batch, int64_t output_size, at::Tensor& grad_features,
                       at::Tensor& grad_attention) {
  const int64_t B = features.size(0);
  const int64_t* bb = box_batch.data_ptr<int64_t>();
  for (int64_t k = 0; k < box_batch.numel(); ++k) {
    TORCH_CHECK_VALUE(bb[k] >= 0 && bb[k] < B, "_background_aware_pool_backward: box_batch must lie in [0, ", B,
                      "), got box_batch[", k, "] = ", bb[k]);
  }
  const ba::cpu::ImagePlan plan = ba::cpu::plan_by_image(bb, box_batch.numel(), B);
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "_background_aware_pool_backward_cpu", [&] {
    const auto p = pool_problem<scalar_t>(features, attention, ranges, box_batch, output_size);
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      ba::cpu::pool_backward<scalar_t>(p, plan, grad_pooled.data_ptr<scalar_t>(), pooled.data_ptr<scalar_t>(),
                                       weight_sum.data_ptr<scalar_t>(), begin, end, grad_features.data_ptr<scalar_t>(),
                                       grad_attention.data_ptr<scalar_t>());
    });
  });
}

const BackgroundAttentionKernels kCpuKernels{resolve_boxes_cpu,      mark_inside_cpu,  attention_forward_cpu,
                                             attention_backward_cpu, pool_forward_cpu, pool_backward_cpu};

AttentionResult background_attention_cpu(const at::Tensor& features, const at::Tensor& boxes,
                                         const at::Tensor& box_batch, int64_t grid_size, double spatial_scale,
                                         const std::optional<at::Tensor>& bg_mask, double min_background) {
  return background_attention_impl(features, boxes, box_batch, grid_size, spatial_scale, bg_mask, min_background,
                                   kCpuKernels);
}

at::Tensor background_attention_backward_cpu(const at::Tensor& grad_attention, const at::Tensor& grad_queries,
                                             const at::Tensor& features, const at::Tensor& queries,
                                             const at::Tensor& valid, const at::Tensor& fallback,
                                             const at::Tensor& inside, const at::Tensor& background,
                                             int64_t grid_size) {
  return background_attention_backward_impl(grad_attention, grad_queries, features, queries, valid, fallback, inside,
                                            background, grid_size, kCpuKernels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> background_aware_pool_cpu(const at::Tensor& features,
                                                                         const at::Tensor& attention,
                                                                         const at::Tensor& boxes,
                                                                         const at::Tensor& box_batch,
                                                                         int64_t output_size, double spatial_scale) {
  return background_aware_pool_impl(features, attention, boxes, box_batch, output_size, spatial_scale, kCpuKernels);
}

std::tuple<at::Tensor, at::Tensor> background_aware_pool_backward_cpu(
    const at::Tensor& grad_pooled, const at::Tensor& features, const at::Tensor& attention, const at::Tensor& pooled,
    const at::Tensor& weight_sum, const at::Tensor& ranges, const at::Tensor& box_batch, int64_t output_size) {
  return background_aware_pool_backward_impl(grad_pooled, features, attention, pooled, weight_sum, ranges, box_batch,
                                             output_size, kCpuKernels);
}

PoolingResult background_attention_pool_cpu(const at::Tensor& features, const at::Tensor& boxes,
                                            const at::Tensor& box_batch, int64_t grid_size, int64_t output_size,
                                            double spatial_scale, const std::optional<at::Tensor>& bg_mask,
                                            double min_background) {
  return background_attention_pool_impl(features, boxes, box_batch, grid_size, output_size, spatial_scale, bg_mask,
                                        min_background, kCpuKernels);
}

at::Tensor background_attention_pool_backward_cpu(const at::Tensor& grad_pooled, const at::Tensor& grad_attention,
                                                  const at::Tensor& grad_queries, const at::Tensor& features,
                                                  const at::Tensor& attention, const at::Tensor& queries,
                                                  const at::Tensor& valid, const at::Tensor& fallback,
                                                  const at::Tensor& pooled, const at::Tensor& weight_sum,
                                                  const at::Tensor& ranges, const at::Tensor& box_batch,
                                                  const at::Tensor& inside, const at::Tensor& background,
                                                  int64_t grid_size, int64_t output_size) {
  return background_attention_pool_backward_impl(grad_pooled, grad_attention, grad_queries, features, attention,
                                                 queries, valid, fallback, pooled, weight_sum, ranges, box_batch,
                                                 inside, background, grid_size, output_size, kCpuKernels);
}

}  // namespace

TORCH_LIBRARY_IMPL(boxloss, CPU, m) {
  m.impl("background_attention", &background_attention_cpu);
  m.impl("_background_attention_backward", &background_attention_backward_cpu);
  m.impl("background_aware_pool", &background_aware_pool_cpu);
  m.impl("_background_aware_pool_backward", &background_aware_pool_backward_cpu);
  m.impl("background_attention_pool", &background_attention_pool_cpu);
  m.impl("_background_attention_pool_backward", &background_attention_pool_backward_cpu);
}

}  // namespace ops
}  // namespace boxloss
