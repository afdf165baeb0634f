// Torch-free checks of the background-attention core: the grid cells and
// pooling bins against their definitions, the per-pixel backward against
// central finite differences, and pooling (forward and backward) against a
// direct loop.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "boxloss/background_attention/cpu.h"

namespace ba = boxloss::background_attention;

static long long g_checks = 0, g_failures = 0;

static void check(bool ok, const char* what, long long a = 0, long long b = 0) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::printf("FAIL: %s (%lld, %lld)\n", what, a, b);
  }
}

static void test_grid_cells() {
  for (int64_t size = 1; size <= 40; ++size) {
    for (int64_t n = 1; n <= 9; ++n) {
      for (int64_t y = 0; y < size; ++y) {
        const int64_t j = ba::grid_cell(y, size, n);
        const bool inside = (j * size) / n <= y && y < ((j + 1) * size) / n;
        check(j >= 0 && j < n && inside, "grid_cell", size, y);
      }
    }
  }
}

static void test_bins() {
  for (int64_t length = 1; length <= 30; ++length) {
    for (int64_t n = 1; n <= 7; ++n) {
      std::vector<int> covered(length, 0);
      for (int64_t i = 0; i < n; ++i) {
        const ba::Bin b = ba::bin_of(5, length, i, n);
        check(b.end > b.begin && b.begin >= 5 && b.end <= 5 + length, "bin holds a pixel", length, i);
        for (int64_t y = b.begin; y < b.end; ++y) covered[y - 5] = 1;
      }
      for (int64_t y = 0; y < length; ++y) check(covered[y] == 1, "bins cover the span", length, y);
    }
  }
}

static double attention_of(const std::vector<double>& f, const std::vector<double>& q_hat, int64_t D, int64_t J,
                           const uint8_t* valid, int64_t num_valid) {
  std::vector<double> dots(J);
  double norm = 0;
  for (int64_t d = 0; d < D; ++d) norm += f[d] * f[d];
  norm = std::sqrt(norm);
  for (int64_t j = 0; j < J; ++j) {
    dots[j] = 0;
    for (int64_t d = 0; d < D; ++d) dots[j] += q_hat[j * D + d] * f[d];
  }
  return ba::pixel_attention<double, double>(dots.data(), 1, valid, J, num_valid, norm, true, false);
}

static void test_pixel_backward() {
  std::mt19937 rng(3);
  std::normal_distribution<double> normal(0.3, 1.0);
  const int64_t D = 6, J = 5;
  const uint8_t valid[J] = {1, 1, 0, 1, 1};
  for (int trial = 0; trial < 50; ++trial) {
    std::vector<double> f(D), q_hat(J * D);
    for (auto& v : f) v = normal(rng);
    for (int64_t j = 0; j < J; ++j) {
      double n = 0;
      for (int64_t d = 0; d < D; ++d) n += (q_hat[j * D + d] = normal(rng)) * q_hat[j * D + d];
      for (int64_t d = 0; d < D; ++d) q_hat[j * D + d] /= std::sqrt(n);
    }
    double norm = 0;
    for (double v : f) norm += v * v;
    norm = std::sqrt(norm);
    std::vector<double> g(J);
    for (int64_t j = 0; j < J; ++j) {
      g[j] = 0;
      for (int64_t d = 0; d < D; ++d) g[j] += q_hat[j * D + d] * f[d];
    }
    const double coef = ba::pixel_attention_backward<double, double>(g.data(), 1, valid, J, 4, norm, true, false, 1.0);
    for (int64_t d = 0; d < D; ++d) {
      double analytic = coef * f[d];
      for (int64_t j = 0; j < J; ++j) analytic += g[j] * q_hat[j * D + d];
      std::vector<double> fp = f, fm = f;
      fp[d] += 1e-6;
      fm[d] -= 1e-6;
      const double numeric = (attention_of(fp, q_hat, D, J, valid, 4) - attention_of(fm, q_hat, D, J, valid, 4)) / 2e-6;
      check(std::fabs(numeric - analytic) < 1e-6, "pixel_attention_backward vs finite differences", trial, d);
    }
  }
}

static void test_pool() {
  const int64_t B = 2, D = 3, H = 7, W = 6, K = 3, S = 2;
  std::mt19937 rng(5);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  std::vector<double> f(B * D * H * W), a(B * H * W);
  for (auto& v : f) v = uniform(rng) - 0.5;
  for (auto& v : a) v = uniform(rng);
  const int64_t ranges[K * 4] = {1, 6, 0, 5, 0, 7, 2, 3, 2, 4, 1, 6};
  const int64_t box_batch[K] = {0, 1, 0};
  ba::PoolProblem<double> p;
  p.features = f.data();
  p.attention = a.data();
  p.ranges = ranges;
  p.box_batch = box_batch;
  p.batch = B;
  p.channels = D;
  p.height = H;
  p.width = W;
  p.num_boxes = K;
  p.output_size = S;
  std::vector<double> pooled(K * D * S * S), ws(K * S * S);
  ba::cpu::pool_forward<double>(p, 0, K * S * S, pooled.data(), ws.data());
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t bin = 0; bin < S * S; ++bin) {
      ba::Bin rows, cols;
      p.bin_pixels(k, bin, &rows, &cols);
      for (int64_t d = 0; d < D; ++d) {
        double num = 0, den = 0;
        for (int64_t y = rows.begin; y < rows.end; ++y) {
          for (int64_t x = cols.begin; x < cols.end; ++x) {
            const double w = 1 - a[(box_batch[k] * H + y) * W + x];
            num += w * f[((box_batch[k] * D + d) * H + y) * W + x];
            den += w;
          }
        }
        check(std::fabs(pooled[(k * D + d) * S * S + bin] - num / den) < 1e-12, "pool_forward", k, d);
      }
    }
  }
  // Backward of sum(pooled * grad) against finite differences in the features and the attention.
  std::vector<double> grad(K * D * S * S);
  for (auto& v : grad) v = uniform(rng);
  const ba::cpu::ImagePlan plan = ba::cpu::plan_by_image(box_batch, K, B);
  std::vector<double> gf(f.size()), ga(a.size());
  ba::cpu::pool_backward<double>(p, plan, grad.data(), pooled.data(), ws.data(), 0, B, gf.data(), ga.data());
  auto objective = [&]() {
    std::vector<double> out(K * D * S * S), w2(K * S * S);
    ba::cpu::pool_forward<double>(p, 0, K * S * S, out.data(), w2.data());
    double s = 0;
    for (size_t i = 0; i < out.size(); ++i) s += out[i] * grad[i];
    return s;
  };
  for (size_t i = 0; i < f.size(); i += 7) {
    const double keep = f[i];
    f[i] = keep + 1e-6;
    const double up = objective();
    f[i] = keep - 1e-6;
    const double down = objective();
    f[i] = keep;
    check(std::fabs((up - down) / 2e-6 - gf[i]) < 1e-6, "pool_backward features", static_cast<long long>(i));
  }
  for (size_t i = 0; i < a.size(); i += 3) {
    const double keep = a[i];
    a[i] = keep + 1e-6;
    const double up = objective();
    a[i] = keep - 1e-6;
    const double down = objective();
    a[i] = keep;
    check(std::fabs((up - down) / 2e-6 - ga[i]) < 1e-6, "pool_backward attention", static_cast<long long>(i));
  }
}

int main() {
  test_grid_cells();
  test_bins();
  test_pixel_backward();
  test_pool();
  std::printf("%lld checks, %lld failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
