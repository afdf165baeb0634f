// Torch-free tests of the box convention and the CPU row/column-max core:
// closed-form pixel spans against enumeration, and maxima, arg-max indices
// (lowest index among ties) and the scatter backward against brute force.
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "boxloss/row_col_max/cpu.h"
#include "test_support.h"

using boxloss::boxes::covered_span;
using boxloss::boxes::PixelSpan;

namespace {

// The rule, stated pixel by pixel: j is covered when its centre lies in the
// clipped [lo, hi); a box of positive extent without a centre takes the pixel
// of its midpoint.
PixelSpan enumerate_span(double lo, double hi, double scale, int64_t size) {
  double a = std::min(std::max(lo * scale, 0.0), double(size));
  double b = std::min(std::max(hi * scale, 0.0), double(size));
  if (!(b > a)) return {0, 0};
  int64_t first = -1, last = -1;
  for (int64_t j = 0; j < size; ++j) {
    if (a <= j + 0.5 && j + 0.5 < b) {
      if (first < 0) first = j;
      last = j;
    }
  }
  if (first >= 0) return {first, last + 1};
  int64_t mid = std::min<int64_t>(int64_t(std::floor(0.5 * (a + b))), size - 1);
  return {mid, mid + 1};
}

void test_spans() {
  std::mt19937 rng(1);
  std::uniform_real_distribution<double> coord(-10.0, 70.0);
  const double scales[] = {1.0, 0.5, 0.125, 2.0, 0.3};
  for (int i = 0; i < 20000; ++i) {
    double lo = coord(rng), hi = coord(rng);
    if (i % 7 == 0) lo = std::round(lo);
    if (i % 5 == 0) hi = std::round(hi);
    if (hi < lo) std::swap(lo, hi);
    const double scale = scales[i % 5];
    const int64_t size = 1 + i % 40;
    const PixelSpan got = covered_span(lo, hi, scale, size);
    const PixelSpan want = enumerate_span(lo, hi, scale, size);
    CHECK(got.begin == want.begin && got.end == want.end, "lo " + std::to_string(lo) + " hi " + std::to_string(hi) +
                                                              " scale " + std::to_string(scale) + " size " +
                                                              std::to_string(size));
  }
  const double inf = std::numeric_limits<double>::infinity();
  CHECK(covered_span(0, inf, 1.0, 9).end == 9, "inf clips to the map");
  CHECK(covered_span(-inf, 0, 1.0, 9).empty(), "a box left of the map is empty");
  CHECK(covered_span(3, 3, 1.0, 9).empty(), "a zero-width box is empty");
  const double nan = std::numeric_limits<double>::quiet_NaN();
  CHECK(boxloss::boxes::box_status(nan, 0, 1, 1, 0, 0, 1, 1) == boxloss::boxes::kBoxNaN, "NaN status");
  CHECK(boxloss::boxes::box_status(2, 0, 1, 1, 0, 0, 1, 1) == boxloss::boxes::kBoxInverted, "inverted status");
  CHECK(boxloss::boxes::box_status(0, 0, 1, 1, 1, 3, 1, 3) ==
            (boxloss::boxes::kBoxBatchOutOfRange | boxloss::boxes::kBoxLabelOutOfRange),
        "index status");
}

void test_forward_backward(int64_t B, int64_t C, int64_t H, int64_t W, int64_t K, int levels, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::vector<float> probs(static_cast<size_t>(B * C * H * W));
  for (auto& v : probs) v = levels > 0 ? float(std::round(u(rng) * (levels - 1)) / (levels - 1)) : float(u(rng));
  std::vector<double> boxes(static_cast<size_t>(4 * K));
  std::vector<int64_t> batch(static_cast<size_t>(K)), labels(static_cast<size_t>(K)),
      ranges(static_cast<size_t>(4 * K));
  std::vector<int32_t> status(static_cast<size_t>(K));
  for (int64_t k = 0; k < K; ++k) {
    double x0 = u(rng) * (W + 4) - 2, x1 = u(rng) * (W + 4) - 2, y0 = u(rng) * (H + 4) - 2, y1 = u(rng) * (H + 4) - 2;
    boxes[4 * k] = std::min(x0, x1);
    boxes[4 * k + 1] = std::min(y0, y1);
    boxes[4 * k + 2] = std::max(x0, x1);
    boxes[4 * k + 3] = std::max(y0, y1);
    batch[k] = int64_t(u(rng) * B);
    labels[k] = int64_t(u(rng) * C);
  }
  boxloss::row_col_max::cpu::resolve_boxes(boxes.data(), batch.data(), labels.data(), 0, K, 1.0, B, C, H, W,
                                           ranges.data(), status.data());
  boxloss::row_col_max::Problem p;
  p.probs = probs.data();
  p.ranges = ranges.data();
  p.box_batch = batch.data();
  p.box_labels = labels.data();
  p.batch = B;
  p.num_channels = C;
  p.height = H;
  p.width = W;
  p.num_boxes = K;
  std::vector<float> row_max(static_cast<size_t>(K * H)), col_max(static_cast<size_t>(K * W));
  std::vector<int64_t> row_index(static_cast<size_t>(K * H)), col_index(static_cast<size_t>(K * W));
  boxloss::row_col_max::Outputs<float> out;
  out.row_max = row_max.data();
  out.row_index = row_index.data();
  out.col_max = col_max.data();
  out.col_index = col_index.data();
  out.status = status.data();
  boxloss::row_col_max::cpu::forward_boxes<float>(p, 0, K, out);

  std::vector<float> grad(probs.size(), 7.0f), want_grad(probs.size(), 0.0f);
  std::vector<float> g_row(row_max.size()), g_col(col_max.size());
  for (auto& v : g_row) v = float(u(rng));
  for (auto& v : g_col) v = float(u(rng));
  for (int64_t k = 0; k < K; ++k) {
    const int64_t r0 = ranges[4 * k], r1 = ranges[4 * k + 1], c0 = ranges[4 * k + 2], c1 = ranges[4 * k + 3];
    const int64_t base = (batch[k] * C + labels[k]) * H * W;
    const std::string ctx = "box " + std::to_string(k) + " seed " + std::to_string(seed);
    CHECK(status[k] == 0, ctx);
    for (int64_t r = 0; r < H; ++r) {
      int64_t best = -1;
      for (int64_t c = c0; c < c1 && r >= r0 && r < r1; ++c) {
        if (best < 0 || probs[base + r * W + c] > probs[best]) best = base + r * W + c;
      }
      CHECK(row_index[k * H + r] == best, ctx + " row " + std::to_string(r));
      CHECK(row_max[k * H + r] == (best < 0 ? 0.0f : probs[best]), ctx + " row value");
      if (best >= 0) want_grad[best] += g_row[k * H + r];
    }
    for (int64_t c = 0; c < W; ++c) {
      int64_t best = -1;
      for (int64_t r = r0; r < r1 && c >= c0 && c < c1; ++r) {
        if (best < 0 || probs[base + r * W + c] > probs[best]) best = base + r * W + c;
      }
      CHECK(col_index[k * W + c] == best, ctx + " col " + std::to_string(c));
      CHECK(col_max[k * W + c] == (best < 0 ? 0.0f : probs[best]), ctx + " col value");
      if (best >= 0) want_grad[best] += g_col[k * W + c];
    }
  }
  boxloss::row_col_max::cpu::backward_boxes<float>(K, B * C, H, W, g_row.data(), g_col.data(), row_index.data(),
                                                   col_index.data(), grad.data());
  for (size_t i = 0; i < grad.size(); ++i) CHECK(grad[i] == want_grad[i], "grad at " + std::to_string(i));
}

}  // namespace

int main() {
  test_spans();
  test_forward_backward(1, 1, 1, 1, 3, 0, 1);
  test_forward_backward(2, 3, 17, 23, 20, 0, 2);
  test_forward_backward(2, 3, 17, 23, 20, 2, 3);  // many ties
  test_forward_backward(3, 5, 40, 67, 50, 4, 4);
  test_forward_backward(1, 2, 1, 130, 8, 0, 5);
  std::printf("%lld checks, %lld failures\n", static_cast<long long>(g_checks), static_cast<long long>(g_failures));
  return g_failures == 0 ? 0 : 1;
}
