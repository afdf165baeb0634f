// Schemas, checks and the device-independent body (GEMMs via at::bmm) of the
// background-attention and background-aware pooling ops.
//
// Forward of the attention: per image, the cell weights W (J, P) = M(p) [p in
// G(j)] / |G(j) & M| turn Eq. 1 into one GEMM, q = f W^T; the dots
// q_hat_j . f(p) of Eq. 3 are a second GEMM; the kernel combines them per
// pixel.  The (B, J, P) dots are not kept for the backward: they are
// recomputed there by one GEMM of the same cost as the forward's, which is
// cheaper than holding them across the network's forward (and keeps the
// saved state to the features, the queries and three (B, h, w) masks).
#include "background_attention.h"

#include <torch/library.h>

#include <cmath>
#include <sstream>

#include "../row_col_max/row_col_max.h"
#include "boxloss/background_attention/math.h"

namespace boxloss {
namespace ops {
namespace {

constexpr const char* kAttention = "background_attention";
constexpr const char* kPool = "background_aware_pool";

std::string shape_of(const at::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

at::ScalarType compute_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

void check_features(const char* op, const at::Tensor& features) {
  TORCH_CHECK_VALUE(features.dim() == 4, op, ": features must have shape (B, D, h, w), got shape ", shape_of(features));
  const auto dtype = features.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
                   ": features must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK_VALUE(features.numel() > 0, op, ": features must be non-empty in every dimension, got shape ",
                    shape_of(features));
}

void check_boxes(const char* op, const at::Tensor& features, const at::Tensor& boxes, const at::Tensor& box_batch,
                 double spatial_scale) {
  TORCH_CHECK_VALUE(boxes.dim() == 2 && boxes.size(1) == 4, op,
                    ": boxes must have shape (K, 4) holding x0, y0, x1, y1, got shape ", shape_of(boxes));
  TORCH_CHECK_TYPE(boxes.is_floating_point(), op, ": boxes must be a floating-point tensor, got ", boxes.scalar_type());
  TORCH_CHECK_VALUE(box_batch.dim() == 1 && box_batch.size(0) == boxes.size(0), op,
                    ": box_batch must have shape (K,) = (", boxes.size(0), ",), got shape ", shape_of(box_batch));
  TORCH_CHECK_TYPE(box_batch.scalar_type() == at::kLong, op, ": box_batch must be an int64 tensor, got ",
                   box_batch.scalar_type());
  TORCH_CHECK_VALUE(boxes.device() == features.device() && box_batch.device() == features.device(), op,
                    ": boxes and box_batch must be on the device of features (", features.device(), "), got ",
                    boxes.device(), " and ", box_batch.device());
  TORCH_CHECK_VALUE(std::isfinite(spatial_scale) && spatial_scale > 0, op,
                    ": spatial_scale must be a positive finite number, got ", spatial_scale);
}

void check_finite(const char* op, const char* name, const at::Tensor& t) {
  // A finite sum proves every element finite without a features-sized bool
  // temporary; only when it is not (NaN, infinity, or an overflowing sum of
  // huge values) is each element tested.
  const bool finite = at::isfinite(t.sum()).item<bool>() || at::isfinite(t).all().item<bool>();
  TORCH_CHECK_VALUE(finite, op, ": ", name, " must be finite, but it contains ",
                    t.isnan().any().item<bool>() ? "NaN" : "Inf");
}

// Every value in [0, 1]: one min/max pass (NaN propagates into both, so it fails too).
void check_unit_interval(const char* op, const char* name, const at::Tensor& t) {
  if (t.numel() == 0) return;
  const auto [min, max] = at::aminmax(t.reshape(-1));
  const at::Tensor bounds = at::stack({min, max}).to(at::kCPU, at::kDouble);
  const double low = bounds.data_ptr<double>()[0], high = bounds.data_ptr<double>()[1];
  if (low >= 0 && high <= 1) return;
  std::ostringstream what;
  if (std::isnan(low) || std::isnan(high)) {
    what << "NaN";
  } else if (std::isinf(low) || std::isinf(high)) {
    what << "Inf";
  } else {
    what << "values outside [0, 1] (min " << low << ", max " << high << ")";
  }
  TORCH_CHECK_VALUE(false, op, ": ", name, " must hold values in [0, 1] (the background attention A), but it contains ",
                    what.str());
}

// Resolves the boxes under the box convention and raises for bad ones.
at::Tensor resolve(const char* op, const at::Tensor& boxes, const at::Tensor& box_batch, double spatial_scale,
                   int64_t batch, int64_t height, int64_t width, const BackgroundAttentionKernels& kernels) {
  const int64_t K = boxes.size(0);
  const at::Tensor boxes_d = boxes.to(at::kDouble).contiguous();
  const at::Tensor batch_c = box_batch.contiguous();
  at::Tensor ranges = at::empty({K, 4}, box_batch.options());
  at::Tensor status = at::zeros({K}, box_batch.options().dtype(at::kInt));
  if (K > 0) {
    kernels.resolve_boxes(boxes_d, batch_c, spatial_scale, batch, height, width, ranges, status);
    // The boxes of these ops carry no label: one channel, label 0.
    const at::Tensor labels = at::zeros({K}, box_batch.options());
    raise_for_box_status(op, status.cpu(), boxes_d, batch_c, labels, batch, 1);
  }
  return ranges;
}

// Cell weights (B, J, P): background pixels of cell j weighted 1 / count(j),
// and the counts (B, J).
std::pair<at::Tensor, at::Tensor> cell_weights(const at::Tensor& background, int64_t grid_size, at::ScalarType dtype) {
  const int64_t B = background.size(0), h = background.size(1), w = background.size(2);
  const auto long_options = background.options().dtype(at::kLong);
  const at::Tensor row_cell = (at::arange(1, h + 1, long_options) * grid_size - 1).div(h, "floor");
  const at::Tensor col_cell = (at::arange(1, w + 1, long_options) * grid_size - 1).div(w, "floor");
  const at::Tensor cell = (row_cell.unsqueeze(1) * grid_size + col_cell.unsqueeze(0)).reshape({h * w});
  const at::Tensor member = at::one_hot(cell, grid_size * grid_size).t().to(dtype);              // (J, P)
  const at::Tensor weights = member.unsqueeze(0) * background.reshape({B, 1, h * w}).to(dtype);  // (B, J, P)
  const at::Tensor counts = weights.sum(2);
  return {weights.div_(counts.clamp_min(1).unsqueeze(2)), counts};
}

}  // namespace

AttentionResult background_attention_impl(const at::Tensor& features, const at::Tensor& boxes,
                                          const at::Tensor& box_batch, int64_t grid_size, double spatial_scale,
                                          const std::optional<at::Tensor>& bg_mask, double min_background,
                                          const BackgroundAttentionKernels& kernels) {
  check_features(kAttention, features);
  check_boxes(kAttention, features, boxes, box_batch, spatial_scale);
  TORCH_CHECK_VALUE(grid_size >= 1, kAttention, ": grid_size must be >= 1, got ", grid_size);
  TORCH_CHECK_VALUE(min_background >= 0 && min_background <= 1, kAttention, ": min_background must lie in [0, 1], got ",
                    min_background);
  const int64_t B = features.size(0), D = features.size(1), h = features.size(2), w = features.size(3);
  const int64_t P = h * w;
  if (bg_mask.has_value()) {
    TORCH_CHECK_VALUE(bg_mask->dim() == 3 && bg_mask->size(0) == B && bg_mask->size(1) == h && bg_mask->size(2) == w,
                      kAttention, ": bg_mask must have shape (B, h, w) = (", B, ", ", h, ", ", w, "), got shape ",
                      shape_of(*bg_mask));
    TORCH_CHECK_TYPE(bg_mask->scalar_type() == at::kBool, kAttention, ": bg_mask must be a bool tensor, got ",
                     bg_mask->scalar_type());
    TORCH_CHECK_VALUE(bg_mask->device() == features.device(), kAttention,
                      ": bg_mask must be on the device of features (", features.device(), "), got ", bg_mask->device());
  }
  const at::ScalarType dtype = compute_dtype(features.scalar_type());
  const at::Tensor f = features.to(dtype).contiguous().view({B, D, P});
  check_finite(kAttention, "features", f);
  const at::Tensor ranges = resolve(kAttention, boxes, box_batch, spatial_scale, B, h, w, kernels);

  at::Tensor inside = at::zeros({B, h, w}, features.options().dtype(at::kByte));
  kernels.mark_inside(ranges, box_batch.contiguous(), inside);
  // A copy of bg_mask: the op's outputs must not alias its inputs.
  const at::Tensor background =
      bg_mask.has_value() ? at::empty({B, h, w}, inside.options().dtype(at::kBool)).copy_(*bg_mask) : inside.eq(0);

  auto [weights, counts] = cell_weights(background, grid_size, dtype);
  const at::Tensor q = at::bmm(f, weights.transpose(1, 2));  // (B, D, J): Eq. 1
  const at::Tensor valid = counts.gt(0);
  const at::Tensor num_valid = valid.sum(1);  // int64
  const at::Tensor fraction = background.reshape({B, P}).sum(1).to(at::kDouble) / static_cast<double>(P);
  const at::Tensor fallback = fraction.lt(min_background).logical_or(num_valid.eq(0));

  const at::Tensor q_hat = q / at::linalg_vector_norm(q, 2, {1}, true).clamp_min(background_attention::kNormEps);
  const at::Tensor dots = at::bmm(q_hat.transpose(1, 2), f).contiguous();   // (B, J, P)
  const at::Tensor norms = at::linalg_vector_norm(f, 2, {1}).contiguous();  // (B, P)
  at::Tensor attention = at::empty({B, P}, f.options());
  const at::Tensor valid_u8 = valid.to(at::kByte).contiguous();
  const at::Tensor fallback_u8 = fallback.to(at::kByte).contiguous();
  kernels.attention_forward(dots, norms, valid_u8, num_valid.contiguous(), inside, fallback_u8, attention);
  return {attention.view({B, h, w}).to(features.scalar_type()),
          q.transpose(1, 2).contiguous().to(features.scalar_type()),
          valid,
          fallback,
          inside.to(at::kBool),
          background};
}

at::Tensor background_attention_backward_impl(const at::Tensor& grad_attention, const at::Tensor& grad_queries,
                                              const at::Tensor& features, const at::Tensor& queries,
                                              const at::Tensor& valid, const at::Tensor& fallback,
                                              const at::Tensor& inside, const at::Tensor& background, int64_t grid_size,
                                              const BackgroundAttentionKernels& kernels, at::Tensor* accumulate) {
  constexpr const char* op = "_background_attention_backward";
  check_features(op, features);
  const int64_t B = features.size(0), D = features.size(1), h = features.size(2), w = features.size(3);
  const int64_t P = h * w, J = grid_size * grid_size;
  TORCH_CHECK_VALUE(grad_attention.sizes() == at::IntArrayRef({B, h, w}), op,
                    ": grad_attention must have shape (B, h, w), got shape ", shape_of(grad_attention));
  TORCH_CHECK_VALUE(grad_queries.sizes() == at::IntArrayRef({B, J, D}) && queries.sizes() == grad_queries.sizes(), op,
                    ": queries and grad_queries must have shape (B, grid_size^2, D) = (", B, ", ", J, ", ", D,
                    "), got shapes ", shape_of(queries), " and ", shape_of(grad_queries));
  TORCH_CHECK_VALUE(valid.sizes() == at::IntArrayRef({B, J}) && fallback.sizes() == at::IntArrayRef({B}) &&
                        inside.sizes() == at::IntArrayRef({B, h, w}) && background.sizes() == inside.sizes(),
                    op, ": valid, fallback, inside and background must be the forward's outputs");
  const at::ScalarType dtype = compute_dtype(features.scalar_type());
  const at::Tensor f = features.to(dtype).contiguous().view({B, D, P});
  const at::Tensor q = queries.to(dtype).transpose(1, 2);  // (B, D, J)
  const at::Tensor weights = cell_weights(background, grid_size, dtype).first;
  const at::Tensor q_norm = at::linalg_vector_norm(q, 2, {1}, true);  // (B, 1, J)
  const at::Tensor q_scale = q_norm.clamp_min(background_attention::kNormEps);
  const at::Tensor q_hat = q / q_scale;
  at::Tensor dots = at::bmm(q_hat.transpose(1, 2), f).contiguous();  // recomputed, then overwritten with g
  const at::Tensor norms = at::linalg_vector_norm(f, 2, {1}).contiguous();
  at::Tensor coef = at::empty({B, P}, f.options());
  const at::Tensor num_valid = valid.sum(1).contiguous();
  kernels.attention_backward(grad_attention.to(dtype).contiguous().view({B, P}), dots, norms,
                             valid.to(at::kByte).contiguous(), num_valid, inside.to(at::kByte).contiguous(),
                             fallback.to(at::kByte).contiguous(), coef);
  // Through q_hat = q / max(|q|, eps), then q = f W^T.
  const at::Tensor grad_q_hat = at::bmm(f, dots.transpose(1, 2));  // (B, D, J)
  const at::Tensor radial = (q_hat * grad_q_hat).sum(1, true);
  const at::Tensor grad_q =
      at::where(q_norm.gt(background_attention::kNormEps), grad_q_hat - q_hat * radial, grad_q_hat) / q_scale +
      grad_queries.to(dtype).transpose(1, 2);
  // grad = q_hat g + dq W + coef f, written into `accumulate` when given.
  const bool in_place = accumulate != nullptr && accumulate->scalar_type() == dtype && accumulate->is_contiguous();
  at::Tensor grad = in_place ? accumulate->view({B, D, P}).baddbmm_(q_hat, dots) : at::bmm(q_hat, dots);
  grad.baddbmm_(grad_q, weights);
  grad.addcmul_(f, coef.unsqueeze(1));
  if (in_place) return *accumulate;
  if (accumulate != nullptr) return accumulate->add_(grad.view({B, D, h, w}));
  return grad.view({B, D, h, w}).to(features.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> background_aware_pool_impl(
    const at::Tensor& features, const at::Tensor& attention, const at::Tensor& boxes, const at::Tensor& box_batch,
    int64_t output_size, double spatial_scale, const BackgroundAttentionKernels& kernels, bool check_values) {
  check_features(kPool, features);
  check_boxes(kPool, features, boxes, box_batch, spatial_scale);
  const int64_t B = features.size(0), D = features.size(1), h = features.size(2), w = features.size(3);
  TORCH_CHECK_VALUE(attention.dim() == 3 && attention.size(0) == B && attention.size(1) == h && attention.size(2) == w,
                    kPool, ": attention must have shape (B, h, w) = (", B, ", ", h, ", ", w, "), got shape ",
                    shape_of(attention));
  TORCH_CHECK_TYPE(attention.is_floating_point(), kPool, ": attention must be a floating-point tensor, got ",
                   attention.scalar_type());
  TORCH_CHECK_VALUE(attention.device() == features.device(), kPool, ": attention must be on the device of features (",
                    features.device(), "), got ", attention.device());
  TORCH_CHECK_VALUE(output_size >= 1, kPool, ": output_size must be >= 1, got ", output_size);
  const at::ScalarType dtype = compute_dtype(features.scalar_type());
  const at::Tensor f = features.to(dtype).contiguous();
  const at::Tensor a = attention.to(dtype).contiguous();
  if (check_values) {
    check_finite(kPool, "features", f);
    check_unit_interval(kPool, "attention", a);
  }
  const at::Tensor ranges = resolve(kPool, boxes, box_batch, spatial_scale, B, h, w, kernels);
  const int64_t K = boxes.size(0);
  at::Tensor pooled = at::zeros({K, D, output_size, output_size}, f.options());
  at::Tensor weight_sum = at::zeros({K, output_size, output_size}, f.options());
  if (K > 0) kernels.pool_forward(f, a, ranges, box_batch.contiguous(), output_size, pooled, weight_sum);
  return {pooled.to(features.scalar_type()), weight_sum, ranges};
}

std::tuple<at::Tensor, at::Tensor> background_aware_pool_backward_impl(
    const at::Tensor& grad_pooled, const at::Tensor& features, const at::Tensor& attention, const at::Tensor& pooled,
    const at::Tensor& weight_sum, const at::Tensor& ranges, const at::Tensor& box_batch, int64_t output_size,
    const BackgroundAttentionKernels& kernels) {
  constexpr const char* op = "_background_aware_pool_backward";
  check_features(op, features);
  const int64_t B = features.size(0), D = features.size(1), h = features.size(2), w = features.size(3);
  const int64_t K = ranges.size(0), S = output_size;
  TORCH_CHECK_VALUE(grad_pooled.sizes() == at::IntArrayRef({K, D, S, S}) && pooled.sizes() == grad_pooled.sizes() &&
                        weight_sum.sizes() == at::IntArrayRef({K, S, S}) && ranges.dim() == 2 && ranges.size(1) == 4 &&
                        box_batch.sizes() == at::IntArrayRef({K}) && attention.sizes() == at::IntArrayRef({B, h, w}),
                    op, ": the arguments must be the forward's inputs and outputs (grad_pooled ", shape_of(grad_pooled),
                    ", weight_sum ", shape_of(weight_sum), ", ranges ", shape_of(ranges), ")");
  const at::ScalarType dtype = compute_dtype(features.scalar_type());
  const at::Tensor f = features.to(dtype).contiguous();
  const at::Tensor a = attention.to(dtype).contiguous();
  at::Tensor grad_features = at::zeros(f.sizes(), f.options());
  at::Tensor grad_attention = at::zeros(a.sizes(), a.options());
  if (K > 0) {
    kernels.pool_backward(grad_pooled.to(dtype).contiguous(), f, a, pooled.to(dtype).contiguous(),
                          weight_sum.to(dtype).contiguous(), ranges.contiguous(), box_batch.contiguous(), S,
                          grad_features, grad_attention);
  }
  return {grad_features.to(features.scalar_type()), grad_attention.to(attention.scalar_type())};
}

PoolingResult background_attention_pool_impl(const at::Tensor& features, const at::Tensor& boxes,
                                             const at::Tensor& box_batch, int64_t grid_size, int64_t output_size,
                                             double spatial_scale, const std::optional<at::Tensor>& bg_mask,
                                             double min_background, const BackgroundAttentionKernels& kernels) {
  auto [attention, queries, valid, fallback, inside, background] =
      background_attention_impl(features, boxes, box_batch, grid_size, spatial_scale, bg_mask, min_background, kernels);
  auto [pooled, weight_sum, ranges] = background_aware_pool_impl(features, attention, boxes, box_batch, output_size,
                                                                 spatial_scale, kernels, /*check_values=*/false);
  return {pooled, attention, queries, valid, fallback, weight_sum, ranges, inside, background};
}

at::Tensor background_attention_pool_backward_impl(
    const at::Tensor& grad_pooled, const at::Tensor& grad_attention, const at::Tensor& grad_queries,
    const at::Tensor& features, const at::Tensor& attention, const at::Tensor& queries, const at::Tensor& valid,
    const at::Tensor& fallback, const at::Tensor& pooled, const at::Tensor& weight_sum, const at::Tensor& ranges,
    const at::Tensor& box_batch, const at::Tensor& inside, const at::Tensor& background, int64_t grid_size,
    int64_t output_size, const BackgroundAttentionKernels& kernels) {
  auto [grad_features, grad_a] = background_aware_pool_backward_impl(
      grad_pooled, features, attention, pooled, weight_sum, ranges, box_batch, output_size, kernels);
  grad_a.add_(grad_attention.to(grad_a.scalar_type()));
  return background_attention_backward_impl(grad_a, grad_queries, features, queries, valid, fallback, inside,
                                            background, grid_size, kernels, &grad_features);
}

TORCH_LIBRARY_FRAGMENT(boxloss, m) {
  m.def(
      "background_attention(Tensor features, Tensor boxes, Tensor box_batch, int grid_size, float spatial_scale, "
      "Tensor? bg_mask, float min_background) -> (Tensor attention, Tensor queries, Tensor valid, Tensor fallback, "
      "Tensor inside, Tensor background)");
  m.def(
      "_background_attention_backward(Tensor grad_attention, Tensor grad_queries, Tensor features, Tensor queries, "
      "Tensor valid, Tensor fallback, Tensor inside, Tensor background, int grid_size) -> Tensor");
  m.def(
      "background_aware_pool(Tensor features, Tensor attention, Tensor boxes, Tensor box_batch, int output_size, "
      "float spatial_scale) -> (Tensor pooled, Tensor weight_sum, Tensor ranges)");
  m.def(
      "background_attention_pool(Tensor features, Tensor boxes, Tensor box_batch, int grid_size, int output_size, "
      "float spatial_scale, Tensor? bg_mask, float min_background) -> (Tensor pooled, Tensor attention, "
      "Tensor queries, Tensor valid, Tensor fallback, Tensor weight_sum, Tensor ranges, Tensor inside, "
      "Tensor background)");
  m.def(
      "_background_attention_pool_backward(Tensor grad_pooled, Tensor grad_attention, Tensor grad_queries, "
      "Tensor features, Tensor attention, Tensor queries, Tensor valid, Tensor fallback, Tensor pooled, "
      "Tensor weight_sum, Tensor ranges, Tensor box_batch, Tensor inside, Tensor background, int grid_size, "
      "int output_size) -> Tensor");
  m.def(
      "_background_aware_pool_backward(Tensor grad_pooled, Tensor features, Tensor attention, Tensor pooled, "
      "Tensor weight_sum, Tensor ranges, Tensor box_batch, int output_size) -> (Tensor, Tensor)");
}

}  // namespace ops
}  // namespace boxloss
