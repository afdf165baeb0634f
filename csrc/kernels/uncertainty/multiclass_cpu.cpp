// CPU core of the multi-class uncertainty loss (Eq. 13-16).
//
// The work item is a chunk of kClassLanes consecutive pixels of one image, and
// every inner loop runs over those lanes with a constant trip count and no
// branches, so that the compiler vectorises it: Philox's 32-bit multiplies,
// Box-Muller's log / sqrt / sine / cosine, the softmax over classes and the
// log-sum-exp over samples all run 32 pixels at a time (target_clones builds
// them for AVX2 and AVX-512).  Per chunk the kernel keeps a few (classes x
// lanes) buffers; no (samples x classes x pixels) tensor ever exists, and the
// backward regenerates the forward's noise.
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

// What a chunk knows before any sample is drawn: the targets, which lanes
// carry the uncertainty term, and the cross-entropy of mu (with the target y
// at certain pixels and the bootstrapped y* of Eq. 16 at uncertain ones).
template <typename acc>
struct ChunkHead {
  int32_t y[L];           // target, 0 where ignored or out of range
  int32_t ce_target[L];   // the class CE(mu, .) is taken against
  acc valid[L];           // 1 where the target is not ignore_index
  acc uncertain[L];       // 1 where L_u applies (valid, inside a box, not pixel-perfect)
  acc mu_max[L];          // max_c mu_c
  acc mu_sum[L];          // sum_c exp(mu_c - max)
  acc ce[L];              // CE(mu, ce_target)
  int64_t n = 0;          // lanes that are pixels
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

template <typename scalar>
BOXLOSS_ALWAYS_INLINE void load_chunk(const ClassProblem& p, int64_t chunk, ChunkBuffers<acc_t<scalar>>& buf,
                                      ChunkHead<acc_t<scalar>>& head, int64_t* pixel0) {
  using acc = acc_t<scalar>;
  const int64_t C = p.num_classes;
  const int64_t chunks_per_image = (p.plane + L - 1) / L;
  const int64_t b = chunk / chunks_per_image;
  const int64_t i0 = (chunk % chunks_per_image) * L;
  const int64_t n = std::min<int64_t>(L, p.plane - i0);
  head.n = n;
  *pixel0 = b * p.plane + i0;
  const scalar* mu = static_cast<const scalar*>(p.mu) + b * C * p.plane + i0;
  const scalar* s = static_cast<const scalar*>(p.log_var) + b * C * p.plane + i0;
  for (int64_t c = 0; c < C; ++c) {
    load_lanes(mu + c * p.plane, n, buf.mu + c * L);
    load_lanes(s + c * p.plane, n, buf.log_var + c * L);
  }

  const int64_t* target = p.target + *pixel0;
  const bool pp = p.pixel_perfect != nullptr && p.pixel_perfect[b] != 0;
  int32_t bad = 0;
  int32_t any = 0;
  for (int p_ = 0; p_ < L; ++p_) {
    const int64_t t = target[p_ < n ? p_ : n - 1];
    const bool valid = t != p.ignore_index;
    const bool in_range = t >= 0 && t < C;
    bad |= static_cast<int32_t>(valid && !in_range);
    head.y[p_] = in_range ? static_cast<int32_t>(t) : 0;
    head.valid[p_] = valid ? acc(1) : acc(0);
    const bool in_box = p.box_mask == nullptr || p.box_mask[*pixel0 + (p_ < n ? p_ : n - 1)] != 0;
    const bool uncertain = valid && in_box && !pp;
    head.uncertain[p_] = uncertain ? acc(1) : acc(0);
    any |= static_cast<int32_t>(uncertain && p_ < n);
  }
  head.status = bad ? kTargetOutOfRange : 0;
  head.any_uncertain = any != 0;

  // Softmax statistics of mu, arg-max of mu (lowest index of the maximum) and
  // the largest log-variance: everything Eq. 16 and the CE terms need.  Local
  // arrays, and every function evaluated unconditionally, keep the loops
  // vectorisable.
  int32_t argmax[L], ce_target[L];
  acc mu_max[L], s_max[L], mu_sum[L], ce[L];
  for (int p_ = 0; p_ < L; ++p_) {
    mu_max[p_] = buf.mu[p_];
    argmax[p_] = 0;
    s_max[p_] = buf.log_var[p_];
  }
  for (int64_t c = 1; c < C; ++c) {
    const acc* __restrict m = buf.mu + c * L;
    const acc* __restrict lv = buf.log_var + c * L;
    for (int p_ = 0; p_ < L; ++p_) {
      const bool greater = m[p_] > mu_max[p_];
      argmax[p_] = greater ? static_cast<int32_t>(c) : argmax[p_];
      mu_max[p_] = greater ? m[p_] : mu_max[p_];
      s_max[p_] = lv[p_] > s_max[p_] ? lv[p_] : s_max[p_];
    }
  }
  const acc log_tau = static_cast<acc>(p.log_tau);
  const bool bootstrap = p.bootstrap;
  for (int p_ = 0; p_ < L; ++p_) {
    const bool flip = bootstrap & (head.uncertain[p_] != acc(0)) & (s_max[p_] > log_tau);
    ce_target[p_] = flip ? argmax[p_] : head.y[p_];
    mu_sum[p_] = acc(0);
    ce[p_] = acc(0);
  }
  // Two loops: with the select in the loop of the exp, GCC sinks the exp into
  // a branch and leaves both scalar.  The target's mu is picked by a 0/1
  // factor: GCC 12 vectorised the equivalent select of this loop into wrong
  // sums (caught by tests/cpp/test_uncertainty_core.cpp).
  for (int64_t c = 0; c < C; ++c) {
    const acc* __restrict m = buf.mu + c * L;
    for (int p_ = 0; p_ < L; ++p_) mu_sum[p_] += math::exp_nonpositive(m[p_] - mu_max[p_]);
  }
  for (int64_t c = 0; c < C; ++c) {
    const acc* __restrict m = buf.mu + c * L;
    const int32_t cc = static_cast<int32_t>(c);
    for (int p_ = 0; p_ < L; ++p_) ce[p_] -= (ce_target[p_] == cc ? acc(1) : acc(0)) * m[p_];
  }
  for (int p_ = 0; p_ < L; ++p_) {
    head.ce[p_] = ce[p_] + mu_max[p_] + math::log_positive(mu_sum[p_]);
    head.ce_target[p_] = ce_target[p_];
    head.mu_max[p_] = mu_max[p_];
    head.mu_sum[p_] = mu_sum[p_];
  }
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
      noise_block<acc, Word>(p.key, static_cast<uint32_t>(k), sample, pixel_lo[p_], pixel_hi[p_], &z[0][p_],
                             &z[1][p_], &z[2][p_], &z[3][p_]);
    }
    const int64_t classes = std::min<int64_t>(4, C - 4 * k);
    for (int64_t j = 0; j < classes; ++j) {
      const int64_t o = (4 * k + j) * L;
      for (int p_ = 0; p_ < L; ++p_) logit[o + p_] = mu[o + p_] + sigma[o + p_] * z[j][p_];
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
BOXLOSS_ALWAYS_INLINE void sigma_from_log_var(int64_t C, acc* __restrict values) {
  for (int64_t i = 0; i < C * L; ++i) values[i] = math::exp_clamped(acc(0.5) * values[i]);
}

template <typename scalar, typename Word>
BOXLOSS_CPU_CLONES int32_t class_forward_impl(const ClassProblem& p, int64_t chunk_begin, int64_t chunk_end,
                                              scalar* loss, scalar* sample_lse) {
  using acc = acc_t<scalar>;
  const int64_t C = p.num_classes;
  ChunkBuffers<acc> buf(C, /*backward=*/false);
  ChunkHead<acc> head;
  const acc log_samples = static_cast<acc>(std::log(static_cast<double>(p.samples)));
  int32_t status = 0;
  for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
    int64_t pixel0;
    load_chunk<scalar>(p, chunk, buf, head, &pixel0);
    status |= head.status;
    acc lse_samples[L];
    for (int p_ = 0; p_ < L; ++p_) lse_samples[p_] = acc(0);
    if (head.any_uncertain) {
      Word pixel_lo[L], pixel_hi[L];
      for (int p_ = 0; p_ < L; ++p_) {
        const PixelWords words = pixel_words(p.key, static_cast<uint64_t>(pixel0 + p_));
        pixel_lo[p_] = words.lo;
        pixel_hi[p_] = words.hi;
      }
      sigma_from_log_var(C, buf.log_var);
      // Online log-sum-exp over samples of a_t = l_{t,y} - LSE_c l_{t,c}.
      acc run_max[L], run_sum[L];
      for (int p_ = 0; p_ < L; ++p_) {
        run_max[p_] = std::numeric_limits<acc>::lowest();
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
          const acc a = (ly[p_] - m[p_]) - math::log_positive(sum[p_]);  // no cancellation against a large max
          const acc new_max = a > run_max[p_] ? a : run_max[p_];
          run_sum[p_] = run_sum[p_] * math::exp_nonpositive(run_max[p_] - new_max) +
                        math::exp_nonpositive(a - new_max);
          run_max[p_] = new_max;
        }
      }
      for (int p_ = 0; p_ < L; ++p_) {
        lse_samples[p_] = head.uncertain[p_] != acc(0) ? run_max[p_] + math::log_positive(run_sum[p_]) : acc(0);
      }
    }
    const bool with_ce = p.bootstrap;
    for (int64_t p_ = 0; p_ < head.n; ++p_) {
      const bool uncertain = head.uncertain[p_] != acc(0);
      const acc uncertain_loss = log_samples - lse_samples[p_] + (with_ce ? head.ce[p_] : acc(0));
      const acc l = uncertain ? uncertain_loss : head.ce[p_];
      loss[pixel0 + p_] = static_cast<scalar>(head.valid[p_] != acc(0) ? l : acc(0));
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
  // Which terms send a gradient to mu at uncertain pixels (Sec. 3.3 routing).
  const bool ce_to_mu = p.bootstrap;
  const bool samples_to_mu = !p.bootstrap || !p.route_gradients;
  ChunkBuffers<acc> buf(C, /*backward=*/true);
  ChunkHead<acc> head;
  for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
    int64_t pixel0;
    load_chunk<scalar>(p, chunk, buf, head, &pixel0);
    const int64_t b = pixel0 / p.plane;
    const int64_t i0 = pixel0 - b * p.plane;
    acc g_out[L];
    load_lanes(grad + pixel0, head.n, g_out);
    for (int p_ = 0; p_ < L; ++p_) g_out[p_] = head.valid[p_] != acc(0) ? g_out[p_] : acc(0);

    if (head.any_uncertain) {
      acc lse_samples[L];
      load_lanes(sample_lse + pixel0, head.n, lse_samples);
      Word pixel_lo[L], pixel_hi[L];
      for (int p_ = 0; p_ < L; ++p_) {
        const PixelWords words = pixel_words(p.key, static_cast<uint64_t>(pixel0 + p_));
        pixel_lo[p_] = words.lo;
        pixel_hi[p_] = words.hi;
      }
      sigma_from_log_var(C, buf.log_var);
      for (int64_t i = 0; i < C * L; ++i) {
        buf.grad_mu[i] = acc(0);
        buf.grad_s[i] = acc(0);
      }
      for (int64_t t = 0; t < p.samples; ++t) {
        draw_logits<Word>(p, static_cast<uint32_t>(t), pixel_lo, pixel_hi, buf.mu, buf.log_var, buf.logit,
                          buf.noise);
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
        // w_t = softmax over samples of a_t, from the forward's LSE_t a_t.
        for (int p_ = 0; p_ < L; ++p_) {
          const acc a = (ly[p_] - m[p_]) - math::log_positive(sum[p_]);  // no cancellation against a large max
          w[p_] = math::exp_nonpositive(a - lse_samples[p_]) * head.uncertain[p_];
          w_over_sum[p_] = w[p_] / sum[p_];
        }
        // dL_u/dl_{t,c} = w_t (softmax(l_t)_c - [c = y])
        for (int64_t c = 0; c < C; ++c) {
          const int32_t cc = static_cast<int32_t>(c);
          const acc* __restrict e = buf.logit + c * L;
          const acc* __restrict z = buf.noise + c * L;
          acc* __restrict gm = buf.grad_mu + c * L;
          acc* __restrict gs = buf.grad_s + c * L;
          for (int p_ = 0; p_ < L; ++p_) {
            const acc g = e[p_] * w_over_sum[p_] - (head.y[p_] == cc ? w[p_] : acc(0));
            gm[p_] += g;
            gs[p_] += g * z[p_];
          }
        }
      }
    }

    // Outputs: CE(mu, ce_target) at certain pixels (and at uncertain ones with
    // bootstrapping), plus the sample sums where they reach mu; 0.5 sigma
    // sum_t g_t eps_t for the log-variance.
    scalar* out_mu = grad_mu + b * C * p.plane + i0;
    scalar* out_s = grad_log_var + b * C * p.plane + i0;
    // Per lane: how much of the CE gradient and of the sample sums reach mu.
    acc inv_sum[L], ce_weight[L], sample_weight[L];
    for (int p_ = 0; p_ < L; ++p_) {
      const bool uncertain = head.uncertain[p_] != acc(0);
      inv_sum[p_] = acc(1) / head.mu_sum[p_];
      ce_weight[p_] = (!uncertain || ce_to_mu) ? g_out[p_] : acc(0);
      sample_weight[p_] = (uncertain && samples_to_mu) ? g_out[p_] : acc(0);
    }
    for (int64_t c = 0; c < C; ++c) {
      const acc* __restrict m = buf.mu + c * L;
      const int32_t cc = static_cast<int32_t>(c);
      acc g_mu[L], g_s[L];
      for (int p_ = 0; p_ < L; ++p_) {
        const acc ce_grad = math::exp_nonpositive(m[p_] - head.mu_max[p_]) * inv_sum[p_] -
                            (head.ce_target[p_] == cc ? acc(1) : acc(0));
        g_mu[p_] = ce_weight[p_] * ce_grad;
        g_s[p_] = acc(0);
      }
      if (head.any_uncertain) {
        const acc* __restrict sigma = buf.log_var + c * L;
        const acc* __restrict gm = buf.grad_mu + c * L;
        const acc* __restrict gs = buf.grad_s + c * L;
        for (int p_ = 0; p_ < L; ++p_) {
          // grad_mu and grad_s are 0 at certain lanes (their w_t is 0)
          g_mu[p_] += sample_weight[p_] * gm[p_];
          g_s[p_] = g_out[p_] * acc(0.5) * sigma[p_] * gs[p_];
        }
      }
      for (int64_t p_ = 0; p_ < head.n; ++p_) {
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
template void class_backward<float>(const ClassProblem&, const float*, const float*, int64_t, int64_t, float*,
                                    float*);
template void class_backward<double>(const ClassProblem&, const double*, const double*, int64_t, int64_t, double*,
                                     double*);

}  // namespace cpu
}  // namespace uncertainty
}  // namespace boxloss
