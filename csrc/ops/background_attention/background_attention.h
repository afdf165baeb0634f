// Device-independent part of the background-attention and background-aware
// pooling ops: argument checks, the GEMMs (at::bmm) and the buffers.  The
// per-pixel and per-bin steps between them are the device kernels, handed in
// as a Kernels table by the CPU and CUDA registrations.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "boxloss/background_attention/problem.h"

namespace boxloss {
namespace ops {

struct BackgroundAttentionKernels {
  // ranges (K, 4) int64 and status (K,) int32 of the boxes (BoxStatus bits).
  void (*resolve_boxes)(const at::Tensor& boxes, const at::Tensor& box_batch, double spatial_scale, int64_t batch,
                        int64_t height, int64_t width, at::Tensor& ranges, at::Tensor& status);
  // inside (B, h, w) uint8, zeroed, set to 1 on the pixels of every box.
  void (*mark_inside)(const at::Tensor& ranges, const at::Tensor& box_batch, at::Tensor& inside);
  // The per-pixel steps of math.h: attention (B, P) from dots (B, J, P).
  void (*attention_forward)(const at::Tensor& dots, const at::Tensor& norms, const at::Tensor& valid,
                            const at::Tensor& num_valid, const at::Tensor& inside, const at::Tensor& fallback,
                            at::Tensor& attention);
  // Overwrites dots with g and fills coef (B, P).
  void (*attention_backward)(const at::Tensor& grad_attention, at::Tensor& dots, const at::Tensor& norms,
                             const at::Tensor& valid, const at::Tensor& num_valid, const at::Tensor& inside,
                             const at::Tensor& fallback, at::Tensor& coef);
  void (*pool_forward)(const at::Tensor& features, const at::Tensor& attention, const at::Tensor& ranges,
                       const at::Tensor& box_batch, int64_t output_size, at::Tensor& pooled, at::Tensor& weight_sum);
  // grad_features and grad_attention are zeroed by the caller.
  void (*pool_backward)(const at::Tensor& grad_pooled, const at::Tensor& features, const at::Tensor& attention,
                        const at::Tensor& pooled, const at::Tensor& weight_sum, const at::Tensor& ranges,
                        const at::Tensor& box_batch, int64_t output_size, at::Tensor& grad_features,
                        at::Tensor& grad_attention);
};

// The kernels' views of the tensors, shared by the CPU and CUDA registrations.
template <typename scalar>
background_attention::AttentionProblem<scalar> attention_problem(const at::Tensor& dots, const at::Tensor& norms,
                                                                 const at::Tensor& valid, const at::Tensor& num_valid,
                                                                 const at::Tensor& inside, const at::Tensor& fallback) {
  background_attention::AttentionProblem<scalar> p;
  p.norms = norms.data_ptr<scalar>();
  p.valid = valid.data_ptr<uint8_t>();
  p.num_valid = num_valid.data_ptr<int64_t>();
  p.inside = inside.data_ptr<uint8_t>();
  p.fallback = fallback.data_ptr<uint8_t>();
  p.batch = dots.size(0);
  p.num_queries = dots.size(1);
  p.pixels = dots.size(2);
  return p;
}

template <typename scalar>
background_attention::PoolProblem<scalar> pool_problem(const at::Tensor& features, const at::Tensor& attention,
                                                       const at::Tensor& ranges, const at::Tensor& box_batch,
                                                       int64_t output_size) {
  background_attention::PoolProblem<scalar> p;
  p.features = features.data_ptr<scalar>();
  p.attention = attention.data_ptr<scalar>();
  p.ranges = ranges.data_ptr<int64_t>();
  p.box_batch = box_batch.data_ptr<int64_t>();
  p.batch = features.size(0);
  p.channels = features.size(1);
  p.height = features.size(2);
  p.width = features.size(3);
  p.num_boxes = ranges.size(0);
  p.output_size = output_size;
  return p;
}

using AttentionResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

AttentionResult background_attention_impl(const at::Tensor& features, const at::Tensor& boxes,
                                          const at::Tensor& box_batch, int64_t grid_size, double spatial_scale,
                                          const std::optional<at::Tensor>& bg_mask, double min_background,
                                          const BackgroundAttentionKernels& kernels);

at::Tensor background_attention_backward_impl(const at::Tensor& grad_attention, const at::Tensor& grad_queries,
                                              const at::Tensor& features, const at::Tensor& queries,
                                              const at::Tensor& valid, const at::Tensor& fallback,
                                              const at::Tensor& inside, const at::Tensor& background, int64_t grid_size,
                                              const BackgroundAttentionKernels& kernels,
                                              at::Tensor* accumulate = nullptr);

// check_values: raise for non-finite features or an attention outside [0, 1]
// (off when the attention is the fused op's own, computed from checked features).
std::tuple<at::Tensor, at::Tensor, at::Tensor> background_aware_pool_impl(
    const at::Tensor& features, const at::Tensor& attention, const at::Tensor& boxes, const at::Tensor& box_batch,
    int64_t output_size, double spatial_scale, const BackgroundAttentionKernels& kernels, bool check_values = true);

std::tuple<at::Tensor, at::Tensor> background_aware_pool_backward_impl(
    const at::Tensor& grad_pooled, const at::Tensor& features, const at::Tensor& attention, const at::Tensor& pooled,
    const at::Tensor& weight_sum, const at::Tensor& ranges, const at::Tensor& box_batch, int64_t output_size,
    const BackgroundAttentionKernels& kernels);

// Attention followed by pooling as one op, so that its backward adds the
// attention's feature gradient into the pooling's (one feature-sized buffer
// instead of two that autograd would then sum).
using PoolingResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                 at::Tensor, at::Tensor>;

PoolingResult background_attention_pool_impl(const at::Tensor& features, const at::Tensor& boxes,
                                             const at::Tensor& box_batch, int64_t grid_size, int64_t output_size,
                                             double spatial_scale, const std::optional<at::Tensor>& bg_mask,
                                             double min_background, const BackgroundAttentionKernels& kernels);

at::Tensor background_attention_pool_backward_impl(
    const at::Tensor& grad_pooled, const at::Tensor& grad_attention, const at::Tensor& grad_queries,
    const at::Tensor& features, const at::Tensor& attention, const at::Tensor& queries, const at::Tensor& valid,
    const at::Tensor& fallback, const at::Tensor& pooled, const at::Tensor& weight_sum, const at::Tensor& ranges,
    const at::Tensor& box_batch, const at::Tensor& inside, const at::Tensor& background, int64_t grid_size,
    int64_t output_size, const BackgroundAttentionKernels& kernels);

}  // namespace ops
}  // namespace boxloss
