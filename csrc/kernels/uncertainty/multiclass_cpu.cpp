// CPU core of the multi-class uncertainty loss (Eq. 13-16).
//
// The work item is a chunk of kClassLanes consecutive pixels of one image, and
// every inner loop runs over those lanes with a constant trip count and no
// branches, so that the compiler vectorises it: Philox's 32-bit multiplies,
// Box-Muller's log / sqrt / sine / cosine, the softmax over classes and the
// log-sum-exp over samples all run 32 pixels at a time (target_clones builds
// them for AVX2 and AVX-512).  Per chunk the kernel keeps a few (classes x
// lanes) buffers; no (samples x classes x pixels) tensor ever exists, and the
// backward regenerates the forward's noise.  The per-pixel math is that of
// math.h, which the CUDA kernel runs one pixel per thread: the step before
// the samples (ClassProblem::head_at) and the functions the lane loops call.
#include "boxloss/uncertainty/cpu.h"

#include <algorithm>
#include <limits>
#include <vector>

#include "boxloss/common/cpu_clones.h"

namespace boxloss {
namespace uncertainty {
namespace cpu {
namespace {

constexpr int L = kClassLanes;

// Copies the n <= L values of src into the L lanes of dst, repeating the last
// one in the lanes past n (a chunk at the end of an image), so that every
// lane computes on finite numbers; those lanes are never stored.
template <typename scalar, typename acc>
BOXLOSS_ALWAYS_INLINE void load_lanes(const scalar* __restrict src, int64_t n, acc* __restrict dst) {
  if (n == L) {
    for (int p = 0; p < L; ++p) dst[p] = static_cast<acc>(src[p]);
  } else {
    for (int p = 0; p < L; ++p) dst[p] = static_cast<acc>(src[p < n ? p : n - 1]);
  }
}

// The head (math.h) of a chunk's lanes, and what the kernel needs besides.
template <typename acc>
struct Chunk {
  ClassHead<acc, L> head;
  int64_t pixel0 = 0;  // flat pixel of lane 0
  int64_t n = 0;       // lanes that are pixels
  bool any_uncertain = false;
  int32_t status = 0;
};

// Lane buffers of one task: (classes x lanes) each.
template <typename acc>
struct ChunkBuffers {
  ChunkBuffers(int64_t num_classes, bool backward)
      : storage(static_cast<size_t>(num_classes) * L * (backward ? 6 : 3)) {
    const int64_t block = num_classes * L;
    mu = storage.data();
    log_var = mu + block;
    logit = log_var + block;
    if (backward) {
      noise = logit + block;
      grad_mu = noise + block;
      grad_s = grad_mu + block;
    }
  }
  std::vector<acc> storage;
  acc* mu = nullptr;       // mu
  acc* log_var = nullptr;  // log-variance, then overwritten with sigma
  acc* logit = nullptr;    // l_t, then exp(l_t - max) in the backward
  acc* noise = nullptr;    // eps_t (backward)
  acc* grad_mu = nullptr;  // sum_t g_t (backward)
  acc* grad_s = nullptr;   // sum_t g_t eps_t (backward)
};

// Loads mu and the log-variance of chunk `chunk` into the lane buffers and
// computes its head.
template <typename scalar>
BOXLOSS_ALWAYS_INLINE void load_chunk(const ClassProblem& p, int64_t chunk, ChunkBuffers<acc_t<scalar>>& buf,
                                      Chunk<acc_t<scalar>>& out) {
  const int64_t C = p.num_classes;
  const int64_t chunks_per_image = (p.plane + L - 1) / L;
  const int64_t b = chunk / chunks_per_image;
  const int64_t i0 = (chunk % chunks_per_image) * L;
  out.n = std::min<int64_t>(L, p.plane - i0);
  out.pixel0 = b * p.plane + i0;
  const int64_t offset = p.class_offset(out.pixel0);
  const scalar* mu = static_cast<const scalar*>(p.mu) + offset;
  const scalar* s = static_cast<const scalar*>(p.log_var) + offset;
  for (int64_t c = 0; c < C; ++c) {
    load_lanes(mu + c * p.plane, out.n, buf.mu + c * L);
    load_lanes(s + c * p.plane, out.n, buf.log_var + c * L);
  }
  out.status = p.head_at<L>(out.pixel0, out.n, buf.mu, buf.log_var, L, &out.head, &out.any_uncertain);
}

// l_t = mu + sigma eps_t for every class of sample t (sigma already in
// buf.log_var); eps_t also into `noise` when it is not null.
template <typename Word, typename acc>
BOXLOSS_ALWAYS_INLINE void draw_logits(const ClassProblem& p, uint32_t sample, const Word* __restrict pixel_lo,
                                       const Word* __restrict pixel_hi, const acc* __restrict mu,
                                       const acc* __restrict sigma, acc* __restrict logit, acc* __restrict noise) {
  const int64_t C = p.num_classes;
  const int64_t blocks = (C + 3) / 4;
  for (int64_t k = 0; k < blocks; ++k) {
    acc z[4][L];
    for (int p_ = 0; p_ < L; ++p_) {
      noise_block<acc, Word>(p.key, static_cast<uint32_t>(k), sample, pixel_lo[p_], pixel_hi[p_], &z[0][p_], &z[1][p_],
                             &z[2][p_], &z[3][p_]);
    }
    const int64_t classes = std::min<int64_t>(4, C - 4 * k);
    for (int64_t j = 0; j < classes; ++j) {
      const int64_t o = (4 * k + j) * L;
      for (int p_ = 0; p_ < L; ++p_) logit[o + p_] = sample_logit(mu[o + p_], sigma[o + p_], z[j][p_]);
      if (noise != nullptr) {
        for (int p_ = 0; p_ < L; ++p_) noise[o + p_] = z[j][p_];
      }
    }
  }
}

// max_c l_{t,c} and l_{t,y} of each lane.
template <typename acc>
BOXLOSS_ALWAYS_INLINE void logit_max_and_target(int64_t C, const acc* __restrict logit, const int32_t* __restrict y,
                                                acc* __restrict max_out, acc* __restrict target_out) {
  for (int p_ = 0; p_ < L; ++p_) {
    max_out[p_] = logit[p_];
    target_out[p_] = y[p_] == 0 ? logit[p_] : acc(0);
  }
  for (int64_t c = 1; c < C; ++c) {
    const acc* __restrict l = logit + c * L;
    for (int p_ = 0; p_ < L; ++p_) {
      max_out[p_] = l[p_] > max_out[p_] ? l[p_] : max_out[p_];
      target_out[p_] += y[p_] == c ? l[p_] : acc(0);
    }
  }
}

template <typename acc>
BOXLOSS_ALWAYS_INLINE void sigma_from_log_var_lanes(int64_t C, acc* __restrict values) {
  for (int64_t i = 0; i < C * L; ++i) values[i] = sigma_from_log_var(values[i]);
}

// The counter words of the chunk's pixels (lanes past the image end get
// words too; their noise is never used).
template <typename Word>
BOXLOSS_ALWAYS_INLINE void chunk_pixel_words(const ClassProblem& p, int64_t pixel0, Word* __restrict pixel_lo,
                                             Word* __restrict pixel_hi) {
  for (int p_ = 0; p_ < L; ++p_) {
    const PixelWords words = pixel_words(p.key, static_cast<uint64_t>(pixel0 + p_));
    pixel_lo[p_] = words.lo;
    pixel_hi[p_] = words.hi;
  }
}

template <typename scalar, typename Word>
BOXLOSS_CPU_CLONES int32_t class_forward_impl(const ClassProblem& p, int64_t chunk_begin, int64_t chunk_end,
                                              scalar* loss, scalar* sample_lse) {
  using acc = acc_t<scalar>;
  const int64_t C = p.num_classes;
  ChunkBuffers<acc> buf(C, /*backward=*/false);
  Chunk<acc> current;
  const ClassHead<acc, L>& head = current.head;
  const acc log_samples = static_cast<acc>(std::log(static_cast<double>(p.samples)));
  int32_t status = 0;
  for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
    load_chunk<scalar>(p, chunk, buf, current);
    const int64_t pixel0 = current.pixel0;
    status |= current.status;
    acc lse_samples[L];
    for (int p_ = 0; p_ < L; ++p_) lse_samples[p_] = acc(0);
    if (current.any_uncertain) {
      Word pixel_lo[L], pixel_hi[L];
      chunk_pixel_words(p, pixel0, pixel_lo, pixel_hi);
      sigma_from_log_var_lanes(C, buf.log_var);
      // Online log-sum-exp over samples of a_t = l_{t,y} - LSE_c l_{t,c}.
      acc run_max[L], run_sum[L];
      for (int p_ = 0; p_ < L; ++p_) {
        run_max[p_] = -std::numeric_limits<acc>::infinity();
        run_sum[p_] = acc(0);
      }
      for (int64_t t = 0; t < p.samples; ++t) {
        draw_logits<Word>(p, static_cast<uint32_t>(t), pixel_lo, pixel_hi, buf.mu, buf.log_var, buf.logit,
                          static_cast<acc*>(nullptr));
        acc m[L], ly[L], sum[L];
        logit_max_and_target(C, buf.logit, head.y, m, ly);
        for (int p_ = 0; p_ < L; ++p_) sum[p_] = acc(0);
        for (int64_t c = 0; c < C; ++c) {
          const acc* __restrict l = buf.logit + c * L;
          for (int p_ = 0; p_ < L; ++p_) sum[p_] += math::exp_nonpositive(l[p_] - m[p_]);
        }
        for (int p_ = 0; p_ < L; ++p_) {
          log_sum_exp_add(log_softmax_at(ly[p_], m[p_], sum[p_]), &run_max[p_], &run_sum[p_]);
        }
      }
      for (int p_ = 0; p_ < L; ++p_) {
        lse_samples[p_] = head.uncertain[p_] != acc(0) ? log_sum_exp_value(run_max[p_], run_sum[p_]) : acc(0);
      }
    }
    for (int64_t p_ = 0; p_ < current.n; ++p_) {
      loss[pixel0 + p_] = static_cast<scalar>(class_pixel_loss(head.valid[p_] != acc(0), head.uncertain[p_] != acc(0),
                                                               p.bootstrap, head.ce[p_], lse_samples[p_], log_samples));
      sample_lse[pixel0 + p_] = static_cast<scalar>(lse_samples[p_]);
    }
  }
  return status;
}

template <typename scalar, typename Word>
BOXLOSS_CPU_CLONES void class_backward_impl(const ClassProblem& p, const scalar* grad, const scalar* sample_lse,
                                            int64_t chunk_begin, int64_t chunk_end, scalar* grad_mu,
                                            scalar* grad_log_var) {
  using acc = acc_t<scalar>;
  const int64_t C = p.num_classes;
  ChunkBuffers<acc> buf(C, /*backward=*/true);
  Chunk<acc> current;
  const ClassHead<acc, L>& head = current.head;
  for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
    load_chunk<scalar>(p, chunk, buf, current);
    const int64_t pixel0 = current.pixel0;
    // Per lane: how much of the incoming gradient reaches each term (Sec. 3.3).
    acc g_in[L], ce_weight[L], samples_weight[L], log_var_weight[L];
    load_lanes(grad + pixel0, current.n, g_in);
    for (int p_ = 0; p_ < L; ++p_) {
      const ClassGradientWeights<acc> w = class_gradient_weights(
          g_in[p_], head.valid[p_] != acc(0), head.uncertain[p_] != acc(0), p.bootstrap, p.route_gradients);
      ce_weight[p_] = w.ce;
      samples_weight[p_] = w.samples;
      log_var_weight[p_] = w.log_var;
    }

    if (current.any_uncertain) {
      acc lse_samples[L];
      load_lanes(sample_lse + pixel0, current.n, lse_samples);
      Word pixel_lo[L], pixel_hi[L];
      chunk_pixel_words(p, pixel0, pixel_lo, pixel_hi);
      sigma_from_log_var_lanes(C, buf.log_var);
      for (int64_t i = 0; i < C * L; ++i) {
        buf.grad_mu[i] = acc(0);
        buf.grad_s[i] = acc(0);
      }
      for (int64_t t = 0; t < p.samples; ++t) {
        draw_logits<Word>(p, static_cast<uint32_t>(t), pixel_lo, pixel_hi, buf.mu, buf.log_var, buf.logit, buf.noise);
        acc m[L], ly[L], sum[L], w[L], w_over_sum[L];
        logit_max_and_target(C, buf.logit, head.y, m, ly);
        for (int p_ = 0; p_ < L; ++p_) sum[p_] = acc(0);
        for (int64_t c = 0; c < C; ++c) {
          acc* __restrict l = buf.logit + c * L;
          for (int p_ = 0; p_ < L; ++p_) {
            l[p_] = math::exp_nonpositive(l[p_] - m[p_]);
            sum[p_] += l[p_];
          }
        }
        // w_t (0 at lanes without L_u), from the forward's LSE_t a_t.
        for (int p_ = 0; p_ < L; ++p_) {
          w[p_] = sample_weight(log_softmax_at(ly[p_], m[p_], sum[p_]), lse_samples[p_]) * head.uncertain[p_];
          w_over_sum[p_] = w[p_] / sum[p_];
        }
        for (int64_t c = 0; c < C; ++c) {
          const int32_t cc = static_cast<int32_t>(c);
          const acc* __restrict e = buf.logit + c * L;
          const acc* __restrict z = buf.noise + c * L;
          acc* __restrict gm = buf.grad_mu + c * L;
          acc* __restrict gs = buf.grad_s + c * L;
          for (int p_ = 0; p_ < L; ++p_) {
            const acc g = sample_logit_gradient(e[p_], w_over_sum[p_], w[p_], head.y[p_] == cc);
            gm[p_] += g;
            gs[p_] += g * z[p_];
          }
        }
      }
    }

    // Outputs: the weighted CE gradient plus the sample sums where they reach
    // mu; the log-variance gradient from sum_t g_t eps_t.  The sample sums are
    // 0 at lanes without L_u (their w_t is 0) and are not kept for chunks
    // without any.
    scalar* out_mu = grad_mu + p.class_offset(pixel0);
    scalar* out_s = grad_log_var + p.class_offset(pixel0);
    acc inv_sum[L];
    for (int p_ = 0; p_ < L; ++p_) inv_sum[p_] = acc(1) / head.mu_sum[p_];
    for (int64_t c = 0; c < C; ++c) {
      const acc* __restrict m = buf.mu + c * L;
      const int32_t cc = static_cast<int32_t>(c);
      acc g_mu[L], g_s[L];
      if (current.any_uncertain) {
        const acc* __restrict sigma = buf.log_var + c * L;
        const acc* __restrict gm = buf.grad_mu + c * L;
        const acc* __restrict gs = buf.grad_s + c * L;
        for (int p_ = 0; p_ < L; ++p_) {
          const acc ce_grad = ce_gradient(m[p_], head.mu_max[p_], inv_sum[p_], head.ce_target[p_] == cc);
          g_mu[p_] = class_mu_gradient(ce_weight[p_], ce_grad, samples_weight[p_], gm[p_]);
          g_s[p_] = class_log_var_gradient(log_var_weight[p_], sigma[p_], gs[p_]);
        }
      } else {
        for (int p_ = 0; p_ < L; ++p_) {
          const acc ce_grad = ce_gradient(m[p_], head.mu_max[p_], inv_sum[p_], head.ce_target[p_] == cc);
          g_mu[p_] = class_mu_gradient(ce_weight[p_], ce_grad, samples_weight[p_], acc(0));
          g_s[p_] = acc(0);
        }
      }
      for (int64_t p_ = 0; p_ < current.n; ++p_) {
        out_mu[c * p.plane + p_] = static_cast<scalar>(g_mu[p_]);
        out_s[c * p.plane + p_] = static_cast<scalar>(g_s[p_]);
      }
    }
  }
}

// The Philox word type of the lane loops (philox::mulhilo): 64-bit words
// where AVX-512 multiplies 64-bit lanes natively (the x86-64-v4 clone then
// runs), 32-bit words with 16-bit partial products elsewhere.  Both draw the
// same noise; only the speed differs.
bool wide_generator_words(const ClassProblem& p) {
  if (p.cpu_generator_words != 0) return p.cpu_generator_words == 64;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  static const bool wide = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
  return wide;
#else
  return false;
#endif
}

}  // namespace

template <typename scalar>
int32_t class_forward(const ClassProblem& problem, int64_t chunk_begin, int64_t chunk_end, scalar* loss,
                      scalar* sample_lse) {
  return wide_generator_words(problem)
             ? class_forward_impl<scalar, uint64_t>(problem, chunk_begin, chunk_end, loss, sample_lse)
             : class_forward_impl<scalar, uint32_t>(problem, chunk_begin, chunk_end, loss, sample_lse);
}

template <typename scalar>
void class_backward(const ClassProblem& problem, const scalar* grad, const scalar* sample_lse, int64_t chunk_begin,
                    int64_t chunk_end, scalar* grad_mu, scalar* grad_log_var) {
  if (wide_generator_words(problem)) {
    class_backward_impl<scalar, uint64_t>(problem, grad, sample_lse, chunk_begin, chunk_end, grad_mu, grad_log_var);
  } else {
    class_backward_impl<scalar, uint32_t>(problem, grad, sample_lse, chunk_begin, chunk_end, grad_mu, grad_log_var);
  }
}

template int32_t class_forward<float>(const ClassProblem&, int64_t, int64_t, float*, float*);
template int32_t class_forward<double>(const ClassProblem&, int64_t, int64_t, double*, double*);
template void class_backward<float>(const ClassProblem&, const float*, const float*, int64_t, int64_t, float*, float*);
template void class_backward<double>(const ClassProblem&, const double*, const double*, int64_t, int64_t, double*,
                                     double*);

}  // namespace cpu
}  // namespace uncertainty
}  // namespace boxloss
