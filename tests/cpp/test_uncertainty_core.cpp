// Torch-free tests of the uncertainty-loss CPU core (csrc/kernels/uncertainty):
//
// * multi-class forward against a brute-force loop written from Eq. 13-16
//   (noise drawn pixel by pixel with noise_block, the log of the mean taken
//   directly), in double and float, with masks, pixel-perfect images,
//   ignored pixels and every bootstrapping / routing setting;
// * the backward against central finite differences of the forward (the full
//   gradient, routing off) and against the routed formulas;
// * results independent of how the chunk range is split;
// * the binary core against Eq. 8-11 written with sigma^2 = e^s, and its
//   gradient against finite differences;
// * finite results for |mu| = 1e4 and log-variances of +-20 with 21 classes;
// * the step before the samples (ClassProblem::head_at: targets, Eq. 16 and
//   CE(mu, y*)) run as a CUDA thread runs it, one pixel read from the input
//   arrays, against the CPU's kClassLanes lanes read from lane buffers and
//   against the definition.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "boxloss/uncertainty/cpu.h"
#include "test_support.h"

namespace {

namespace u = boxloss::uncertainty;
namespace ucpu = boxloss::uncertainty::cpu;

struct ClassCase {
  int64_t B = 2, C = 5, H = 3, W = 7;
  int64_t samples = 6;
  bool bootstrap = true;
  bool route = true;
  bool with_mask = true;
  bool with_pp = true;
  double mu_scale = 2.0;
  double tau = 1.5;
  uint64_t seed = 12345;
  uint32_t offset = 3;
  int32_t words = 0;  // the CPU generator's word type: 0 (the CPU's choice), 32 or 64
};

struct ClassData {
  std::vector<double> mu, log_var;
  std::vector<int64_t> target;
  std::vector<uint8_t> mask, pp;
};

ClassData make_data(const ClassCase& k, uint32_t rng_seed) {
  std::mt19937 rng(rng_seed);
  std::normal_distribution<double> normal;
  std::uniform_int_distribution<int64_t> cls(0, k.C - 1);
  ClassData d;
  const int64_t n = k.B * k.C * k.H * k.W, pixels = k.B * k.H * k.W;
  for (int64_t i = 0; i < n; ++i) {
    d.mu.push_back(normal(rng) * k.mu_scale);
    d.log_var.push_back(normal(rng));
  }
  for (int64_t i = 0; i < pixels; ++i) {
    d.target.push_back(rng() % 10 == 0 ? 255 : cls(rng));
    d.mask.push_back(rng() % 3 != 0);
  }
  for (int64_t b = 0; b < k.B; ++b) d.pp.push_back(b % 2);
  return d;
}

template <typename scalar>
u::ClassProblem make_problem(const ClassCase& k, const std::vector<scalar>& mu, const std::vector<scalar>& log_var,
                             const ClassData& d) {
  u::ClassProblem p;
  p.mu = mu.data();
  p.log_var = log_var.data();
  p.target = d.target.data();
  p.box_mask = k.with_mask ? d.mask.data() : nullptr;
  p.pixel_perfect = k.with_pp ? d.pp.data() : nullptr;
  p.batch = k.B;
  p.num_classes = k.C;
  p.plane = k.H * k.W;
  p.samples = k.samples;
  p.key = u::make_noise_key(k.seed, k.offset);
  p.log_tau = std::log(k.tau);
  p.bootstrap = k.bootstrap;
  p.route_gradients = k.route;
  p.ignore_index = 255;
  p.cpu_generator_words = k.words;
  return p;
}

// Eq. 13-16 pixel by pixel, in double, from the definition.
std::vector<double> brute_force_loss(const ClassCase& k, const ClassData& d) {
  const int64_t HW = k.H * k.W;
  const auto key = u::make_noise_key(k.seed, k.offset);
  std::vector<double> out(k.B * HW, 0.0);
  for (int64_t b = 0; b < k.B; ++b) {
    for (int64_t i = 0; i < HW; ++i) {
      const int64_t pixel = b * HW + i;
      const int64_t y = d.target[pixel];
      if (y == 255) continue;
      auto mu = [&](int64_t c) { return d.mu[(b * k.C + c) * HW + i]; };
      auto s = [&](int64_t c) { return d.log_var[(b * k.C + c) * HW + i]; };
      const bool uncertain = (!k.with_mask || d.mask[pixel]) && (!k.with_pp || !d.pp[b]);
      double z_mu = 0, max_var = -1e300;
      int64_t argmax = 0;
      for (int64_t c = 0; c < k.C; ++c) {
        z_mu += std::exp(mu(c));
        max_var = std::max(max_var, std::exp(s(c)));
        if (mu(c) > mu(argmax)) argmax = c;
      }
      const int64_t y_star = (k.bootstrap && uncertain && max_var > k.tau) ? argmax : y;
      const double ce = std::log(z_mu) - mu(uncertain ? y_star : y);
      if (!uncertain) {
        out[pixel] = ce;
        continue;
      }
      double mean_p = 0;
      const auto words = u::pixel_words(key, static_cast<uint64_t>(pixel));
      for (int64_t t = 0; t < k.samples; ++t) {
        std::vector<double> logits(k.C);
        for (int64_t c = 0; c < k.C; ++c) {
          double z[4];
          u::noise_block(key, static_cast<uint32_t>(c / 4), static_cast<uint32_t>(t), words.lo, words.hi, &z[0], &z[1],
                         &z[2], &z[3]);
          logits[c] = mu(c) + std::sqrt(std::exp(s(c))) * z[c % 4];
        }
        double z_sum = 0;
        for (double l : logits) z_sum += std::exp(l);
        mean_p += std::exp(logits[y]) / z_sum / k.samples;
      }
      out[pixel] = -std::log(mean_p) + (k.bootstrap ? ce : 0.0);
    }
  }
  return out;
}

template <typename scalar>
std::vector<double> core_loss(const ClassCase& k, const ClassData& d, int64_t split = 0) {
  std::vector<scalar> mu(d.mu.begin(), d.mu.end()), lv(d.log_var.begin(), d.log_var.end());
  const u::ClassProblem p = make_problem<scalar>(k, mu, lv, d);
  std::vector<scalar> loss(k.B * k.H * k.W), lse(k.B * k.H * k.W);
  const int64_t chunks = ucpu::class_chunks(p);
  if (split <= 0) {
    ucpu::class_forward<scalar>(p, 0, chunks, loss.data(), lse.data());
  } else {
    for (int64_t c = 0; c < chunks; c += split) {
      ucpu::class_forward<scalar>(p, c, std::min(chunks, c + split), loss.data(), lse.data());
    }
  }
  return std::vector<double>(loss.begin(), loss.end());
}

void core_grads(const ClassCase& k, const ClassData& d, const std::vector<double>& grad_out,
                std::vector<double>* grad_mu, std::vector<double>* grad_s) {
  const u::ClassProblem p = make_problem<double>(k, d.mu, d.log_var, d);
  std::vector<double> loss(k.B * k.H * k.W), lse(k.B * k.H * k.W);
  const int64_t chunks = ucpu::class_chunks(p);
  ucpu::class_forward<double>(p, 0, chunks, loss.data(), lse.data());
  grad_mu->assign(d.mu.size(), 0.0);
  grad_s->assign(d.mu.size(), 0.0);
  ucpu::class_backward<double>(p, grad_out.data(), lse.data(), 0, chunks, grad_mu->data(), grad_s->data());
}

std::string describe(const ClassCase& k) {
  char buffer[256];
  std::snprintf(buffer, sizeof(buffer), "[B=%lld C=%lld H=%lld W=%lld T=%lld boot=%d route=%d mask=%d pp=%d]",
                (long long)k.B, (long long)k.C, (long long)k.H, (long long)k.W, (long long)k.samples, k.bootstrap,
                k.route, k.with_mask, k.with_pp);
  return buffer;
}

void test_class_forward() {
  const ClassCase shapes[] = {
      {1, 1, 1, 1}, {2, 3, 1, 17}, {1, 4, 5, 3}, {2, 5, 3, 7}, {1, 21, 4, 9}, {3, 9, 2, 20},
  };
  uint32_t rng_seed = 1;
  for (ClassCase k : shapes) {
    for (int setting = 0; setting < 4; ++setting) {
      k.bootstrap = setting != 3;
      k.route = setting != 1;
      k.with_mask = setting != 2;
      k.with_pp = setting != 0;
      const ClassData d = make_data(k, rng_seed++);
      const std::vector<double> want = brute_force_loss(k, d);
      const std::vector<double> got = core_loss<double>(k, d);
      const std::vector<double> got_float = core_loss<float>(k, d);
      const std::vector<double> got_split = core_loss<double>(k, d, 1);
      // Both word types of the generator draw the same noise.
      ClassCase narrow = k, wide = k;
      narrow.words = 32;
      wide.words = 64;
      const std::vector<double> got_narrow = core_loss<float>(narrow, d);
      const std::vector<double> got_wide = core_loss<float>(wide, d);
      for (size_t i = 0; i < want.size(); ++i) {
        CHECK(std::fabs(got[i] - want[i]) <= 1e-11 * (1 + std::fabs(want[i])),
              describe(k) + " double pixel " + std::to_string(i) + ": " + std::to_string(got[i]) + " vs " +
                  std::to_string(want[i]));
        CHECK(std::fabs(got_float[i] - want[i]) <= 2e-5 * (1 + std::fabs(want[i])),
              describe(k) + " float pixel " + std::to_string(i));
        CHECK(got_split[i] == got[i], describe(k) + " chunk split changes pixel " + std::to_string(i));
        CHECK(std::fabs(got_narrow[i] - want[i]) <= 2e-5 * (1 + std::fabs(want[i])) &&
                  std::fabs(got_wide[i] - want[i]) <= 2e-5 * (1 + std::fabs(want[i])),
              describe(k) + " 32- and 64-bit generator words, pixel " + std::to_string(i));
      }
    }
  }
}

void test_class_backward() {
  ClassCase k{2, 5, 3, 7};
  uint32_t rng_seed = 100;
  for (int setting = 0; setting < 3; ++setting) {
    k.bootstrap = setting != 2;
    k.route = setting == 0;
    ClassData d = make_data(k, rng_seed++);
    std::mt19937 rng(rng_seed);
    std::uniform_real_distribution<double> unit(0.5, 1.5);
    std::vector<double> grad_out(k.B * k.H * k.W);
    for (double& g : grad_out) g = unit(rng);
    std::vector<double> grad_mu, grad_s;
    core_grads(k, d, grad_out, &grad_mu, &grad_s);
    const auto objective = [&](const ClassData& dd) {
      const std::vector<double> loss = core_loss<double>(k, dd);
      double total = 0;
      for (size_t i = 0; i < loss.size(); ++i) total += loss[i] * grad_out[i];
      return total;
    };
    const double h = 1e-6;
    // Routed gradients are by design not the loss's derivative: checked below.
    for (size_t i = 0; !k.route && i < d.mu.size(); ++i) {
      for (int which = 0; which < 2; ++which) {
        std::vector<double>& values = which == 0 ? d.mu : d.log_var;
        const double saved = values[i];
        values[i] = saved + h;
        const double up = objective(d);
        values[i] = saved - h;
        const double down = objective(d);
        values[i] = saved;
        const double fd = (up - down) / (2 * h);
        const double analytic = which == 0 ? grad_mu[i] : grad_s[i];
        CHECK(std::fabs(fd - analytic) <= 1e-6 * (1 + std::fabs(fd)),
              describe(k) + (which == 0 ? " d/dmu " : " d/dlog_var ") + std::to_string(i) + ": analytic " +
                  std::to_string(analytic) + " vs finite difference " + std::to_string(fd));
      }
    }
    if (k.route) {
      // grad_log_var is that of L_u alone; grad_mu that of CE(mu, y*) alone.
      ClassCase no_boot = k;
      no_boot.bootstrap = false;
      std::vector<double> gm_u, gs_u;
      core_grads(no_boot, d, grad_out, &gm_u, &gs_u);
      for (size_t i = 0; i < gs_u.size(); ++i) {
        CHECK(std::fabs(grad_s[i] - gs_u[i]) <= 1e-12 * (1 + std::fabs(gs_u[i])), describe(k) + " routed d/dlog_var");
      }
      const int64_t HW = k.H * k.W;
      for (int64_t b = 0; b < k.B; ++b) {
        for (int64_t i = 0; i < HW; ++i) {
          const int64_t pixel = b * HW + i;
          const int64_t y = d.target[pixel];
          double z = 0, max_var = -1e300;
          int64_t argmax = 0;
          for (int64_t c = 0; c < k.C; ++c) {
            z += std::exp(d.mu[(b * k.C + c) * HW + i]);
            max_var = std::max(max_var, std::exp(d.log_var[(b * k.C + c) * HW + i]));
            if (d.mu[(b * k.C + c) * HW + i] > d.mu[(b * k.C + argmax) * HW + i]) argmax = c;
          }
          const bool uncertain = (!k.with_mask || d.mask[pixel]) && (!k.with_pp || !d.pp[b]);
          const int64_t y_star = (uncertain && max_var > k.tau) ? argmax : y;
          for (int64_t c = 0; c < k.C; ++c) {
            const double want =
                y == 255 ? 0.0
                         : grad_out[pixel] * (std::exp(d.mu[(b * k.C + c) * HW + i]) / z - (c == y_star ? 1.0 : 0.0));
            CHECK(std::fabs(grad_mu[(b * k.C + c) * HW + i] - want) <= 1e-12, describe(k) + " routed d/dmu");
          }
        }
      }
    }
  }
}

void test_class_extremes() {
  for (double mu_value : {1e4, -1e4, 0.0}) {
    for (double lv_value : {-20.0, 20.0}) {
      ClassCase k{2, 21, 3, 5};
      k.samples = 20;
      ClassData d = make_data(k, 7);
      for (size_t i = 0; i < d.mu.size(); ++i) {
        d.mu[i] = (i % 3 == 0) ? -mu_value : mu_value;
        d.log_var[i] = lv_value;
      }
      std::vector<float> mu(d.mu.begin(), d.mu.end()), lv(d.log_var.begin(), d.log_var.end());
      for (int setting = 0; setting < 3; ++setting) {
        k.bootstrap = setting != 2;
        k.route = setting == 0;
        const u::ClassProblem p = make_problem<float>(k, mu, lv, d);
        std::vector<float> loss(k.B * k.H * k.W), lse(loss.size()), g(loss.size(), 1.0f), gm(mu.size()), gs(mu.size());
        const int64_t chunks = ucpu::class_chunks(p);
        ucpu::class_forward<float>(p, 0, chunks, loss.data(), lse.data());
        ucpu::class_backward<float>(p, g.data(), lse.data(), 0, chunks, gm.data(), gs.data());
        bool finite = true;
        for (float v : loss) finite = finite && std::isfinite(v);
        for (size_t i = 0; i < gm.size(); ++i) finite = finite && std::isfinite(gm[i]) && std::isfinite(gs[i]);
        CHECK(finite, "extreme inputs: mu " + std::to_string(mu_value) + ", log_var " + std::to_string(lv_value));
      }
    }
  }
}

// head_at over one lane reading the (batch, C, plane) arrays, as each CUDA
// thread calls it, and over kClassLanes lanes reading lane buffers, as the CPU
// core calls it: the same targets, status, arg-max, softmax statistics and
// cross-entropy, equal to the definition.
template <typename scalar>
void test_class_head_forms() {
  using acc = boxloss::acc_t<scalar>;
  constexpr int L = ucpu::kClassLanes;
  const ClassCase shapes[] = {{1, 1, 1, 1}, {2, 3, 5, 9}, {1, 21, 7, 11}, {3, 4, 1, 40}};
  uint32_t rng_seed = 200;
  for (ClassCase k : shapes) {
    for (int setting = 0; setting < 4; ++setting) {
      k.bootstrap = setting != 3;
      k.with_mask = setting != 2;
      k.with_pp = setting != 0;
      k.tau = setting == 1 ? 0.5 : 1.5;
      ClassData d = make_data(k, rng_seed++);
      if (setting == 1 && !d.target.empty()) d.target[0] = k.C;  // out of range: reported in the status
      std::vector<scalar> mu(d.mu.begin(), d.mu.end()), lv(d.log_var.begin(), d.log_var.end());
      const u::ClassProblem p = make_problem<scalar>(k, mu, lv, d);
      const int64_t HW = k.H * k.W;
      for (int64_t pixel0 = 0; pixel0 < p.num_pixels(); pixel0 += L) {
        // The CPU form: a chunk of lanes, lanes past the image end repeating its last pixel.
        const int64_t b = pixel0 / HW;
        const int64_t n = std::min<int64_t>(L, (b + 1) * HW - pixel0);
        std::vector<acc> mu_lanes(k.C * L), lv_lanes(k.C * L);
        for (int64_t c = 0; c < k.C; ++c) {
          for (int j = 0; j < L; ++j) {
            const int64_t i = p.class_offset(pixel0 + std::min<int64_t>(j, n - 1)) + c * HW;
            mu_lanes[c * L + j] = static_cast<acc>(mu[i]);
            lv_lanes[c * L + j] = static_cast<acc>(lv[i]);
          }
        }
        u::ClassHead<acc, L> lanes;
        bool any_lanes = false;
        const int32_t status_lanes = p.head_at<L>(pixel0, n, mu_lanes.data(), lv_lanes.data(), L, &lanes, &any_lanes);
        bool any_pixels = false;
        int32_t status_pixels = 0;
        for (int64_t j = 0; j < n; ++j) {
          const int64_t pixel = pixel0 + j;
          // The CUDA form: one lane, class c at c * plane in the input arrays.
          const int64_t offset = p.class_offset(pixel);
          u::ClassHead<acc, 1> one;
          bool uncertain = false;
          status_pixels |= p.head_at<1>(pixel, 1, mu.data() + offset, lv.data() + offset, HW, &one, &uncertain);
          any_pixels = any_pixels || uncertain;
          const std::string where = describe(k) + " pixel " + std::to_string(pixel);
          CHECK(one.y[0] == lanes.y[j] && one.ce_target[0] == lanes.ce_target[j] && one.valid[0] == lanes.valid[j] &&
                    one.uncertain[0] == lanes.uncertain[j] && one.mu_max[0] == lanes.mu_max[j] &&
                    one.mu_sum[0] == lanes.mu_sum[j] && one.ce[0] == lanes.ce[j],
                where + ": one lane and kClassLanes lanes differ");
          // The definition.
          const int64_t t = d.target[pixel];
          const bool valid = t != 255;
          const bool uncertain_want = valid && (!k.with_mask || d.mask[pixel]) && (!k.with_pp || !d.pp[b]);
          double z = 0, max_s = -1e300, mu_max = -1e300;
          int64_t argmax = 0;
          for (int64_t c = 0; c < k.C; ++c) {
            const double m = static_cast<double>(mu[offset + c * HW]);
            max_s = std::max(max_s, static_cast<double>(lv[offset + c * HW]));
            if (m > mu_max) mu_max = m, argmax = c;
          }
          for (int64_t c = 0; c < k.C; ++c) z += std::exp(static_cast<double>(mu[offset + c * HW]) - mu_max);
          const int64_t y = (t >= 0 && t < k.C) ? t : 0;
          const int64_t y_star = (k.bootstrap && uncertain_want && max_s > std::log(k.tau)) ? argmax : y;
          const double ce = mu_max + std::log(z) - static_cast<double>(mu[offset + y_star * HW]);
          const double tol = sizeof(acc) == 4 ? 2e-6 : 1e-13;
          CHECK(uncertain == uncertain_want && one.y[0] == y && one.ce_target[0] == y_star &&
                    (one.valid[0] != acc(0)) == valid,
                where + ": targets and Eq. 16");
          CHECK(std::fabs(static_cast<double>(one.ce[0]) - ce) <= tol * (1 + std::fabs(ce)),
                where + ": CE " + std::to_string(static_cast<double>(one.ce[0])) + " vs " + std::to_string(ce));
        }
        CHECK(status_lanes == status_pixels && any_lanes == any_pixels, describe(k) + ": status and any_uncertain");
        CHECK(status_lanes == ((setting == 1 && pixel0 == 0) ? u::kTargetOutOfRange : 0),
              describe(k) + ": a target outside [0, C) is reported");
      }
    }
  }
}

// Eq. 8-11 with sigma^2 = e^s, as the paper writes them.
double binary_reference(double mu, double s, double y, bool uncertain, bool bootstrap, double tau, double temperature) {
  const auto bce = [](double x, double t) {
    const double p = 1 / (1 + std::exp(-x));
    return -(t * std::log(p) + (1 - t) * std::log(1 - p));
  };
  if (!uncertain) return bce(mu, y);
  const double var = std::exp(s);
  double loss = bce(mu / std::sqrt(1 + M_PI * var / 8), y);
  if (bootstrap) {
    const double w = 1 / (1 + std::exp(-(tau - var) / temperature));
    loss += w * bce(mu, y) + (1 - w) * bce(mu, 1 - y);
  }
  return loss;
}

void test_binary() {
  std::mt19937 rng(5);
  std::normal_distribution<double> normal;
  const int64_t B = 2, plane = 37;
  std::vector<double> mu(B * plane), s(B * plane), y(B * plane);
  std::vector<uint8_t> mask(B * plane), pp = {0, 1};
  for (int64_t i = 0; i < B * plane; ++i) {
    mu[i] = 2 * normal(rng);
    s[i] = 1.5 * normal(rng) + 0.5;
    y[i] = (rng() % 3) / 2.0;
    mask[i] = rng() % 4 != 0;
  }
  for (int setting = 0; setting < 3; ++setting) {
    u::BinaryProblem p;
    p.mu = mu.data();
    p.log_var = s.data();
    p.target = y.data();
    p.box_mask = mask.data();
    p.pixel_perfect = pp.data();
    p.batch = B;
    p.plane = plane;
    p.tau = 2.0;
    p.temperature = 0.3;
    p.bootstrap = setting != 2;
    p.route_gradients = setting == 0;
    std::vector<double> loss(B * plane), gm(B * plane), gs(B * plane), ones(B * plane, 1.0);
    const int32_t status = ucpu::binary_forward<double>(p, 0, B * plane, loss.data());
    CHECK(status == 0, "binary: valid targets report no status");
    ucpu::binary_backward<double>(p, ones.data(), 0, B * plane, gm.data(), gs.data());
    for (int64_t i = 0; i < B * plane; ++i) {
      const bool uncertain = mask[i] && !pp[i / plane];
      const auto f = [&](double m, double v) { return binary_reference(m, v, y[i], uncertain, p.bootstrap, 2.0, 0.3); };
      CHECK(std::fabs(loss[i] - f(mu[i], s[i])) <= 1e-11 * (1 + std::fabs(loss[i])),
            "binary loss " + std::to_string(i));
      if (!p.route_gradients || !p.bootstrap) {
        const double h = 1e-6;
        const double fd_mu = (f(mu[i] + h, s[i]) - f(mu[i] - h, s[i])) / (2 * h);
        const double fd_s = (f(mu[i], s[i] + h) - f(mu[i], s[i] - h)) / (2 * h);
        CHECK(std::fabs(gm[i] - fd_mu) <= 1e-6 * (1 + std::fabs(fd_mu)), "binary d/dmu " + std::to_string(i));
        CHECK(std::fabs(gs[i] - fd_s) <= 1e-6 * (1 + std::fabs(fd_s)), "binary d/dlog_var " + std::to_string(i));
      }
    }
  }
  y[3] = 1.5;
  u::BinaryProblem p;
  p.mu = mu.data();
  p.log_var = s.data();
  p.target = y.data();
  p.batch = B;
  p.plane = plane;
  std::vector<double> loss(B * plane);
  CHECK(ucpu::binary_forward<double>(p, 0, B * plane, loss.data()) == u::kTargetNotProbability,
        "binary: a target outside [0, 1] is reported");
}

}  // namespace

int main() {
  test_class_forward();
  test_class_backward();
  test_class_extremes();
  test_class_head_forms<double>();
  test_class_head_forms<float>();
  test_binary();
  std::printf("%lld checks, %lld failures\n", static_cast<long long>(g_checks), static_cast<long long>(g_failures));
  return g_failures == 0 ? 0 : 1;
}
