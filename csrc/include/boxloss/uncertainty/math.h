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

enum ClassStatus : int32_t {
  kTargetOutOfRange = 1,  // a target outside [0, C) that is not ignore_index
};

}  // namespace uncertainty
}  // namespace boxloss
