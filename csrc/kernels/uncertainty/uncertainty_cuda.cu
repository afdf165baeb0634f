// CUDA kernels of the uncertainty losses.  One thread per pixel; the noise,
// the per-pixel math and the counter layout are the host/device code of
// boxloss/uncertainty/math.h and boxloss/common/philox.h that the CPU kernel
// runs too, so both draw the same eps[t, b, c, h, w] for the same seed.  The
// step before the samples (targets, Eq. 16, CE(mu, y*)) is
// ClassProblem::head_at with one lane, the CPU core's with kClassLanes.
//
// Multi-class: the forward streams over samples and classes with online
// log-sum-exps (no per-class storage).  The backward, per sample, first
// recomputes the softmax statistics of l_t (one pass over the classes) and
// then, regenerating the noise, adds w_t (softmax(l_t) - onehot(y)) and its
// product with eps into the pixel's own gradient entries (no atomics; each
// thread owns them).  Nothing of size samples x classes x pixels is ever
// allocated.
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
    binary_kernel<false, false, scalar>
        <<<grid, kThreadsPerBlock, 0, stream>>>(p, grad, loss, grad_mu, grad_log_var, status);
  } else if (p.route_gradients || loss != nullptr) {
    binary_kernel<true, true, scalar>
        <<<grid, kThreadsPerBlock, 0, stream>>>(p, grad, loss, grad_mu, grad_log_var, status);
  } else {
    binary_kernel<true, false, scalar>
        <<<grid, kThreadsPerBlock, 0, stream>>>(p, grad, loss, grad_mu, grad_log_var, status);
  }
  return cudaGetLastError();
}

// Calls f(c, l_{t,c}, eps_{t,c}) for every class c of sample t, drawing the
// noise block by block (nothing per class is stored).
template <typename scalar, typename F>
__device__ __forceinline__ void for_each_sample_logit(const ClassProblem& p, const scalar* mu, const scalar* s,
                                                      uint32_t sample, PixelWords words, F f) {
  const int64_t C = p.num_classes;
  for (int64_t k = 0; 4 * k < C; ++k) {
    scalar z[4];
    noise_block(p.key, static_cast<uint32_t>(k), sample, words.lo, words.hi, &z[0], &z[1], &z[2], &z[3]);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t c = 4 * k + j;
      if (c >= C) break;
      f(c, sample_logit(mu[c * p.plane], sigma_from_log_var(s[c * p.plane]), z[j]), z[j]);
    }
  }
}

// max_c l_{t,c}, sum_c exp(l_{t,c} - max) and l_{t,y} of sample t, by an
// online log-sum-exp over the classes.
template <typename scalar>
__device__ __forceinline__ void sample_softmax_stats(const ClassProblem& p, const scalar* mu, const scalar* s,
                                                     uint32_t sample, PixelWords words, int64_t y, scalar* max_out,
                                                     scalar* sum_out, scalar* target_out) {
  scalar m = -std::numeric_limits<scalar>::infinity();
  scalar sum = 0;
  scalar ly = 0;
  for_each_sample_logit(p, mu, s, sample, words, [&](int64_t c, scalar l, scalar) {
    if (c == y) ly = l;
    log_sum_exp_add(l, &m, &sum);
  });
  *max_out = m;
  *sum_out = sum;
  *target_out = ly;
}

template <typename scalar>
__global__ void __launch_bounds__(kThreadsPerBlock)
    class_forward_kernel(ClassProblem p, scalar* __restrict__ loss, scalar* __restrict__ sample_lse,
                         int32_t* __restrict__ status) {
  const int64_t pixel = static_cast<int64_t>(blockIdx.x) * kThreadsPerBlock + threadIdx.x;
  if (pixel >= p.num_pixels()) return;
  const int64_t offset = p.class_offset(pixel);
  const scalar* mu = static_cast<const scalar*>(p.mu) + offset;
  const scalar* s = static_cast<const scalar*>(p.log_var) + offset;
  ClassHead<scalar, 1> h;
  bool uncertain;
  const int32_t bad = p.head_at<1>(pixel, 1, mu, s, p.plane, &h, &uncertain);
  if (bad != 0) atomicOr(status, bad);
  scalar lse_samples = 0;
  if (uncertain) {
    const PixelWords words = pixel_words(p.key, static_cast<uint64_t>(pixel));
    scalar run_max = -std::numeric_limits<scalar>::infinity();
    scalar run_sum = 0;
    for (int64_t t = 0; t < p.samples; ++t) {
      scalar m, sum, ly;
      sample_softmax_stats(p, mu, s, static_cast<uint32_t>(t), words, h.y[0], &m, &sum, &ly);
      log_sum_exp_add(log_softmax_at(ly, m, sum), &run_max, &run_sum);
    }
    lse_samples = log_sum_exp_value(run_max, run_sum);
  }
  const scalar log_samples = static_cast<scalar>(log(static_cast<double>(p.samples)));
  loss[pixel] = class_pixel_loss(h.valid[0] != scalar(0), uncertain, p.bootstrap, h.ce[0], lse_samples, log_samples);
  sample_lse[pixel] = lse_samples;
}

// Regenerating the noise, the backward adds w_t (softmax(l_t) - onehot(y)) and
// its product with eps into the pixel's own gradient entries, then replaces
// them by the gradients of mu and the log-variance.
template <typename scalar>
__global__ void __launch_bounds__(kThreadsPerBlock)
    class_backward_kernel(ClassProblem p, const scalar* __restrict__ grad, const scalar* __restrict__ sample_lse,
                          scalar* __restrict__ grad_mu, scalar* __restrict__ grad_log_var) {
  const int64_t pixel = static_cast<int64_t>(blockIdx.x) * kThreadsPerBlock + threadIdx.x;
  if (pixel >= p.num_pixels()) return;
  const int64_t C = p.num_classes;
  const int64_t offset = p.class_offset(pixel);
  const scalar* mu = static_cast<const scalar*>(p.mu) + offset;
  const scalar* s = static_cast<const scalar*>(p.log_var) + offset;
  scalar* gmu = grad_mu + offset;
  scalar* gs = grad_log_var + offset;
  ClassHead<scalar, 1> h;
  bool uncertain;
  p.head_at<1>(pixel, 1, mu, s, p.plane, &h, &uncertain);
  const ClassGradientWeights<scalar> weights =
      class_gradient_weights(grad[pixel], h.valid[0] != scalar(0), uncertain, p.bootstrap, p.route_gradients);
  for (int64_t c = 0; c < C; ++c) {
    gmu[c * p.plane] = 0;
    gs[c * p.plane] = 0;
  }
  if (uncertain) {
    const PixelWords words = pixel_words(p.key, static_cast<uint64_t>(pixel));
    const scalar lse_samples = sample_lse[pixel];
    for (int64_t t = 0; t < p.samples; ++t) {
      scalar m, sum, ly;
      sample_softmax_stats(p, mu, s, static_cast<uint32_t>(t), words, h.y[0], &m, &sum, &ly);
      const scalar w = sample_weight(log_softmax_at(ly, m, sum), lse_samples);
      const scalar w_over_sum = w / sum;
      for_each_sample_logit(p, mu, s, static_cast<uint32_t>(t), words, [&](int64_t c, scalar l, scalar eps) {
        const scalar g = sample_logit_gradient(math::exp_nonpositive(l - m), w_over_sum, w, c == h.y[0]);
        gmu[c * p.plane] += g;
        gs[c * p.plane] += g * eps;
      });
    }
  }
  const scalar inv_sum = scalar(1) / h.mu_sum[0];
  for (int64_t c = 0; c < C; ++c) {
    const scalar ce_grad = ce_gradient(mu[c * p.plane], h.mu_max[0], inv_sum, c == h.ce_target[0]);
    gmu[c * p.plane] = class_mu_gradient(weights.ce, ce_grad, weights.samples, gmu[c * p.plane]);
    gs[c * p.plane] = class_log_var_gradient(weights.log_var, sigma_from_log_var(s[c * p.plane]), gs[c * p.plane]);
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
  class_backward_kernel<scalar>
      <<<pixel_grid(n), kThreadsPerBlock, 0, stream>>>(problem, grad, sample_lse, grad_mu, grad_log_var);
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
template cudaError_t launch_class_backward<double>(const ClassProblem&, const double*, const double*, double*, double*,
                                                   cudaStream_t);

}  // namespace cuda
}  // namespace uncertainty
}  // namespace boxloss
