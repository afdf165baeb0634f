// CUDA kernels of the uncertainty losses.  One thread per pixel; the noise,
// the per-pixel math and the counter layout are the host/device code of
// boxloss/uncertainty/math.h and boxloss/common/philox.h that the CPU kernel
// runs too, so both draw the same eps[t, b, c, h, w] for the same seed.
//
// Multi-class: the forward streams over samples and classes with online
// log-sum-exps (no per-class storage).  The backward, per sample, first
// recomputes LSE_c l_t (one pass over the classes) and then, regenerating
// the noise, adds w_t (softmax(l_t) - onehot(y)) and its product with eps
// into the pixel's own gradient entries (no atomics; each thread owns them).
// Nothing of size samples x classes x pixels is ever allocated.
#include <algorithm>
#include <limits>

#include "boxloss/uncertainty/cuda.h"

namespace boxloss {
namespace uncertainty {
namespace cuda {
namespace {

template <bool kBootstrap, bool kRoute, typename scalar>
__global__ void __launch_bounds__(kThreadsPerBlock)
    binary_kernel(BinaryProblem p, const scalar* __restrict__ grad, scalar* __restrict__ loss,
                  scalar* __restrict__ grad_mu, scalar* __restrict__ grad_log_var, int32_t* __restrict__ status) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreadsPerBlock + threadIdx.x;
  if (i >= p.num_pixels()) return;
  const scalar y = static_cast<const scalar*>(p.target)[i];
  const BinarySettings<scalar> st = p.settings<scalar>();
  scalar l, g_mu, g_s;
  binary_pixel<kBootstrap, kRoute>(static_cast<const scalar*>(p.mu)[i], static_cast<const scalar*>(p.log_var)[i], y,
                                   p.uncertain(i), st, &l, &g_mu, &g_s);
  if (loss != nullptr) {
    loss[i] = l;
    if (math::outside_unit_interval(y)) atomicOr(status, static_cast<int32_t>(kTargetNotProbability));
  } else {
    grad_mu[i] = grad[i] * g_mu;
    grad_log_var[i] = grad[i] * g_s;
  }
}

template <typename scalar>
cudaError_t launch_binary(const BinaryProblem& p, const scalar* grad, scalar* loss, scalar* grad_mu,
                          scalar* grad_log_var, int32_t* status, cudaStream_t stream) {
  const int64_t n = p.num_pixels();
  if (n == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((n + kThreadsPerBlock - 1) / kThreadsPerBlock));
  if (!p.bootstrap) {
    binary_kernel<false, false, scalar><<<grid, kThreadsPerBlock, 0, stream>>>(p, grad, loss, grad_mu,
                                                                                grad_log_var, status);
  } else if (p.route_gradients || loss != nullptr) {
    binary_kernel<true, true, scalar><<<grid, kThreadsPerBlock, 0, stream>>>(p, grad, loss, grad_mu, grad_log_var,
                                                                              status);
  } else {
    binary_kernel<true, false, scalar><<<grid, kThreadsPerBlock, 0, stream>>>(p, grad, loss, grad_mu,
                                                                               grad_log_var, status);
  }
  return cudaGetLastError();
}

// What a pixel knows before any sample is drawn.  `status` may be null (the
// backward: the forward has already checked the targets).
template <typename scalar>
struct PixelHead {
  int64_t y = 0;          // target (0 where ignored)
  int64_t ce_target = 0;  // the class CE(mu, .) is taken against (Eq. 16 at uncertain pixels)
  bool valid = false;
  bool uncertain = false;
  scalar mu_max = 0;
  scalar mu_sum = 0;      // sum_c exp(mu_c - mu_max)
  scalar ce = 0;          // CE(mu, ce_target)
};

template <typename scalar>
__device__ __forceinline__ PixelHead<scalar> pixel_head(const ClassProblem& p, int64_t pixel, int32_t* status) {
  PixelHead<scalar> h;
  const int64_t C = p.num_classes;
  const int64_t b = pixel / p.plane;
  const int64_t i = pixel - b * p.plane;
  const scalar* mu = static_cast<const scalar*>(p.mu) + b * C * p.plane + i;
  const scalar* s = static_cast<const scalar*>(p.log_var) + b * C * p.plane + i;
  const int64_t t = p.target[pixel];
  h.valid = t != p.ignore_index;
  const bool in_range = t >= 0 && t < C;
  if (status != nullptr && h.valid && !in_range) atomicOr(status, static_cast<int32_t>(kTargetOutOfRange));
  h.y = in_range ? t : 0;
  h.uncertain = h.valid && (p.box_mask == nullptr || p.box_mask[pixel] != 0) &&
                (p.pixel_perfect == nullptr || p.pixel_perfect[b] == 0);
  int64_t argmax = 0;
  scalar s_max = s[0];
  h.mu_max = mu[0];
  for (int64_t c = 1; c < C; ++c) {
    const scalar m = mu[c * p.plane];
    if (m > h.mu_max) {
      h.mu_max = m;
      argmax = c;
    }
    s_max = max(s_max, s[c * p.plane]);
  }
  const bool flip = p.bootstrap && h.uncertain && s_max > static_cast<scalar>(p.log_tau);
  h.ce_target = flip ? argmax : h.y;
  scalar sum = 0;
  for (int64_t c = 0; c < C; ++c) sum += math::exp_nonpositive(mu[c * p.plane] - h.mu_max);
  h.mu_sum = sum;
  h.ce = (h.mu_max - mu[h.ce_target * p.plane]) + math::log_positive(sum);
  return h;
}

// max_c l_{t,c}, log sum_c exp(l_{t,c} - max) and l_{t,y} - max of sample t,
// by an online log-sum-exp over the class blocks of the noise.
template <typename scalar>
__device__ __forceinline__ void sample_softmax_stats(const ClassProblem& p, const scalar* mu, const scalar* s,
                                                     uint32_t sample, PixelWords words, int64_t y, scalar* max_out,
                                                     scalar* log_sum, scalar* target_minus_max) {
  const int64_t C = p.num_classes;
  scalar m = -std::numeric_limits<scalar>::infinity();
  scalar sum = 0;
  scalar ly = 0;
  for (int64_t k = 0; 4 * k < C; ++k) {
    scalar z[4];
    noise_block(p.key, static_cast<uint32_t>(k), sample, words.lo, words.hi, &z[0], &z[1], &z[2], &z[3]);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t c = 4 * k + j;
      if (c >= C) break;
      const scalar l = mu[c * p.plane] + math::exp_clamped(scalar(0.5) * s[c * p.plane]) * z[j];
      if (c == y) ly = l;
      const scalar new_max = max(m, l);
      sum = sum * math::exp_nonpositive(m - new_max) + math::exp_nonpositive(l - new_max);
      m = new_max;
    }
  }
  *max_out = m;
  *log_sum = math::log_positive(sum);
  *target_minus_max = ly - m;
}

template <typename scalar>
__global__ void __launch_bounds__(kThreadsPerBlock)
    class_forward_kernel(ClassProblem p, scalar* __restrict__ loss, scalar* __restrict__ sample_lse,
                         int32_t* __restrict__ status) {
  const int64_t pixel = static_cast<int64_t>(blockIdx.x) * kThreadsPerBlock + threadIdx.x;
  if (pixel >= p.num_pixels()) return;
  const PixelHead<scalar> h = pixel_head<scalar>(p, pixel, status);
  scalar lse_samples = 0;
  if (h.uncertain) {
    const int64_t b = pixel / p.plane;
    const int64_t offset = b * p.num_classes * p.plane + (pixel - b * p.plane);
    const scalar* mu = static_cast<const scalar*>(p.mu) + offset;
    const scalar* s = static_cast<const scalar*>(p.log_var) + offset;
    const PixelWords words = pixel_words(p.key, static_cast<uint64_t>(pixel));
    scalar run_max = -std::numeric_limits<scalar>::infinity();
    scalar run_sum = 0;
    for (int64_t t = 0; t < p.samples; ++t) {
      scalar m, log_sum, ly_minus_max;
      sample_softmax_stats(p, mu, s, static_cast<uint32_t>(t), words, h.y, &m, &log_sum, &ly_minus_max);
      const scalar a = ly_minus_max - log_sum;  // l_{t,y} - LSE_c l_{t,c}
      const scalar new_max = max(run_max, a);
      run_sum = run_sum * math::exp_nonpositive(run_max - new_max) + math::exp_nonpositive(a - new_max);
      run_max = new_max;
    }
    lse_samples = run_max + math::log_positive(run_sum);
  }
  const scalar log_samples = static_cast<scalar>(log(static_cast<double>(p.samples)));
  scalar l = h.ce;
  if (h.uncertain) l = log_samples - lse_samples + (p.bootstrap ? h.ce : scalar(0));
  loss[pixel] = h.valid ? l : scalar(0);
  sample_lse[pixel] = lse_samples;
}

template <typename scalar>
__global__ void __launch_bounds__(kThreadsPerBlock)
    class_backward_kernel(ClassProblem p, const scalar* __restrict__ grad, const scalar* __restrict__ sample_lse,
                          scalar* __restrict__ grad_mu, scalar* __restrict__ grad_log_var) {
  const int64_t pixel = static_cast<int64_t>(blockIdx.x) * kThreadsPerBlock + threadIdx.x;
  if (pixel >= p.num_pixels()) return;
  const PixelHead<scalar> h = pixel_head<scalar>(p, pixel, nullptr);
  const int64_t C = p.num_classes;
  const int64_t b = pixel / p.plane;
  const int64_t offset = b * C * p.plane + (pixel - b * p.plane);
  const scalar* mu = static_cast<const scalar*>(p.mu) + offset;
  const scalar* s = static_cast<const scalar*>(p.log_var) + offset;
  scalar* gmu = grad_mu + offset;
  scalar* gs = grad_log_var + offset;
  const scalar g_out = h.valid ? grad[pixel] : scalar(0);
  // Sec. 3.3 routing: at uncertain pixels the CE term reaches mu only with
  // bootstrapping, the sample term only without routing (or without bootstrapping).
  const bool ce_to_mu = !h.uncertain || p.bootstrap;
  const bool samples_to_mu = h.uncertain && (!p.bootstrap || !p.route_gradients);
  for (int64_t c = 0; c < C; ++c) {
    gmu[c * p.plane] = 0;
    gs[c * p.plane] = 0;
  }
  if (h.uncertain) {
    const PixelWords words = pixel_words(p.key, static_cast<uint64_t>(pixel));
    const scalar lse_samples = sample_lse[pixel];
    for (int64_t t = 0; t < p.samples; ++t) {
      scalar m, log_sum, ly_minus_max;
      sample_softmax_stats(p, mu, s, static_cast<uint32_t>(t), words, h.y, &m, &log_sum, &ly_minus_max);
      const scalar w = math::exp_nonpositive((ly_minus_max - log_sum) - lse_samples);
      for (int64_t k = 0; 4 * k < C; ++k) {
        scalar z[4];
        noise_block(p.key, static_cast<uint32_t>(k), static_cast<uint32_t>(t), words.lo, words.hi, &z[0], &z[1],
                    &z[2], &z[3]);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int64_t c = 4 * k + j;
          if (c >= C) break;
          const scalar l = mu[c * p.plane] + math::exp_clamped(scalar(0.5) * s[c * p.plane]) * z[j];
          const scalar g = w * (math::exp_nonpositive((l - m) - log_sum) - (c == h.y ? scalar(1) : scalar(0)));
          gmu[c * p.plane] += g;
          gs[c * p.plane] += g * z[j];
        }
      }
    }
  }
  const scalar inv_sum = scalar(1) / h.mu_sum;
  for (int64_t c = 0; c < C; ++c) {
    const scalar ce_grad =
        math::exp_nonpositive(mu[c * p.plane] - h.mu_max) * inv_sum - (c == h.ce_target ? scalar(1) : scalar(0));
    const scalar samples_grad = gmu[c * p.plane];
    const scalar sigma = math::exp_clamped(scalar(0.5) * s[c * p.plane]);
    gmu[c * p.plane] = g_out * ((ce_to_mu ? ce_grad : scalar(0)) + (samples_to_mu ? samples_grad : scalar(0)));
    gs[c * p.plane] = g_out * scalar(0.5) * sigma * gs[c * p.plane];
  }
}

dim3 pixel_grid(int64_t pixels) {
  return dim3(static_cast<unsigned>((pixels + kThreadsPerBlock - 1) / kThreadsPerBlock));
}

}  // namespace

template <typename scalar>
cudaError_t launch_binary_forward(const BinaryProblem& problem, scalar* loss, int32_t* status, cudaStream_t stream) {
  return launch_binary<scalar>(problem, nullptr, loss, nullptr, nullptr, status, stream);
}

template <typename scalar>
cudaError_t launch_binary_backward(const BinaryProblem& problem, const scalar* grad, scalar* grad_mu,
                                   scalar* grad_log_var, cudaStream_t stream) {
  return launch_binary<scalar>(problem, grad, nullptr, grad_mu, grad_log_var, nullptr, stream);
}

template <typename scalar>
cudaError_t launch_class_forward(const ClassProblem& problem, scalar* loss, scalar* sample_lse, int32_t* status,
                                 cudaStream_t stream) {
  const int64_t n = problem.num_pixels();
  if (n == 0) return cudaSuccess;
  class_forward_kernel<scalar><<<pixel_grid(n), kThreadsPerBlock, 0, stream>>>(problem, loss, sample_lse, status);
  return cudaGetLastError();
}

template <typename scalar>
cudaError_t launch_class_backward(const ClassProblem& problem, const scalar* grad, const scalar* sample_lse,
                                  scalar* grad_mu, scalar* grad_log_var, cudaStream_t stream) {
  const int64_t n = problem.num_pixels();
  if (n == 0) return cudaSuccess;
  class_backward_kernel<scalar><<<pixel_grid(n), kThreadsPerBlock, 0, stream>>>(problem, grad, sample_lse, grad_mu,
                                                                                  grad_log_var);
  return cudaGetLastError();
}

template cudaError_t launch_binary_forward<float>(const BinaryProblem&, float*, int32_t*, cudaStream_t);
template cudaError_t launch_binary_forward<double>(const BinaryProblem&, double*, int32_t*, cudaStream_t);
template cudaError_t launch_binary_backward<float>(const BinaryProblem&, const float*, float*, float*, cudaStream_t);
template cudaError_t launch_binary_backward<double>(const BinaryProblem&, const double*, double*, double*,
                                                    cudaStream_t);
template cudaError_t launch_class_forward<float>(const ClassProblem&, float*, float*, int32_t*, cudaStream_t);
template cudaError_t launch_class_forward<double>(const ClassProblem&, double*, double*, int32_t*, cudaStream_t);
template cudaError_t launch_class_backward<float>(const ClassProblem&, const float*, const float*, float*, float*,
                                                  cudaStream_t);
template cudaError_t launch_class_backward<double>(const ClassProblem&, const double*, const double*, double*,
                                                   double*, cudaStream_t);

}  // namespace cuda
}  // namespace uncertainty
}  // namespace boxloss
