// Unit tests of the torch-free Sparse-CRF CPU core (csrc/kernels/sparse_crf),
// built by CMakeLists.txt without Python or torch:
//
//   cmake -S . -B build-cmake -G Ninja && cmake --build build-cmake && (cd build-cmake && ctest)
//
// The kernels are compared with a brute-force reference written here from the
// definition of the loss (math.h), independent of the kernel's offset tables
// and row ranges:
//
//   S_b = sum_p sum_{q = p + o, o in O} valid_p valid_q exp(-||I_p - I_q||^2 / (2 sigma^2))
//                                       * sum_{c in S} phi(x_p^c, x_q^c)
//   O   = {(0,d), (d,0)} for neighbourhood 4, plus {(d,d), (d,-d)} for 8.
//
// No test framework: CHECK counts failures and main returns nonzero if any.
#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "boxloss/common/host_device.h"
#include "boxloss/sparse_crf/cpu.h"
#include "boxloss/sparse_crf/math.h"
#include "boxloss/sparse_crf/problem.h"
#include "test_support.h"

namespace {

using boxloss::acc_t;
using boxloss::sparse_crf::Kind;
using boxloss::sparse_crf::Problem;
namespace cpu = boxloss::sparse_crf::cpu;
namespace sc = boxloss::sparse_crf;

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  char buffer[1024];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buffer, sizeof(buffer), fmt, args);
  va_end(args);
  return buffer;
}

// ---------------------------------------------------------------------------
// Test problems

struct Config {
  int64_t batch = 1;
  int64_t num_channels = 1;
  int64_t height = 1;
  int64_t width = 1;
  int64_t image_channels = 3;
  int32_t neighbourhood = 8;
  int32_t dilation = 1;
  bool with_mask = false;
  std::vector<int32_t> channels;  // empty: all channels
  Kind kind = Kind::L1;
  double sigma = 0.15;
  bool quantised = false;  // probs in {0, .25, .5, .75, 1}: exact ties and the ends of [0, 1]
  uint64_t seed = 0;
};

std::string describe(const Config& c, const char* dtype) {
  std::string channels = "all";
  if (!c.channels.empty()) {
    channels = "{";
    for (size_t i = 0; i < c.channels.size(); ++i) {
      channels += (i ? "," : "") + std::to_string(c.channels[i]);
    }
    channels += "}";
  }
  return format(
      "[%s B=%lld C=%lld H=%lld W=%lld K=%lld nb=%d dil=%d mask=%d channels=%s kind=%s "
      "sigma=%g quantised=%d seed=%llu]",
      dtype, static_cast<long long>(c.batch), static_cast<long long>(c.num_channels), static_cast<long long>(c.height),
      static_cast<long long>(c.width), static_cast<long long>(c.image_channels), c.neighbourhood, c.dilation,
      c.with_mask ? 1 : 0, channels.c_str(), c.kind == Kind::L1 ? "L1" : "Potts", c.sigma, c.quantised ? 1 : 0,
      static_cast<unsigned long long>(c.seed));
}

template <typename T>
struct Data {
  Config config;
  std::vector<T> probs;         // (B, C, H, W)
  std::vector<T> image;         // (B, K, H, W)
  std::vector<uint8_t> valid;   // (B, H, W) or empty
  std::vector<acc_t<T>> scale;  // (B,) image_scale of the backward

  Problem problem() const {
    return make_problem(config, probs.data(), image.data(), valid.empty() ? nullptr : valid.data(),
                        config.channels.data());
  }
  int64_t plane() const { return config.height * config.width; }
  int64_t rows() const { return config.batch * config.height; }
  std::vector<int64_t> selected() const {
    std::vector<int64_t> s;
    if (config.channels.empty()) {
      for (int64_t c = 0; c < config.num_channels; ++c) s.push_back(c);
    } else {
      for (int32_t c : config.channels) s.push_back(c);
    }
    return s;
  }
  bool is_selected(int64_t c) const {
    const std::vector<int64_t> s = selected();
    return std::find(s.begin(), s.end(), c) != s.end();
  }
};

// Probabilities are distinct within the whole tensor (a shuffled grid with
// spacing >= 1e-3), so no neighbour pair is within the finite-difference step
// of a tie of |a - b|; the quantised variant makes ties on purpose.
template <typename T>
Data<T> make_data(const Config& config) {
  Data<T> d;
  d.config = config;
  std::mt19937_64 rng(config.seed);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  const int64_t plane = config.height * config.width;
  const int64_t n_probs = config.batch * config.num_channels * plane;
  std::vector<double> values(static_cast<size_t>(n_probs));
  for (int64_t i = 0; i < n_probs; ++i) {
    if (config.quantised) {
      values[i] = 0.25 * static_cast<double>(rng() % 5);
    } else {
      values[i] = 0.02 + 0.96 * (static_cast<double>(i) + 0.5) / static_cast<double>(n_probs);
    }
  }
  std::shuffle(values.begin(), values.end(), rng);
  d.probs.resize(values.size());
  for (size_t i = 0; i < values.size(); ++i) d.probs[i] = static_cast<T>(values[i]);
  d.image.resize(static_cast<size_t>(config.batch * config.image_channels * plane));
  for (auto& v : d.image) v = static_cast<T>(unit(rng));
  if (config.with_mask) {
    d.valid.resize(static_cast<size_t>(config.batch * plane));
    for (auto& v : d.valid) v = unit(rng) < 0.75 ? 1 : 0;
  }
  for (int64_t b = 0; b < config.batch; ++b) {
    const double magnitude = 0.5 + 1.5 * unit(rng);
    d.scale.push_back(static_cast<acc_t<T>>(rng() % 2 ? magnitude : -magnitude));
  }
  return d;
}

// ---------------------------------------------------------------------------
// Brute-force reference, in double (long double sums) on the values the
// kernel reads.

struct Neighbour {
  int64_t dy, dx;
};

// The unordered pairs: q = p + o for o in the forward set.
std::vector<Neighbour> forward_offsets(int32_t neighbourhood, int32_t d) {
  std::vector<Neighbour> o = {{0, d}, {d, 0}};
  if (neighbourhood == 8) {
    o.push_back({d, d});
    o.push_back({d, -d});
  }
  return o;
}

// Every neighbour of p: the forward offsets and their negations.
std::vector<Neighbour> all_offsets(int32_t neighbourhood, int32_t d) {
  std::vector<Neighbour> o = forward_offsets(neighbourhood, d);
  const size_t half = o.size();
  for (size_t i = 0; i < half; ++i) o.push_back({-o[i].dy, -o[i].dx});
  return o;
}

double phi(Kind kind, double a, double b) { return kind == Kind::L1 ? std::fabs(a - b) : a + b - 2.0 * a * b; }

double dphi_da(Kind kind, double a, double b) {
  if (kind == Kind::L1) return a > b ? 1.0 : (a < b ? -1.0 : 0.0);
  return 1.0 - 2.0 * b;
}

template <typename T>
double naive_weight(const Data<T>& d, int64_t b, int64_t p, int64_t q) {
  const Config& c = d.config;
  const int64_t plane = d.plane();
  if (!d.valid.empty() && !(d.valid[b * plane + p] && d.valid[b * plane + q])) return 0.0;
  double squared = 0.0;
  for (int64_t k = 0; k < c.image_channels; ++k) {
    const double ip = static_cast<double>(d.image[(b * c.image_channels + k) * plane + p]);
    const double iq = static_cast<double>(d.image[(b * c.image_channels + k) * plane + q]);
    squared += (ip - iq) * (ip - iq);
  }
  return std::exp(-squared / (2.0 * c.sigma * c.sigma));
}

// S_b of image b, summed in long double so that central differences of it
// keep about 1e-11 absolute accuracy.
template <typename T>
long double naive_forward_image(const Data<T>& d, int64_t b) {
  const Config& c = d.config;
  const int64_t plane = d.plane();
  const std::vector<int64_t> selected = d.selected();
  long double sum = 0.0L;
  for (int64_t y = 0; y < c.height; ++y) {
    for (int64_t x = 0; x < c.width; ++x) {
      for (const Neighbour& o : forward_offsets(c.neighbourhood, c.dilation)) {
        const int64_t y2 = y + o.dy;
        const int64_t x2 = x + o.dx;
        if (y2 < 0 || y2 >= c.height || x2 < 0 || x2 >= c.width) continue;
        const int64_t p = y * c.width + x;
        const int64_t q = y2 * c.width + x2;
        const double w = naive_weight(d, b, p, q);
        long double term = 0.0L;
        for (int64_t ch : selected) {
          const T* probs = d.probs.data() + (b * c.num_channels + ch) * plane;
          term += phi(c.kind, static_cast<double>(probs[p]), static_cast<double>(probs[q]));
        }
        sum += static_cast<long double>(w) * term;
      }
    }
  }
  return sum;
}

// grad[b, c, p] = scale_b * sum_{q ~ p} w_pq dphi(x_p, x_q)/dx_p, and the
// magnitude |scale_b| * sum |w_pq dphi/dx_p| that bounds its rounding error.
template <typename T>
void naive_gradient(const Data<T>& d, std::vector<double>* grad, std::vector<double>* magnitude) {
  const Config& c = d.config;
  const int64_t plane = d.plane();
  grad->assign(d.probs.size(), 0.0);
  magnitude->assign(d.probs.size(), 0.0);
  for (int64_t b = 0; b < c.batch; ++b) {
    const double scale = static_cast<double>(d.scale[b]);
    for (int64_t ch : d.selected()) {
      const T* probs = d.probs.data() + (b * c.num_channels + ch) * plane;
      for (int64_t y = 0; y < c.height; ++y) {
        for (int64_t x = 0; x < c.width; ++x) {
          const int64_t p = y * c.width + x;
          long double g = 0.0L, m = 0.0L;
          for (const Neighbour& o : all_offsets(c.neighbourhood, c.dilation)) {
            const int64_t y2 = y + o.dy;
            const int64_t x2 = x + o.dx;
            if (y2 < 0 || y2 >= c.height || x2 < 0 || x2 >= c.width) continue;
            const int64_t q = y2 * c.width + x2;
            const double t = naive_weight(d, b, p, q) *
                             dphi_da(c.kind, static_cast<double>(probs[p]), static_cast<double>(probs[q]));
            g += t;
            m += std::fabs(t);
          }
          const size_t index = static_cast<size_t>((b * c.num_channels + ch) * plane + p);
          (*grad)[index] = scale * static_cast<double>(g);
          (*magnitude)[index] = std::fabs(scale) * static_cast<double>(m);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Kernel drivers

template <typename T>
void run_forward(const Data<T>& d, const std::vector<int64_t>& bounds, std::vector<double>* row_sums,
                 std::vector<int32_t>* row_status) {
  const Problem problem = d.problem();
  row_sums->assign(static_cast<size_t>(d.rows()), std::nan(""));
  row_status->assign(static_cast<size_t>(d.rows()), -1);
  for (size_t i = 0; i + 1 < bounds.size(); ++i) {
    cpu::forward_rows<T>(problem, bounds[i], bounds[i + 1], row_sums->data(), row_status->data());
  }
}

template <typename T>
void run_backward(const Data<T>& d, const std::vector<int64_t>& bounds, std::vector<T>* grad) {
  const Problem problem = d.problem();
  grad->assign(d.probs.size(), static_cast<T>(12345));
  for (size_t i = 0; i + 1 < bounds.size(); ++i) {
    cpu::backward_rows<T>(problem, d.scale.data(), bounds[i], bounds[i + 1], grad->data());
  }
}

// Row partitions of [0, rows): one call, one call per row, and a few uneven chunks.
std::vector<std::vector<int64_t>> partitions(int64_t rows, std::mt19937_64& rng) {
  std::vector<std::vector<int64_t>> out;
  out.push_back({0, rows});
  std::vector<int64_t> each;
  for (int64_t r = 0; r <= rows; ++r) each.push_back(r);
  out.push_back(each);
  std::vector<int64_t> cuts = {0, rows};
  const int n_cuts = static_cast<int>(rng() % 4);
  for (int i = 0; i < n_cuts && rows > 1; ++i) cuts.push_back(1 + static_cast<int64_t>(rng() % (rows - 1)));
  std::sort(cuts.begin(), cuts.end());
  out.push_back(cuts);  // repeated cuts give empty chunks, which must be harmless
  return out;
}

template <typename T>
struct Tolerance;
template <>
struct Tolerance<double> {
  static constexpr const char* name = "double";
  static constexpr double rel = 1e-12;
  static constexpr double abs = 1e-13;
};
template <>
struct Tolerance<float> {
  static constexpr const char* name = "float";
  static constexpr double rel = 1e-5;
  static constexpr double abs = 1e-6;
};

// Worst error of each comparison as a fraction of its tolerance (pass: <= 1).
struct Stats {
  double forward = 0.0;
  double backward = 0.0;
  double fd = 0.0;  // double only
};
Stats g_stats[2];  // [0] float, [1] double

// ---------------------------------------------------------------------------
// Tests

template <typename T>
void test_forward(const Data<T>& d, std::mt19937_64& rng) {
  using Tol = Tolerance<T>;
  Stats& stats = g_stats[std::is_same<T, double>::value ? 1 : 0];
  const std::string what = describe(d.config, Tol::name);
  const std::vector<std::vector<int64_t>> parts = partitions(d.rows(), rng);
  std::vector<double> sums_ref;
  std::vector<int32_t> status_ref;
  run_forward(d, parts[0], &sums_ref, &status_ref);

  for (int64_t r = 0; r < d.rows(); ++r) {
    CHECK(status_ref[r] == 0,
          what + format(" clean input, row %lld status %d", static_cast<long long>(r), status_ref[r]));
  }
  for (int64_t b = 0; b < d.config.batch; ++b) {
    double kernel = 0.0;
    for (int64_t y = 0; y < d.config.height; ++y) kernel += sums_ref[b * d.config.height + y];
    const double naive = static_cast<double>(naive_forward_image(d, b));
    const double err = std::fabs(kernel - naive);
    const double tol = Tol::rel * std::fabs(naive) + Tol::abs;
    stats.forward = std::max(stats.forward, err / tol);
    CHECK(err <= tol,
          what + format(" forward image %lld: kernel %.17g naive %.17g", static_cast<long long>(b), kernel, naive));
  }
  // Chunking must not change a single bit.
  for (size_t i = 1; i < parts.size(); ++i) {
    std::vector<double> sums;
    std::vector<int32_t> status;
    run_forward(d, parts[i], &sums, &status);
    const bool same =
        std::memcmp(sums.data(), sums_ref.data(), sums.size() * sizeof(double)) == 0 && status == status_ref;
    CHECK(same, what + format(" forward partition %zu (%zu chunks) differs from one call", i, parts[i].size() - 1));
  }
}

template <typename T>
void test_backward(const Data<T>& d, std::mt19937_64& rng) {
  using Tol = Tolerance<T>;
  Stats& stats = g_stats[std::is_same<T, double>::value ? 1 : 0];
  const std::string what = describe(d.config, Tol::name);
  const Config& c = d.config;
  const int64_t plane = d.plane();
  const std::vector<std::vector<int64_t>> parts = partitions(d.rows(), rng);
  std::vector<T> grad_ref;
  run_backward(d, parts[0], &grad_ref);

  std::vector<double> naive, magnitude;
  naive_gradient(d, &naive, &magnitude);
  int64_t untouched_bad = 0, analytic_bad = 0;
  std::string first_analytic;
  for (int64_t b = 0; b < c.batch; ++b) {
    for (int64_t ch = 0; ch < c.num_channels; ++ch) {
      const bool selected = d.is_selected(ch);
      for (int64_t p = 0; p < plane; ++p) {
        const size_t i = static_cast<size_t>((b * c.num_channels + ch) * plane + p);
        const double g = static_cast<double>(grad_ref[i]);
        if (!selected) {
          untouched_bad += grad_ref[i] != static_cast<T>(12345);
          continue;
        }
        const double err = std::fabs(g - naive[i]);
        // The absolute slack only covers float weights clamped at e^-87 ~ 1.6e-38.
        const double tol = Tol::rel * magnitude[i] + 1e-30;
        stats.backward = std::max(stats.backward, err / tol);
        if (!(err <= tol)) {
          if (analytic_bad++ == 0) {
            first_analytic =
                format(" b=%lld c=%lld y=%lld x=%lld kernel %.17g naive %.17g magnitude %.3g",
                       static_cast<long long>(b), static_cast<long long>(ch), static_cast<long long>(p / c.width),
                       static_cast<long long>(p % c.width), g, naive[i], magnitude[i]);
          }
        }
      }
    }
  }
  CHECK(untouched_bad == 0,
        what + format(" %lld entries of unselected channels were written", static_cast<long long>(untouched_bad)));
  CHECK(analytic_bad == 0, what +
                               format(" %lld gradient entries differ from the analytic naive gradient;",
                                      static_cast<long long>(analytic_bad)) +
                               first_analytic);

  // Chunking must not change a single bit.
  for (size_t i = 1; i < parts.size(); ++i) {
    std::vector<T> grad;
    run_backward(d, parts[i], &grad);
    CHECK(std::memcmp(grad.data(), grad_ref.data(), grad.size() * sizeof(T)) == 0,
          what + format(" backward partition %zu (%zu chunks) differs from one call", i, parts[i].size() - 1));
  }

  // Central differences of the naive forward (double, away from L1 ties).
  if (std::is_same<T, double>::value && !c.quantised) {
    const double eps = 1e-6;
    Data<T> shifted = d;
    int64_t fd_bad = 0;
    std::string first_fd;
    for (int64_t b = 0; b < c.batch; ++b) {
      for (int64_t ch : d.selected()) {
        for (int64_t p = 0; p < plane; ++p) {
          const size_t i = static_cast<size_t>((b * c.num_channels + ch) * plane + p);
          const T x = d.probs[i];
          shifted.probs[i] = static_cast<T>(x + eps);
          const long double up = naive_forward_image(shifted, b);
          const double hi = static_cast<double>(shifted.probs[i]);
          shifted.probs[i] = static_cast<T>(x - eps);
          const long double down = naive_forward_image(shifted, b);
          const double lo = static_cast<double>(shifted.probs[i]);
          shifted.probs[i] = x;
          const double fd = static_cast<double>(d.scale[b]) * static_cast<double>((up - down) / (hi - lo));
          const double g = static_cast<double>(grad_ref[i]);
          const double err = std::fabs(g - fd);
          const double tol = 1e-6 * magnitude[i] + 1e-9;
          stats.fd = std::max(stats.fd, err / tol);
          if (!(err <= tol)) {
            if (fd_bad++ == 0) {
              first_fd =
                  format(" b=%lld c=%lld y=%lld x=%lld kernel %.17g fd %.17g magnitude %.3g", static_cast<long long>(b),
                         static_cast<long long>(ch), static_cast<long long>(p / c.width),
                         static_cast<long long>(p % c.width), g, fd, magnitude[i]);
            }
          }
        }
      }
    }
    CHECK(fd_bad == 0,
          what + format(" %lld gradient entries differ from central differences;", static_cast<long long>(fd_bad)) +
              first_fd);
  }
}

// Status bits: one bad value at a time, in a random row.
template <typename T>
void test_status(const Data<T>& clean, std::mt19937_64& rng) {
  const std::string what = describe(clean.config, Tolerance<T>::name);
  const Config& c = clean.config;
  const int64_t plane = clean.plane();
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T inf = std::numeric_limits<T>::infinity();
  const std::vector<int64_t> selected = clean.selected();
  std::vector<int64_t> unselected;
  for (int64_t ch = 0; ch < c.num_channels; ++ch) {
    if (!clean.is_selected(ch)) unselected.push_back(ch);
  }

  struct Case {
    const char* name;
    bool in_image;
    bool selected_channel;
    T value;
    int32_t expected;
  };
  const Case cases[] = {
      {"probs NaN", false, true, nan, sc::kProbsOutOfRange},
      {"probs 1.5", false, true, static_cast<T>(1.5), sc::kProbsOutOfRange},
      {"probs -0.25", false, true, static_cast<T>(-0.25), sc::kProbsOutOfRange},
      {"probs +Inf", false, true, inf, sc::kProbsOutOfRange},
      {"image NaN", true, false, nan, sc::kImageNotFinite},
      {"image +Inf", true, false, inf, sc::kImageNotFinite},
      {"image -Inf", true, false, -inf, sc::kImageNotFinite},
      {"unselected probs NaN", false, false, nan, 0},
      {"unselected probs 1.5", false, false, static_cast<T>(1.5), 0},
  };
  for (const Case& k : cases) {
    if (!k.in_image && !k.selected_channel && unselected.empty()) continue;
    Data<T> d = clean;
    const int64_t b = static_cast<int64_t>(rng() % c.batch);
    const int64_t p = static_cast<int64_t>(rng() % plane);
    const int64_t row = b * c.height + p / c.width;
    if (k.in_image) {
      const int64_t channel = static_cast<int64_t>(rng() % c.image_channels);
      d.image[(b * c.image_channels + channel) * plane + p] = k.value;
    } else {
      const std::vector<int64_t>& pool = k.selected_channel ? selected : unselected;
      const int64_t channel = pool[rng() % pool.size()];
      d.probs[(b * c.num_channels + channel) * plane + p] = k.value;
    }
    std::vector<double> sums;
    std::vector<int32_t> status;
    run_forward(d, {0, d.rows()}, &sums, &status);
    int64_t wrong = 0;
    for (int64_t r = 0; r < d.rows(); ++r) wrong += status[r] != (r == row ? k.expected : 0);
    CHECK(wrong == 0,
          what + format(" %s at row %lld: status of that row %d, expected %d; %lld rows wrong", k.name,
                        static_cast<long long>(row), status[row], k.expected, static_cast<long long>(wrong)));
  }
  // Both kinds of bad value in the same row.
  {
    Data<T> d = clean;
    const int64_t b = static_cast<int64_t>(rng() % c.batch);
    const int64_t p = static_cast<int64_t>(rng() % plane);
    const int64_t row = b * c.height + p / c.width;
    d.probs[(b * c.num_channels + selected[0]) * plane + p] = nan;
    d.image[(b * c.image_channels + c.image_channels - 1) * plane + p] = inf;
    std::vector<double> sums;
    std::vector<int32_t> status;
    run_forward(d, {0, d.rows()}, &sums, &status);
    CHECK(status[row] == (sc::kProbsOutOfRange | sc::kImageNotFinite),
          what + format(" probs NaN and image Inf in row %lld: status %d", static_cast<long long>(row), status[row]));
  }
}

void test_exp() {
  // Dense grid of [-87, 0] in float, against exp in double.
  const int64_t n = 8700000;
  double worst = 0.0;
  float worst_x = 0.0f;
  for (int64_t i = 0; i <= n; ++i) {
    const float x = static_cast<float>(-87.0 * static_cast<double>(i) / static_cast<double>(n));
    const double exact = std::exp(static_cast<double>(x));
    const double got = static_cast<double>(boxloss::math::exp_nonpositive(x));
    const double rel = std::fabs(got - exact) / exact;
    if (!(rel <= worst)) {
      worst = rel;
      worst_x = x;
    }
  }
  // Also every float in [-1, -0.5], where many colour weights live.
  for (float x = -1.0f; x <= -0.5f; x = std::nextafter(x, 0.0f)) {
    const double exact = std::exp(static_cast<double>(x));
    const double rel = std::fabs(static_cast<double>(boxloss::math::exp_nonpositive(x)) - exact) / exact;
    if (!(rel <= worst)) {
      worst = rel;
      worst_x = x;
    }
  }
  std::printf("exp_nonpositive(float): max relative error %.3g at x = %.9g\n", worst, worst_x);
  CHECK(worst < 2e-7, format("exp_nonpositive(float) max relative error %.3g at x = %.9g", worst, worst_x));
  CHECK(boxloss::math::exp_nonpositive(0.0f) == 1.0f, "exp_nonpositive(0) == 1");
  CHECK(boxloss::math::exp_nonpositive(-0.0f) == 1.0f, "exp_nonpositive(-0) == 1");
  // Below -87 the result is clamped at about e^-87 (documented in host_device.h).
  const float tiny = boxloss::math::exp_nonpositive(-1000.0f);
  CHECK(tiny >= 0.0f && tiny <= 2e-38f, format("exp_nonpositive(-1000) = %g", tiny));
  const float neg_inf = boxloss::math::exp_nonpositive(-std::numeric_limits<float>::infinity());
  CHECK(neg_inf >= 0.0f && neg_inf <= 2e-38f, format("exp_nonpositive(-inf) = %g", neg_inf));
  CHECK(boxloss::math::exp_nonpositive(-0.5) == std::exp(-0.5), "exp_nonpositive(double) is exp");
}

// pair_weights (math.h) as a CUDA thread calls it, for one pair with the
// channel count read at run time, and as the CPU core calls it, for a run of a
// row with the channel sum unrolled for K = 3 and 1: the same weights, equal
// to the definition (naive_weight).
template <typename T>
void test_pair_weight_forms() {
  using acc = acc_t<T>;
  const auto to_acc = [](T v) { return static_cast<acc>(v); };
  for (int64_t K = 1; K <= 5; ++K) {
    for (int with_mask = 0; with_mask < 2; ++with_mask) {
      Config c;
      c.height = 4, c.width = 37, c.image_channels = K, c.with_mask = with_mask != 0, c.sigma = 0.3;
      c.seed = static_cast<uint64_t>(40 + 2 * K + with_mask);
      const Data<T> d = make_data<T>(c);
      const Problem p = d.problem();
      const int64_t plane = d.plane();
      const acc scale = sc::weight_exponent_scale<acc>(c.sigma);
      const T* image = d.image.data();
      const uint8_t* valid = d.valid.empty() ? nullptr : d.valid.data();
      std::vector<acc> row_weight(static_cast<size_t>(c.width)), scratch(static_cast<size_t>(c.width));
      for (int32_t o = 0; o < 8; ++o) {
        const sc::Offset offset = sc::neighbour_offset(o, 2);
        int64_t x_begin, x_end;
        sc::paired_x_range(c.width, offset.dx, &x_begin, &x_end);
        for (int64_t y = 0; y < c.height; ++y) {
          const int64_t y2 = y + offset.dy;
          if (y2 < 0 || y2 >= c.height) continue;
          const int64_t count = x_end - x_begin;
          const T* row_p = image + y * c.width + x_begin;
          const T* row_q = image + y2 * c.width + offset.dx + x_begin;
          const uint8_t* vp = valid == nullptr ? nullptr : valid + y * c.width + x_begin;
          const uint8_t* vq = valid == nullptr ? nullptr : valid + y2 * c.width + offset.dx + x_begin;
          if (K == 3) {
            sc::pair_weights<3>(row_p, row_q, plane, K, vp, vq, count, scale, to_acc, scratch.data(),
                                row_weight.data());
          } else if (K == 1) {
            sc::pair_weights<1>(row_p, row_q, plane, K, vp, vq, count, scale, to_acc, scratch.data(),
                                row_weight.data());
          } else {
            sc::pair_weights<0>(row_p, row_q, plane, K, vp, vq, count, scale, to_acc, scratch.data(),
                                row_weight.data());
          }
          for (int64_t x = x_begin; x < x_end; ++x) {
            const int64_t pp = y * c.width + x, q = y2 * c.width + x + offset.dx;
            acc squared, one;
            sc::pair_weights<0>(image + pp, image + q, plane, p.image_channels, valid == nullptr ? nullptr : valid + pp,
                                valid == nullptr ? nullptr : valid + q, 1, scale, to_acc, &squared, &one);
            const double want = naive_weight(d, 0, pp, q);
            const double row = static_cast<double>(row_weight[x - x_begin]);
            const double eps = std::numeric_limits<acc>::epsilon();
            const std::string what = format("[K=%lld mask=%d offset %d y=%lld x=%lld]", static_cast<long long>(K),
                                            with_mask, o, static_cast<long long>(y), static_cast<long long>(x));
            CHECK(std::fabs(static_cast<double>(one) - row) <= 4 * eps * row,
                  what + format(" one pair %.9g, row %.9g", static_cast<double>(one), row));
            // The exponent -||I_p - I_q||^2 / (2 sigma^2) carries a few rounding errors of its own size.
            const double exponent = want > 0 ? -std::log(want) : 0.0;
            CHECK(std::fabs(static_cast<double>(one) - want) <= 8 * eps * (1 + exponent) * want,
                  what + format(" one pair %.9g, definition %.9g", static_cast<double>(one), want));
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Problem generation

std::vector<Config> make_configs() {
  std::vector<Config> configs;
  uint64_t seed = 1000;
  auto add = [&](Config c) {
    c.seed = seed++;
    configs.push_back(c);
  };
  // Hand-picked edges.
  for (int32_t nb : {4, 8}) {
    for (Kind kind : {Kind::L1, Kind::Potts}) {
      Config c;
      c.neighbourhood = nb;
      c.kind = kind;
      c.batch = 2, c.num_channels = 3, c.height = 5, c.width = 6, c.image_channels = 3;
      add(c);  // plain
      Config h1 = c;
      h1.height = 1;
      h1.width = 9;
      add(h1);  // single row
      Config w1 = c;
      w1.height = 8;
      w1.width = 1;
      add(w1);  // single column
      Config px = c;
      px.height = 1;
      px.width = 1;
      add(px);  // single pixel: no pairs
      Config big = c;
      big.dilation = 7;
      add(big);  // dilation larger than the image
      Config mid = c;
      mid.height = 9;
      mid.width = 2;
      mid.dilation = 3;
      add(mid);  // > width, < height
      Config k1 = c;
      k1.image_channels = 1;
      k1.with_mask = true;
      k1.channels = {2, 0};
      add(k1);
      Config k2 = c;
      k2.image_channels = 2;
      add(k2);  // channel count read at run time
      Config k4 = c;
      k4.image_channels = 4;
      k4.with_mask = true;
      k4.width = 29;
      add(k4);
      Config one = c;
      one.num_channels = 4;
      one.channels = {3};
      one.dilation = 2;
      add(one);
      Config wide = c;
      wide.height = 3;
      wide.width = 37;
      wide.with_mask = true;
      add(wide);  // vector tails
      Config wider = c;
      wider.batch = 1;
      wider.height = 2;
      wider.width = 70;
      wider.dilation = 3;
      add(wider);
      Config q = c;
      q.quantised = true;
      q.with_mask = true;
      add(q);  // ties, 0 and 1
      Config flat = c;
      flat.sigma = 50.0;
      add(flat);  // weights near 1
      Config sharp = c;
      sharp.sigma = 0.05;
      add(sharp);  // many weights below e^-87 in float
    }
  }
  // Random small problems.
  std::mt19937_64 rng(20240601);
  auto pick = [&](int64_t lo, int64_t hi) { return lo + static_cast<int64_t>(rng() % (hi - lo + 1)); };
  const double sigmas[] = {0.15, 0.3, 0.7, 2.0};
  for (int i = 0; i < 160; ++i) {
    Config c;
    c.batch = pick(1, 3);
    c.num_channels = pick(1, 4);
    c.height = pick(1, 9);
    c.width = pick(1, 9);
    const int64_t shape = pick(0, 9);
    if (shape == 0) c.height = 1;
    if (shape == 1) c.width = 1;
    if (shape == 2) c.width = pick(10, 40);
    const int64_t image_channels[] = {3, 3, 1, 2, 4};
    c.image_channels = image_channels[pick(0, 4)];
    c.neighbourhood = pick(0, 1) ? 8 : 4;
    c.dilation = static_cast<int32_t>(pick(0, 5) == 0 ? std::max(c.height, c.width) + pick(0, 2) : pick(1, 3));
    c.with_mask = pick(0, 1) == 1;
    if (c.num_channels > 1 && pick(0, 1)) {
      std::vector<int32_t> all;
      for (int32_t ch = 0; ch < c.num_channels; ++ch) all.push_back(ch);
      std::shuffle(all.begin(), all.end(), rng);
      all.resize(static_cast<size_t>(pick(1, c.num_channels - 1)));
      c.channels = all;  // in random order
    }
    c.kind = pick(0, 1) ? Kind::L1 : Kind::Potts;
    c.sigma = sigmas[pick(0, 3)];
    c.quantised = pick(0, 4) == 0;
    add(c);
  }
  return configs;
}

template <typename T>
void run_all(const std::vector<Config>& configs) {
  std::mt19937_64 rng(7);
  for (const Config& c : configs) {
    const Data<T> d = make_data<T>(c);
    test_forward(d, rng);
    test_backward(d, rng);
    test_status(d, rng);
  }
}

}  // namespace

int main() {
  test_exp();
  test_pair_weight_forms<float>();
  test_pair_weight_forms<double>();
  const std::vector<Config> configs = make_configs();
  run_all<float>(configs);
  run_all<double>(configs);
  std::printf(
      "worst error / tolerance: float forward %.3g backward %.3g; double forward %.3g backward %.3g "
      "central differences %.3g\n",
      g_stats[0].forward, g_stats[0].backward, g_stats[1].forward, g_stats[1].backward, g_stats[1].fd);
  std::printf("sparse_crf_core: %lld checks, %lld failed (%zu problems, float and double)\n",
              static_cast<long long>(g_checks), static_cast<long long>(g_failures), configs.size());
  return g_failures == 0 ? 0 : 1;
}
