// Per-pixel math of the uncertainty losses (the uncertainty-based online
// bootstrapping of Neven et al., "Weakly-Supervised Semantic Segmentation by
// Learning Label Uncertainty", arXiv:2110.05926, Sec. 3), shared by the CPU
// and CUDA kernels.  Torch-free: tests/cpp builds it with CMake alone.
//
// The network predicts a mean logit mu and a log-variance s = log sigma^2.
//
// Binary (Eq. 8-11), per pixel with target y in [0, 1]:
//   kappa = 1 / sqrt(1 + pi e^s / 8),   L_u = BCE(mu kappa, y)                  (Eq. 8-9)
//   W = sigmoid((tau - e^s) / temperature)                                      (Eq. 11)
//   L_b = W BCE(mu, y) + (1 - W) BCE(mu, 1 - y) = BCE(mu, W y + (1 - W)(1 - y)) (Eq. 10)
//   inside boxes: L = L_u + L_b (L_u alone without bootstrapping); elsewhere L = BCE(mu, y).
//
// Multi-class (Eq. 13-16), per pixel with target class y and T samples:
//   l_t = mu + sigma (.) eps_t,  a_t = l_{t,y} - LSE_c l_{t,c}
//   L_u = -log((1/T) sum_t softmax(l_t)_y) = log T - LSE_t a_t
//   y* = argmax_c mu_c if max_c sigma_c^2 > tau else y                          (Eq. 16)
//   L = L_u + CE(mu, y*) inside boxes, CE(mu, y) elsewhere.
//
// Why a log-variance: sigma^2 = e^s is positive for every s without a clamp
// or a softplus, its gradient never divides by a variance that can reach 0,
// and 1 / sigma^2 = e^-s, kappa and W(1 - W) sigma^2 are all computed as
// exponentials of sums of logs, so that no intermediate overflows.
#pragma once

#include "boxloss/common/host_device.h"
#include "boxloss/common/philox.h"
#include "boxloss/common/vector_math.h"

namespace boxloss {
namespace uncertainty {

// ---------------------------------------------------------------- noise
//
// eps[t, b, c, h, w] is normal number (c mod 4) of the Philox4x32-10 block
//   key     = (seed mod 2^32, seed >> 32)
//   counter = (c / 4, t, pixel mod 2^32, (pixel >> 32) + offset),  pixel = (b H + h) W + w
// where the block's four words (x0, x1, x2, x3) give, by Box-Muller,
//   class 4k + 0: r(x0) cos(2 pi u(x1)),  class 4k + 1: r(x0) sin(2 pi u(x1)),
//   class 4k + 2: r(x2) cos(2 pi u(x3)),  class 4k + 3: r(x2) sin(2 pi u(x3)).
// It depends on nothing else: not on the dtype (up to float rounding), the
// device, the thread count or which other pixels are computed.
struct NoiseKey {
  uint32_t k0 = 0;
  uint32_t k1 = 0;
  uint32_t offset = 0;
};

BOXLOSS_HD_ALWAYS_INLINE NoiseKey make_noise_key(uint64_t seed, uint32_t offset) {
  NoiseKey key;
  key.k0 = static_cast<uint32_t>(seed);
  key.k1 = static_cast<uint32_t>(seed >> 32);
  key.offset = offset;
  return key;
}

// The counter words that identify a pixel: (pixel mod 2^32, (pixel >> 32) + offset).
struct PixelWords {
  uint32_t lo;
  uint32_t hi;
};
BOXLOSS_HD_ALWAYS_INLINE PixelWords pixel_words(const NoiseKey& key, uint64_t pixel) {
  return PixelWords{static_cast<uint32_t>(pixel), static_cast<uint32_t>(pixel >> 32) + key.offset};
}

// The four normals of classes 4 class_block .. 4 class_block + 3 of sample
// `sample` at the pixel with counter words (pixel_lo, pixel_hi).  Word: see
// philox::mulhilo (the CPU picks the one its vector unit runs fastest).
template <typename acc, typename Word = uint32_t>
BOXLOSS_HD_ALWAYS_INLINE void noise_block(const NoiseKey& key, uint32_t class_block, uint32_t sample, Word pixel_lo,
                                          Word pixel_hi, acc* z0, acc* z1, acc* z2, acc* z3) {
  Word x0 = class_block;
  Word x1 = sample;
  Word x2 = pixel_lo;
  Word x3 = pixel_hi;
  philox::philox4x32_10<Word>(key.k0, key.k1, x0, x1, x2, x3);
  philox::box_muller(static_cast<uint32_t>(x0), static_cast<uint32_t>(x1), z0, z1);
  philox::box_muller(static_cast<uint32_t>(x2), static_cast<uint32_t>(x3), z2, z3);
}

// ---------------------------------------------------------------- binary

template <typename acc>
struct BinarySettings {
  acc tau = acc(2.5);
  acc inv_temperature = acc(5);
};

// ln(pi / 8)
template <typename acc>
BOXLOSS_HD_ALWAYS_INLINE acc log_pi_over_8() {
  return acc(-0.93471165583043580);
}

// Binary cross-entropy of a logit x against a target probability y, and its
// derivative in x, written without cancellation (not_y = 1 - y is passed in,
// computed by the caller from the quantities that define it):
//   BCE(x, y) = y softplus(-x) + (1 - y) softplus(x) = ln(1 + e^-|x|) + y max(-x, 0) + (1 - y) max(x, 0)
//   dBCE/dx   = (1 - y) sigmoid(x) - y sigmoid(-x)
// The usual softplus(x) - y x loses the digits of a small loss to a large x.
template <typename acc>
BOXLOSS_HD_ALWAYS_INLINE void bce_with_logits(acc x, acc y, acc not_y, acc* loss, acc* grad) {
  const acc ax = x < acc(0) ? -x : x;
  const acc e = math::exp_nonpositive(-ax);
  const acc pos = x > acc(0) ? x : acc(0);
  const acc neg = x < acc(0) ? -x : acc(0);
  *loss = math::log1p_unit(e) + y * neg + not_y * pos;
  const acc inv = acc(1) / (acc(1) + e);
  const acc sig = x >= acc(0) ? inv : e * inv;      // sigmoid(x)
  const acc sig_neg = x >= acc(0) ? e * inv : inv;  // sigmoid(-x)
  *grad = not_y * sig - y * sig_neg;
}

// Loss and gradients of one pixel.  `uncertain`: inside a box of a box-labelled
// image.  With kRoute (Sec. 3.3) L_u sees mu as a constant and L_b sees s
// only through W's value: d/dmu comes from L_b, d/ds from L_u.  Without
// bootstrapping L = L_u and both gradients come from it.  The switches are
// template arguments so that a loop over pixels has no branch to vectorise.
template <bool kBootstrap, bool kRoute, typename acc>
BOXLOSS_HD_ALWAYS_INLINE void binary_pixel(acc mu, acc s, acc y, bool uncertain, const BinarySettings<acc>& st,
                                           acc* loss, acc* grad_mu, acc* grad_s) {
  using math::exp_clamped;
  using math::softplus;
  const acc not_y = acc(1) - y;
  acc bce_mu, g_plain;
  bce_with_logits(mu, y, not_y, &bce_mu, &g_plain);
  // kappa = (1 + pi/8 e^s)^(-1/2) = exp(-softplus(s + ln(pi/8)) / 2)
  const acc h = s + log_pi_over_8<acc>();
  const acc kappa = math::exp_nonpositive(acc(-0.5) * softplus(h));
  const acc z = mu * kappa;
  acc l, dz;  // L_u and dL_u/dz
  bce_with_logits(z, y, not_y, &l, &dz);
  acc g_mu = dz * kappa;
  // dkappa/ds = -kappa sigmoid(h) / 2, so dL_u/ds = dz mu dkappa/ds = -dz z sigmoid(h) / 2
  acc g_s = acc(-0.5) * dz * z * math::sigmoid(h);
  if (kBootstrap) {
    const acc var = exp_clamped(s);
    const acc a = (st.tau - var) * st.inv_temperature;
    const acc w = math::sigmoid(a);
    const acc not_w = math::sigmoid(-a);
    // Eq. 10 as one BCE against the soft target W y + (1 - W)(1 - y).
    const acc soft_target = w * y + not_w * not_y;
    const acc not_soft_target = w * not_y + not_w * y;
    acc l_b, g_b;
    bce_with_logits(mu, soft_target, not_soft_target, &l_b, &g_b);
    l += l_b;
    g_mu = kRoute ? g_b : g_mu + g_b;
    if (!kRoute) {
      // dL_b/ds = mu (2y - 1) W (1 - W) e^s / temperature, the product taken
      // as exp(log W + log(1 - W) + s) so that e^s never overflows it.
      const acc log_w_1mw = -(softplus(-a) + softplus(a));
      g_s += mu * (y - not_y) * exp_clamped(log_w_1mw + s) * st.inv_temperature;
    }
  }
  // Blended with u in {0, 1} (exact: 1 x + 0 y = x for finite y) rather than
  // selected: GCC sinks the work of a selected-away value into a branch,
  // which stops the vectorisation of a loop over pixels.
  const acc u = uncertain ? acc(1) : acc(0);
  *loss = u * l + (acc(1) - u) * bce_mu;
  *grad_mu = u * g_mu + (acc(1) - u) * g_plain;
  *grad_s = u * g_s;
}

// Binary status bits the kernels report; the wrapper raises ValueError.
enum BinaryStatus : int32_t {
  kTargetNotProbability = 1,  // NaN or outside [0, 1]
};

// ---------------------------------------------------------------- multi-class
//
// The CPU core runs kClassLanes pixels side by side, each loop over them
// vectorised; a CUDA thread runs one pixel.  Both call the functions below:
// the scalar ones inside the CPU's loops over lanes, and ClassHead /
// class_head_targets / class_head_logits over N pixels side by side, with
// N = kClassLanes on the CPU and N = 1 on the GPU.

enum ClassStatus : int32_t {
  kTargetOutOfRange = 1,  // a target outside [0, C) that is not ignore_index
};

// sigma = e^(s / 2), the standard deviation of a log-variance s.
template <typename acc>
BOXLOSS_HD_ALWAYS_INLINE acc sigma_from_log_var(acc s) {
  return math::exp_clamped(acc(0.5) * s);
}

// l_{t,c} = mu_c + sigma_c eps_{t,c}: class c's logit in sample t (Eq. 13).
template <typename acc>
BOXLOSS_HD_ALWAYS_INLINE acc sample_logit(acc mu, acc sigma, acc eps) {
  return mu + sigma * eps;
}

// Eq. 16: y* = arg max_c mu_c where the pixel bootstraps (bootstrapping is on
// and the pixel carries L_u) and its largest variance exceeds tau
// (max_c s_c > log tau); y elsewhere.  Written with & rather than && so that
// a loop over lanes has no branch.
template <typename acc>
BOXLOSS_HD_ALWAYS_INLINE int32_t bootstrapped_target(bool bootstraps, acc max_log_var, acc log_tau, int32_t argmax,
                                                     int32_t y) {
  const bool flip = bootstraps & (max_log_var > log_tau);
  return flip ? argmax : y;
}

// CE(mu, y*) = LSE_c mu_c - mu_{y*} = (max_c mu_c - mu_{y*}) + log sum_c e^(mu_c - max).
template <typename acc>
BOXLOSS_HD_ALWAYS_INLINE acc cross_entropy(acc mu_max, acc mu_target, acc sum_exp) {
  return (mu_max - mu_target) + math::log_positive(sum_exp);
}

// log softmax(l)_y = (l_y - max) - log sum_c e^(l_c - max), from the maximum
// and the sum of a sample's logits: no cancellation of l_y against a large
// maximum.  This is a_t of Eq. 14.
template <typename acc>
BOXLOSS_HD_ALWAYS_INLINE acc log_softmax_at(acc l_y, acc l_max, acc sum_exp) {
  return (l_y - l_max) - math::log_positive(sum_exp);
}

// One step of an online log-sum-exp: (*running_max, *running_sum) stands for
// log sum_i e^(x_i) = running_max + log(running_sum) over the values added so
// far.  Start from running_max = -infinity and running_sum = 0.
template <typename acc>
BOXLOSS_HD_ALWAYS_INLINE void log_sum_exp_add(acc x, acc* running_max, acc* running_sum) {
  const acc new_max = x > *running_max ? x : *running_max;
  *running_sum = *running_sum * math::exp_nonpositive(*running_max - new_max) + math::exp_nonpositive(x - new_max);
  *running_max = new_max;
}

template <typename acc>
BOXLOSS_HD_ALWAYS_INLINE acc log_sum_exp_value(acc running_max, acc running_sum) {
  return running_max + math::log_positive(running_sum);
}

// The loss of one pixel: L_u = log T - LSE_t a_t (Eq. 14-15), plus CE(mu, y*)
// with bootstrapping, where the uncertainty term applies; CE(mu, y) elsewhere;
// 0 at ignored pixels.
template <typename acc>
BOXLOSS_HD_ALWAYS_INLINE acc class_pixel_loss(bool valid, bool uncertain, bool bootstrap, acc ce, acc sample_lse,
                                              acc log_samples) {
  const acc uncertain_loss = log_samples - sample_lse + (bootstrap ? ce : acc(0));
  const acc loss = uncertain ? uncertain_loss : ce;
  return valid ? loss : acc(0);
}

// w_t = e^(a_t - LSE_t a_t): sample t's share of dL_u, from the forward's LSE_t a_t.
template <typename acc>
BOXLOSS_HD_ALWAYS_INLINE acc sample_weight(acc a, acc sample_lse) {
  return math::exp_nonpositive(a - sample_lse);
}

// dL_u/dl_{t,c} = w_t (softmax(l_t)_c - [c = y]), from e = e^(l_{t,c} - max_c l_{t,c})
// and w_t / sum_c e: one multiply per class instead of a log and an exp.
template <typename acc>
BOXLOSS_HD_ALWAYS_INLINE acc sample_logit_gradient(acc e, acc w_over_sum, acc w, bool is_target) {
  return e * w_over_sum - (is_target ? w : acc(0));
}

// dCE(mu, y*)/dmu_c = softmax(mu)_c - [c = y*], from max_c mu_c and 1 / sum_c e^(mu_c - max).
template <typename acc>
BOXLOSS_HD_ALWAYS_INLINE acc ce_gradient(acc mu_c, acc mu_max, acc inv_sum, bool is_target) {
  return math::exp_nonpositive(mu_c - mu_max) * inv_sum - (is_target ? acc(1) : acc(0));
}

// How much of a pixel's incoming gradient reaches each term (Sec. 3.3
// routing): CE(mu, .) reaches mu everywhere except at uncertain pixels
// without bootstrapping; L_u reaches mu at uncertain pixels only when the
// gradients are not routed (or without bootstrapping), and reaches the
// log-variance wherever it applies (its sample sums are 0 elsewhere).
// Everything is 0 at ignored pixels.
template <typename acc>
struct ClassGradientWeights {
  acc ce;       // on dCE/dmu
  acc samples;  // on sum_t dL_u/dl_t, towards mu
  acc log_var;  // on the log-variance gradient of L_u
};

template <typename acc>
BOXLOSS_HD_ALWAYS_INLINE ClassGradientWeights<acc> class_gradient_weights(acc grad, bool valid, bool uncertain,
                                                                          bool bootstrap, bool route_gradients) {
  const acc g = valid ? grad : acc(0);
  ClassGradientWeights<acc> w;
  w.ce = (!uncertain || bootstrap) ? g : acc(0);
  w.samples = (uncertain && (!bootstrap || !route_gradients)) ? g : acc(0);
  w.log_var = g;
  return w;
}

// dL/dmu_c from dCE/dmu_c and sum_t dL_u/dl_{t,c}, with their weights.
template <typename acc>
BOXLOSS_HD_ALWAYS_INLINE acc class_mu_gradient(acc ce_weight, acc ce_grad, acc samples_weight, acc sample_sum) {
  return ce_weight * ce_grad + samples_weight * sample_sum;
}

// dL/ds_c = weight sigma_c / 2 sum_t dL_u/dl_{t,c} eps_{t,c}, since
// dl_{t,c}/ds_c = eps_{t,c} dsigma_c/ds_c = eps_{t,c} sigma_c / 2.
template <typename acc>
BOXLOSS_HD_ALWAYS_INLINE acc class_log_var_gradient(acc weight, acc sigma, acc sample_noise_sum) {
  return weight * acc(0.5) * sigma * sample_noise_sum;
}

// What N pixels know before any sample is drawn: their targets, which of
// them carry the uncertainty term, and the cross-entropy of mu (against the
// target y at certain pixels and the bootstrapped y* of Eq. 16 at uncertain
// ones).  Struct of arrays, lane j for pixel j.
template <typename acc, int N>
struct ClassHead {
  int32_t y[N];          // target, 0 where ignored or out of range
  int32_t ce_target[N];  // the class CE(mu, .) is taken against
  acc valid[N];          // 1 where the target is not ignore_index
  acc uncertain[N];      // 1 where L_u applies (valid, inside a box, not pixel-perfect)
  acc mu_max[N];         // max_c mu_c
  acc mu_sum[N];         // sum_c exp(mu_c - max)
  acc ce[N];             // CE(mu, ce_target)
};

// The targets of N pixels of one image.  `target` and `box_mask` (nullptr:
// every pixel inside a box) point at the first pixel; lanes j >= n repeat
// pixel n - 1 (the end of an image in a CPU chunk), so that every lane
// computes on finite numbers; such lanes are never stored.  Returns the
// ClassStatus bits of the n pixels' targets; *any_uncertain tells whether one
// of them carries the uncertainty term.
template <typename acc, int N>
BOXLOSS_HD_ALWAYS_INLINE int32_t class_head_targets(const int64_t* target, const uint8_t* box_mask, int64_t n,
                                                    bool pixel_perfect, int64_t num_classes, int64_t ignore_index,
                                                    ClassHead<acc, N>* head, bool* any_uncertain) {
  int32_t bad = 0;
  int32_t any = 0;
  for (int j = 0; j < N; ++j) {
    const int64_t i = j < n ? j : n - 1;
    const int64_t t = target[i];
    const bool valid = t != ignore_index;
    const bool in_range = t >= 0 && t < num_classes;
    bad |= static_cast<int32_t>(valid && !in_range);
    head->y[j] = in_range ? static_cast<int32_t>(t) : 0;
    head->valid[j] = valid ? acc(1) : acc(0);
    const bool in_box = box_mask == nullptr || box_mask[i] != 0;
    const bool uncertain = valid && in_box && !pixel_perfect;
    head->uncertain[j] = uncertain ? acc(1) : acc(0);
    any |= static_cast<int32_t>(uncertain && j < n);
  }
  *any_uncertain = any != 0;
  return bad ? kTargetOutOfRange : 0;
}

// Softmax statistics of mu, the arg-max of mu (lowest index of the maximum),
// the largest log-variance, Eq. 16 and CE(mu, ce_target) of N pixels whose
// targets class_head_targets has set.  Class c of lane j is
// mu[c * class_stride + j] (log_var likewise).  Local arrays, loops over lanes
// without branches and every function evaluated unconditionally keep the
// CPU's loops vectorisable.
template <typename acc, int N, typename T>
BOXLOSS_HD_ALWAYS_INLINE void class_head_logits(const T* __restrict__ mu, const T* __restrict__ log_var,
                                                int64_t class_stride, int64_t num_classes, acc log_tau, bool bootstrap,
                                                ClassHead<acc, N>* head) {
  int32_t argmax[N], ce_target[N];
  acc mu_max[N], s_max[N], mu_sum[N], mu_target[N];
  for (int j = 0; j < N; ++j) {
    mu_max[j] = static_cast<acc>(mu[j]);
    argmax[j] = 0;
    s_max[j] = static_cast<acc>(log_var[j]);
  }
  for (int64_t c = 1; c < num_classes; ++c) {
    const T* __restrict__ m = mu + c * class_stride;
    const T* __restrict__ lv = log_var + c * class_stride;
    for (int j = 0; j < N; ++j) {
      const acc mc = static_cast<acc>(m[j]);
      const acc sc = static_cast<acc>(lv[j]);
      const bool greater = mc > mu_max[j];
      argmax[j] = greater ? static_cast<int32_t>(c) : argmax[j];
      mu_max[j] = greater ? mc : mu_max[j];
      s_max[j] = sc > s_max[j] ? sc : s_max[j];
    }
  }
  for (int j = 0; j < N; ++j) {
    ce_target[j] =
        bootstrapped_target(bootstrap & (head->uncertain[j] != acc(0)), s_max[j], log_tau, argmax[j], head->y[j]);
    mu_sum[j] = acc(0);
    mu_target[j] = acc(0);
  }
  // Two loops: with the select in the loop of the exp, GCC sinks the exp into
  // a branch and leaves both scalar.  The target's mu is picked by a 0/1
  // factor: GCC 12 vectorised the equivalent select of this loop into wrong
  // sums (caught by tests/cpp/test_uncertainty_core.cpp).
  for (int64_t c = 0; c < num_classes; ++c) {
    const T* __restrict__ m = mu + c * class_stride;
    for (int j = 0; j < N; ++j) mu_sum[j] += math::exp_nonpositive(static_cast<acc>(m[j]) - mu_max[j]);
  }
  for (int64_t c = 0; c < num_classes; ++c) {
    const T* __restrict__ m = mu + c * class_stride;
    const int32_t cc = static_cast<int32_t>(c);
    for (int j = 0; j < N; ++j) mu_target[j] += (ce_target[j] == cc ? acc(1) : acc(0)) * static_cast<acc>(m[j]);
  }
  for (int j = 0; j < N; ++j) {
    head->ce[j] = cross_entropy(mu_max[j], mu_target[j], mu_sum[j]);
    head->ce_target[j] = ce_target[j];
    head->mu_max[j] = mu_max[j];
    head->mu_sum[j] = mu_sum[j];
  }
}

}  // namespace uncertainty
}  // namespace boxloss
