// CPU core of background attention (the per-pixel step between the GEMMs)
// and background-aware pooling.  The math is boxloss/background_attention/
// math.h, shared with the CUDA kernels.
#include "boxloss/background_attention/cpu.h"

#include <algorithm>

namespace boxloss {
namespace background_attention {
namespace cpu {

void mark_inside(const int64_t* ranges, const int64_t* box_batch, int64_t num_boxes, int64_t height, int64_t width,
                 uint8_t* inside) {
  for (int64_t k = 0; k < num_boxes; ++k) {
    const int64_t* r = ranges + 4 * k;
    uint8_t* plane = inside + box_batch[k] * height * width;
    for (int64_t y = r[0]; y < r[1]; ++y) std::fill(plane + y * width + r[2], plane + y * width + r[3], uint8_t{1});
  }
}

template <typename scalar>
void attention_forward(const AttentionProblem<scalar>& p, const scalar* dots, int64_t begin, int64_t end,
                       scalar* attention) {
  for (int64_t i = begin; i < end; ++i) attention[i] = static_cast<scalar>(p.attention_at(dots, i));
}

template <typename scalar>
void attention_backward(const AttentionProblem<scalar>& p, const scalar* grad_attention, scalar* dots, int64_t begin,
                        int64_t end, scalar* coef) {
  using acc = acc_t<scalar>;
  for (int64_t i = begin; i < end; ++i) {
    coef[i] = static_cast<scalar>(p.attention_backward_at(dots, static_cast<acc>(grad_attention[i]), i));
  }
}

template <typename scalar>
void pool_forward(const PoolProblem<scalar>& p, int64_t begin, int64_t end, scalar* pooled, scalar* weight_sum) {
  using acc = acc_t<scalar>;
  const int64_t bins = p.bins(), plane = p.height * p.width;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t k = i / bins, bin = i % bins;
    Bin rows, cols;
    p.bin_pixels(k, bin, &rows, &cols);
    const scalar* attention = p.attention + p.box_batch[k] * plane;
    const acc ws = bin_weight_sum<scalar, acc>(attention, p.width, rows, cols);
    weight_sum[i] = static_cast<scalar>(ws);
    const scalar* features = p.features + p.box_batch[k] * p.channels * plane;
    scalar* out = pooled + k * p.channels * bins + bin;
    for (int64_t d = 0; d < p.channels; ++d) {
      out[d * bins] =
          static_cast<scalar>(bin_pool<scalar, acc>(features + d * plane, attention, p.width, rows, cols, ws));
    }
  }
}

ImagePlan plan_by_image(const int64_t* box_batch, int64_t num_boxes, int64_t batch) {
  ImagePlan plan;
  plan.offsets.assign(batch + 1, 0);
  for (int64_t k = 0; k < num_boxes; ++k) ++plan.offsets[box_batch[k] + 1];
  for (int64_t b = 0; b < batch; ++b) plan.offsets[b + 1] += plan.offsets[b];
  plan.boxes.resize(num_boxes);
  std::vector<int64_t> next(plan.offsets.begin(), plan.offsets.end() - 1);
  for (int64_t k = 0; k < num_boxes; ++k) plan.boxes[next[box_batch[k]]++] = k;
  return plan;
}

template <typename scalar>
void pool_backward(const PoolProblem<scalar>& p, const ImagePlan& plan, const scalar* grad_pooled, const scalar* pooled,
                   const scalar* weight_sum, int64_t image_begin, int64_t image_end, scalar* grad_features,
                   scalar* grad_attention) {
  using acc = acc_t<scalar>;
  const int64_t bins = p.bins(), plane = p.height * p.width, D = p.channels;
  std::vector<acc> weight, g_dot_f;
  for (int64_t b = image_begin; b < image_end; ++b) {
    scalar* gf = grad_features + b * D * plane;
    scalar* ga = grad_attention + b * plane;
    std::fill(gf, gf + D * plane, scalar(0));
    std::fill(ga, ga + plane, scalar(0));
    const scalar* features = p.features + b * D * plane;
    const scalar* attention = p.attention + b * plane;
    for (int64_t e = plan.offsets[b]; e < plan.offsets[b + 1]; ++e) {
      const int64_t k = plan.boxes[e];
      for (int64_t bin = 0; bin < bins; ++bin) {
        Bin rows, cols;
        p.bin_pixels(k, bin, &rows, &cols);
        const int64_t bh = rows.end - rows.begin, bw = cols.end - cols.begin, count = bh * bw;
        if (count <= 0) continue;
        const acc ws = static_cast<acc>(weight_sum[k * bins + bin]);
        weight.resize(count);
        g_dot_f.assign(count, acc(0));
        for (int64_t y = 0; y < bh; ++y) {
          for (int64_t x = 0; x < bw; ++x) {
            const acc a = static_cast<acc>(attention[(rows.begin + y) * p.width + cols.begin + x]);
            weight[y * bw + x] = pixel_weight(a, ws, count);
          }
        }
        const scalar* g = grad_pooled + k * D * bins + bin;
        const scalar* r = pooled + k * D * bins + bin;
        acc g_dot_r = 0;
        for (int64_t d = 0; d < D; ++d) {
          const acc gd = static_cast<acc>(g[d * bins]);
          if (gd == acc(0)) continue;
          g_dot_r += gd * static_cast<acc>(r[d * bins]);
          scalar* gfd = gf + d * plane + rows.begin * p.width + cols.begin;
          const scalar* fd = features + d * plane + rows.begin * p.width + cols.begin;
          for (int64_t y = 0; y < bh; ++y) {
            acc* gdf = g_dot_f.data() + y * bw;
            const acc* w = weight.data() + y * bw;
            for (int64_t x = 0; x < bw; ++x) {
              gfd[y * p.width + x] += static_cast<scalar>(gd * w[x]);
              gdf[x] += gd * static_cast<acc>(fd[y * p.width + x]);
            }
          }
        }
        if (plain_bin(ws)) continue;
        for (int64_t y = 0; y < bh; ++y) {
          for (int64_t x = 0; x < bw; ++x) {
            ga[(rows.begin + y) * p.width + cols.begin + x] +=
                static_cast<scalar>(attention_grad(g_dot_f[y * bw + x], g_dot_r, ws));
          }
        }
      }
    }
  }
}

#define BOXLOSS_INSTANTIATE(scalar)                                                                                   \
  template void attention_forward<scalar>(const AttentionProblem<scalar>&, const scalar*, int64_t, int64_t, scalar*); \
  template void attention_backward<scalar>(const AttentionProblem<scalar>&, const scalar*, scalar*, int64_t, int64_t, \
                                           scalar*);                                                                  \
  template void pool_forward<scalar>(const PoolProblem<scalar>&, int64_t, int64_t, scalar*, scalar*);                 \
  template void pool_backward<scalar>(const PoolProblem<scalar>&, const ImagePlan&, const scalar*, const scalar*,     \
                                      const scalar*, int64_t, int64_t, scalar*, scalar*);
BOXLOSS_INSTANTIATE(float)
BOXLOSS_INSTANTIATE(double)
#undef BOXLOSS_INSTANTIATE

}  // namespace cpu
}  // namespace background_attention
}  // namespace boxloss
