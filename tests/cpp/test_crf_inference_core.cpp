// Torch-free tests of the DenseCRF inference core (csrc/kernels/crf_inference):
//
// * the 2-d spatial lattice: every pixel's simplex reproduces its elevated
//   position, the numbering is first use in pixel order and the neighbour
//   table agrees with a search over all vertex keys;
// * the mean-field loop equals the update written with dense matrices (the
//   lattice filter alpha S B_d ... B_0 S^T built entry by entry, the symmetric
//   normaliser, the Potts messages, the softmax), with and without a mask,
//   with either kernel dropped, and with impossible (+inf) labels;
// * softmax_pixels gives the same bits on a block of pixels as pixel by pixel,
//   and flushes to exactly 0 below e^-80;
// * no result depends on the runner (pieces, order, workers: the channel-
//   split splat), nor on how the lattice's vertices are numbered (a numbering
//   other than first use takes the zeroed-grid splat);
// * bad unaries are reported, and nothing is written then.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "boxloss/crf_inference/cpu.h"
#include "boxloss/permutohedral/cpu.h"
#include "test_support.h"

namespace {

namespace ci = boxloss::crf_inference;
namespace pl = boxloss::permutohedral;

constexpr double kInf = std::numeric_limits<double>::infinity();

std::string tag(const char* what, int64_t h, int64_t w, double sigma) {
  char buffer[128];
  std::snprintf(buffer, sizeof(buffer), "[%s H=%lld W=%lld sigma=%g]", what, static_cast<long long>(h),
                static_cast<long long>(w), sigma);
  return buffer;
}

// Splits [0, n) into pieces of `piece` and runs them in reverse order, as `workers` workers.
pl::cpu::RangeRunner chunked(int64_t piece, int64_t workers) {
  return pl::cpu::RangeRunner(
      [piece](int64_t n, int64_t /*grain*/, const pl::cpu::RangeFn& fn) {
        std::vector<std::pair<int64_t, int64_t>> parts;
        for (int64_t b = 0; b < n; b += piece) parts.push_back({b, std::min(n, b + piece)});
        for (auto it = parts.rbegin(); it != parts.rend(); ++it) fn(it->first, it->second);
      },
      workers);
}

std::vector<double> make_image(int64_t h, int64_t w, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> noise(0.0, 6.0);
  std::vector<double> img(static_cast<size_t>(3 * h * w));
  for (int c = 0; c < 3; ++c) {
    for (int64_t y = 0; y < h; ++y) {
      for (int64_t x = 0; x < w; ++x) {
        double v = 128 + 90 * std::sin(0.4 * x + c) * std::cos(0.3 * y - c);
        if (x > w / 2 && y < h / 2) v = 40.0 + 60 * c;
        img[(c * h + y) * w + x] = std::min(255.0, std::max(0.0, v + noise(rng)));
      }
    }
  }
  return img;
}

// A lattice as the loop reads it, with its storage.
struct Lattice {
  int simplex = 0;
  std::vector<int32_t> index;
  std::vector<double> weight;
  std::vector<int32_t> neighbours;  // (simplex, V, 2)
  int64_t num_vertices = 0;

  ci::cpu::KernelLattice<double> view(double kernel_weight) const {
    ci::cpu::KernelLattice<double> k;
    k.splat_index = index.data();
    k.splat_weight = weight.data();
    k.neighbours = neighbours.data();
    k.axis_stride = 2 * num_vertices;
    k.num_vertices = num_vertices;
    k.weight = kernel_weight;
    return k;
  }
};

Lattice appearance_lattice(const std::vector<double>& img, int64_t h, int64_t w, double sxy, double srgb) {
  Lattice l;
  l.simplex = pl::kVertices;
  l.index.resize(static_cast<size_t>(h * w * l.simplex));
  l.weight.resize(l.index.size());
  pl::cpu::ImageLattice built;
  pl::cpu::build_lattice<double>(img.data(), h, w, sxy, srgb, l.index.data(), l.weight.data(), &built);
  l.neighbours = built.neighbours;
  l.num_vertices = built.num_vertices;
  return l;
}

Lattice spatial_lattice(int64_t h, int64_t w, double sigma) {
  Lattice l;
  l.simplex = ci::cpu::kSmoothnessSimplex;
  l.index.resize(static_cast<size_t>(h * w * l.simplex));
  l.weight.resize(l.index.size());
  const int32_t status = ci::cpu::build_spatial_lattice<double>(h, w, sigma, l.index.data(), l.weight.data(),
                                                                &l.neighbours, &l.num_vertices);
  CHECK(status == 0, tag("spatial build", h, w, sigma));
  return l;
}

// ---------------------------------------------------------------- the spatial lattice

void test_spatial_lattice(int64_t h, int64_t w, double sigma) {
  const Lattice l = spatial_lattice(h, w, sigma);
  constexpr int kD = 2;
  std::map<std::vector<int32_t>, int32_t> numbers;  // key -> first-use number
  for (int64_t p = 0; p < h * w; ++p) {
    const double feature[kD] = {static_cast<double>(p % w) * (1.0 / sigma), static_cast<double>(p / w) * (1.0 / sigma)};
    pl::Simplex<double, kD> s;
    pl::locate(feature, &s);
    CHECK(s.ok, tag("simplex ok", h, w, sigma));
    // The elevated point E f (the same scaling as locate) is the weighted sum of the vertices.
    double elevated[kD + 1];
    double running = 0;
    for (int j = kD; j > 0; --j) {
      const double cf = feature[j - 1] * pl::scale_factor<kD>(j - 1);
      elevated[j] = running - j * cf;
      running += cf;
    }
    elevated[0] = running;
    double sum = 0, rebuilt[kD + 1] = {0, 0, 0};
    for (int r = 0; r <= kD; ++r) {
      CHECK(s.weights[r] >= -1e-12, tag("weight >= 0", h, w, sigma));
      sum += s.weights[r];
      const double key[kD + 1] = {double(s.keys[r][0]), double(s.keys[r][1]), -double(s.keys[r][0] + s.keys[r][1])};
      for (int i = 0; i <= kD; ++i) {
        // Every coordinate of a remainder-r point is r modulo d+1.
        CHECK(((static_cast<int64_t>(key[i]) % 3) + 3) % 3 == r, tag("remainder", h, w, sigma));
        rebuilt[i] += s.weights[r] * key[i];
      }
      const std::vector<int32_t> k(s.keys[r], s.keys[r] + kD);
      const auto found = numbers.find(k);
      const int32_t number = found == numbers.end() ? static_cast<int32_t>(numbers.size()) : found->second;
      if (found == numbers.end()) numbers[k] = number;
      CHECK(l.index[p * 3 + r] == number, tag("first-use numbering", h, w, sigma));
      CHECK(l.weight[p * 3 + r] == s.weights[r], tag("weights", h, w, sigma));
    }
    CHECK(std::abs(sum - 1.0) < 1e-12, tag("weights sum to 1", h, w, sigma));
    for (int i = 0; i <= kD; ++i) CHECK(std::abs(rebuilt[i] - elevated[i]) < 1e-9, tag("barycentric", h, w, sigma));
  }
  CHECK(static_cast<int64_t>(numbers.size()) == l.num_vertices, tag("vertex count", h, w, sigma));
  for (const auto& [key, v] : numbers) {
    for (int axis = 0; axis <= kD; ++axis) {
      for (int side = 0; side < 2; ++side) {
        int32_t other[kD];
        pl::neighbour_key<kD>(key.data(), axis, side, other);
        const auto found = numbers.find(std::vector<int32_t>(other, other + kD));
        const int32_t expected = found == numbers.end() ? -1 : found->second;
        CHECK(l.neighbours[(axis * l.num_vertices + v) * 2 + side] == expected, tag("neighbours", h, w, sigma));
      }
    }
  }
}

// ---------------------------------------------------------------- dense mean field

using Matrix = std::vector<std::vector<double>>;

// K = alpha S B_d ... B_0 S^T (N x N) of a lattice, entry by entry.
Matrix dense_filter(const Lattice& l, int64_t n) {
  const int64_t V = l.num_vertices;
  // Columns of the splat: M[v][j] = weight of pixel j on vertex v.
  Matrix m(static_cast<size_t>(V), std::vector<double>(static_cast<size_t>(n), 0.0));
  for (int64_t p = 0; p < n; ++p) {
    for (int r = 0; r < l.simplex; ++r) m[l.index[p * l.simplex + r]][p] += l.weight[p * l.simplex + r];
  }
  for (int axis = 0; axis < l.simplex; ++axis) {
    Matrix next = m;
    for (int64_t v = 0; v < V; ++v) {
      for (int side = 0; side < 2; ++side) {
        const int32_t u = l.neighbours[(axis * V + v) * 2 + side];
        if (u < 0) continue;
        for (int64_t j = 0; j < n; ++j) next[v][j] += 0.5 * m[u][j];
      }
    }
    m.swap(next);
  }
  const double alpha = 1.0 / (1.0 + std::pow(2.0, -(l.simplex - 1)));
  Matrix k(static_cast<size_t>(n), std::vector<double>(static_cast<size_t>(n), 0.0));
  for (int64_t i = 0; i < n; ++i) {
    for (int r = 0; r < l.simplex; ++r) {
      const double wr = l.weight[i * l.simplex + r];
      for (int64_t j = 0; j < n; ++j) k[i][j] += alpha * wr * m[l.index[i * l.simplex + r]][j];
    }
  }
  return k;
}

// Q (C x N) by the update of math.h with dense kernels (weight 0: dropped).
std::vector<double> dense_mean_field(const std::vector<double>& unary, int64_t channels, int64_t n,
                                     const std::vector<uint8_t>& valid,
                                     const std::vector<std::pair<double, Matrix>>& kernels, int64_t iterations) {
  const auto softmax = [&](const std::vector<double>& logits, int64_t p, std::vector<double>* q) {
    double largest = -kInf;
    for (int64_t c = 0; c < channels; ++c) largest = std::max(largest, logits[c * n + p]);
    double sum = 0;
    for (int64_t c = 0; c < channels; ++c) {
      const double d = logits[c * n + p] - largest;
      const double e = d < ci::kFlushBelow ? 0.0 : std::exp(d);
      (*q)[c * n + p] = e;
      sum += e;
    }
    for (int64_t c = 0; c < channels; ++c) (*q)[c * n + p] /= sum;
  };
  std::vector<double> q(unary.size()), q0(unary.size()), logits(unary.size());
  for (size_t i = 0; i < unary.size(); ++i) logits[i] = -unary[i];
  for (int64_t p = 0; p < n; ++p) softmax(logits, p, &q0);
  q = q0;
  std::vector<std::vector<double>> norms;
  for (const auto& [w, k] : kernels) {
    std::vector<double> norm(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      double s = 0;
      for (int64_t j = 0; j < n; ++j) s += k[i][j] * valid[j];
      norm[i] = 1.0 / std::sqrt(s + 1e-20);
    }
    norms.push_back(norm);
  }
  for (int64_t t = 0; t < iterations; ++t) {
    for (size_t i = 0; i < unary.size(); ++i) logits[i] = -unary[i];
    for (size_t kk = 0; kk < kernels.size(); ++kk) {
      const double w = kernels[kk].first;
      const Matrix& k = kernels[kk].second;
      const std::vector<double>& norm = norms[kk];
      for (int64_t c = 0; c < channels; ++c) {
        for (int64_t i = 0; i < n; ++i) {
          double s = 0;
          for (int64_t j = 0; j < n; ++j) s += k[i][j] * norm[j] * valid[j] * q[c * n + j];
          logits[c * n + i] += w * norm[i] * s;
        }
      }
    }
    std::vector<double> next(q.size());
    for (int64_t p = 0; p < n; ++p) softmax(logits, p, &next);
    for (int64_t p = 0; p < n; ++p) {
      for (int64_t c = 0; c < channels; ++c) q[c * n + p] = valid[p] ? next[c * n + p] : q0[c * n + p];
    }
  }
  return q;
}

struct Problem {
  int64_t h, w, channels;
  double bilateral_weight, sxy, srgb, gaussian_weight, sigma;
  int64_t iterations;
  bool with_mask, impossible;
};

std::vector<double> make_unary(const Problem& c, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(0.0, 4.0);
  std::vector<double> unary(static_cast<size_t>(c.channels * c.h * c.w));
  for (double& v : unary) v = u(rng);
  if (c.impossible && c.channels > 1) {
    for (int64_t p = 0; p < c.h * c.w; p += 3) unary[(p % (c.channels - 1) + 1) * c.h * c.w + p] = kInf;
  }
  return unary;
}

std::vector<uint8_t> make_mask(const Problem& c, uint64_t seed) {
  std::vector<uint8_t> valid(static_cast<size_t>(c.h * c.w), 1);
  if (!c.with_mask) return valid;
  std::mt19937_64 rng(seed);
  for (auto& v : valid) v = (rng() % 4) != 0;
  return valid;
}

template <typename scalar>
std::vector<scalar> run(const Problem& c, const std::vector<double>& unary, const std::vector<uint8_t>& valid,
                        const Lattice& a, const Lattice& s, const pl::cpu::RangeRunner& runner, int64_t parallel_pixels,
                        int32_t* status) {
  // The lattices are double; the float run uses float copies of their weights.
  std::vector<scalar> u(unary.begin(), unary.end()), aw(a.weight.begin(), a.weight.end()),
      sw(s.weight.begin(), s.weight.end()), out(unary.size(), scalar(-7));
  ci::cpu::MeanFieldImage<scalar> image;
  image.unary = u.data();
  image.channels = c.channels;
  image.num_pixels = c.h * c.w;
  image.valid = c.with_mask ? valid.data() : nullptr;
  image.appearance = {a.index.data(),     aw.data(),      a.neighbours.data(),
                      2 * a.num_vertices, a.num_vertices, c.bilateral_weight};
  image.smoothness = {s.index.data(),     sw.data(),      s.neighbours.data(),
                      2 * s.num_vertices, s.num_vertices, c.gaussian_weight};
  image.iterations = c.iterations;
  image.out = out.data();
  image.parallel_pixels = parallel_pixels;
  *status = ci::cpu::mean_field_image<scalar>(image, runner);
  return out;
}

// The same lattice with its vertices renumbered (not first use).
Lattice renumbered(const Lattice& l, uint64_t seed) {
  std::vector<int32_t> perm(static_cast<size_t>(l.num_vertices));
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), std::mt19937_64(seed));
  Lattice r = l;
  for (auto& v : r.index) v = perm[v];
  for (int axis = 0; axis < l.simplex; ++axis) {
    for (int64_t v = 0; v < l.num_vertices; ++v) {
      for (int side = 0; side < 2; ++side) {
        const int32_t u = l.neighbours[(axis * l.num_vertices + v) * 2 + side];
        r.neighbours[(axis * l.num_vertices + perm[v]) * 2 + side] = u < 0 ? -1 : perm[u];
      }
    }
  }
  return r;
}

void test_mean_field(const Problem& c, uint64_t seed) {
  char buffer[200];
  std::snprintf(buffer, sizeof(buffer), "[mean field %lldx%lld C=%lld w=(%g,%g) sxy=%g srgb=%g sigma=%g T=%lld%s%s]",
                static_cast<long long>(c.h), static_cast<long long>(c.w), static_cast<long long>(c.channels),
                c.bilateral_weight, c.gaussian_weight, c.sxy, c.srgb, c.sigma, static_cast<long long>(c.iterations),
                c.with_mask ? " mask" : "", c.impossible ? " +inf" : "");
  const std::string what = buffer;
  const int64_t n = c.h * c.w;
  const std::vector<double> img = make_image(c.h, c.w, seed);
  const Lattice a = appearance_lattice(img, c.h, c.w, c.sxy, c.srgb);
  const Lattice s = spatial_lattice(c.h, c.w, c.sigma);
  const std::vector<double> unary = make_unary(c, seed + 1);
  const std::vector<uint8_t> valid = make_mask(c, seed + 2);
  std::vector<std::pair<double, Matrix>> kernels;
  if (c.bilateral_weight > 0) kernels.push_back({c.bilateral_weight, dense_filter(a, n)});
  if (c.gaussian_weight > 0) kernels.push_back({c.gaussian_weight, dense_filter(s, n)});
  const std::vector<double> expected = dense_mean_field(unary, c.channels, n, valid, kernels, c.iterations);

  int32_t status = -1;
  const std::vector<double> got = run<double>(c, unary, valid, a, s, pl::cpu::run_serially, 1 << 16, &status);
  CHECK(status == 0, what + " status");
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::abs(got[i] - expected[i]));
  CHECK(worst < 1e-12, what + " against dense: " + std::to_string(worst));
  for (int64_t p = 0; p < n; p += 3) {
    for (int64_t ch = 0; ch < c.channels; ++ch) {
      if (unary[ch * n + p] == kInf) CHECK(got[ch * n + p] == 0.0, what + " +inf gives 0");
    }
  }

  // Any runner, as one worker or several (from 0 pixels, so the split paths run on this small image), and
  // any numbering of the vertices: the same bits.
  for (int64_t piece : {1, 5, 1000}) {
    for (int64_t workers : {1, 2, 3}) {
      const auto again = run<double>(c, unary, valid, a, s, chunked(piece, workers), 0, &status);
      CHECK(again == got, what + " runner piece " + std::to_string(piece) + " workers " + std::to_string(workers));
    }
  }
  const auto relabelled = run<double>(c, unary, valid, renumbered(a, seed), renumbered(s, seed + 7),
                                      pl::cpu::run_serially, 1 << 16, &status);
  CHECK(relabelled == got, what + " renumbered vertices");
  // float: the same update to float rounding, and the same bits for every runner.
  const auto f1 = run<float>(c, unary, valid, a, s, pl::cpu::run_serially, 1 << 16, &status);
  const auto f2 = run<float>(c, unary, valid, a, s, chunked(3, 2), 0, &status);
  CHECK(f1 == f2, what + " float runner");
  double worst_float = 0;
  for (size_t i = 0; i < got.size(); ++i) worst_float = std::max(worst_float, std::abs(double(f1[i]) - got[i]));
  CHECK(worst_float < 1e-4, what + " float close to double: " + std::to_string(worst_float));
}

// ---------------------------------------------------------------- softmax and status

void test_softmax_blocks() {
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<double> u(-100.0, 20.0);
  constexpr int kPixels = 8;
  for (int64_t channels : {1, 2, 5, 21}) {
    std::vector<double> block(static_cast<size_t>(channels * kPixels));
    for (double& v : block) v = u(rng);
    if (channels > 1) block[3] = -kInf;  // channel 0 of pixel 3 (not its only class)
    std::vector<double> one = block;
    ci::softmax_pixels<double, kPixels>(block.data(), channels);
    for (int t = 0; t < kPixels; ++t) {
      std::vector<double> row(static_cast<size_t>(channels));
      for (int64_t c = 0; c < channels; ++c) row[c] = one[c * kPixels + t];
      double largest = -kInf;
      for (double v : row) largest = std::max(largest, v);
      ci::softmax_pixels<double, 1>(row.data(), channels);
      for (int64_t c = 0; c < channels; ++c) {
        CHECK(row[c] == block[c * kPixels + t], "softmax: a block of pixels gives the bits of one pixel");
        const double d = one[c * kPixels + t] - largest;
        if (d < ci::kFlushBelow) CHECK(row[c] == 0.0, "softmax: below e^-80 is exactly 0");
        if (d >= ci::kFlushBelow) CHECK(row[c] > 0.0, "softmax: above e^-80 is positive");
      }
    }
  }
  float f[3] = {0.0f, -90.0f, -std::numeric_limits<float>::infinity()};
  ci::softmax_pixels<float, 1>(f, 3);
  CHECK(f[0] == 1.0f && f[1] == 0.0f && f[2] == 0.0f, "float softmax flush");
}

void test_status() {
  const Problem c{5, 6, 3, 4.0, 3.0, 10.0, 3.0, 2.0, 2, false, false};
  const std::vector<double> img = make_image(c.h, c.w, 9);
  const Lattice a = appearance_lattice(img, c.h, c.w, c.sxy, c.srgb);
  const Lattice s = spatial_lattice(c.h, c.w, c.sigma);
  const std::vector<uint8_t> valid(30, 1);
  const struct {
    int64_t channel, pixel;
    double value;
    int32_t bit;
  } bad[] = {{1, 7, std::nan(""), ci::kUnaryNaN},
             {2, 0, -kInf, ci::kUnaryNegativeInfinity},
             {-1, 29, kInf, ci::kUnaryAllInfinite}};
  for (const auto& b : bad) {
    std::vector<double> unary = make_unary(c, 3);
    if (b.channel >= 0) {
      unary[b.channel * 30 + b.pixel] = b.value;
    } else {
      for (int64_t ch = 0; ch < 3; ++ch) unary[ch * 30 + b.pixel] = b.value;
    }
    int32_t status = 0;
    const auto out = run<double>(c, unary, valid, a, s, pl::cpu::run_serially, 1 << 16, &status);
    CHECK(status == b.bit, "status bit " + std::to_string(b.bit));
    CHECK(std::all_of(out.begin(), out.end(), [](double v) { return v == -7.0; }), "nothing written on bad unaries");
  }
  // A single +inf is a valid (impossible) label.
  std::vector<double> unary = make_unary(c, 3);
  unary[5] = kInf;
  int32_t status = -1;
  run<double>(c, unary, valid, a, s, pl::cpu::run_serially, 1 << 16, &status);
  CHECK(status == 0, "one +inf is fine");
  // A spatial sigma too small for the grid is reported.
  std::vector<int32_t> index(3 * 4), neighbours;
  std::vector<double> weight(3 * 4);
  int64_t vertices = 0;
  CHECK(ci::cpu::build_spatial_lattice<double>(2, 2, 1e-9, index.data(), weight.data(), &neighbours, &vertices) ==
            pl::kFeaturesTooLarge,
        "spatial sigma too small");
}

}  // namespace

int main() {
  for (const auto& [h, w, sigma] : std::vector<std::tuple<int64_t, int64_t, double>>{
           {1, 1, 3.0}, {1, 17, 1.0}, {13, 1, 2.0}, {20, 23, 3.0}, {31, 29, 0.7}, {16, 16, 10.0}}) {
    test_spatial_lattice(h, w, sigma);
  }
  const Problem problems[] = {
      {1, 1, 2, 4.0, 3.0, 15.0, 3.0, 3.0, 3, false, false}, {1, 9, 3, 4.0, 3.0, 15.0, 3.0, 1.0, 4, false, false},
      {7, 1, 2, 4.0, 2.0, 10.0, 3.0, 1.0, 3, true, false},  {6, 8, 5, 4.0, 55.0, 3.0, 3.0, 3.0, 10, false, false},
      {9, 7, 21, 4.0, 3.0, 15.0, 3.0, 1.5, 5, true, true},  {8, 9, 3, 0.0, 3.0, 15.0, 3.0, 1.0, 4, false, true},
      {8, 9, 3, 5.0, 3.0, 15.0, 0.0, 1.0, 4, true, false},  {10, 11, 9, 10.0, 4.0, 20.0, 5.0, 0.8, 3, false, false},
      {5, 13, 1, 4.0, 3.0, 15.0, 3.0, 3.0, 2, true, false},
  };
  uint64_t seed = 11;
  for (const Problem& p : problems) test_mean_field(p, seed++);
  test_softmax_blocks();
  test_status();
  std::printf("crf_inference_core: %lld checks, %lld failed\n", static_cast<long long>(g_checks),
              static_cast<long long>(g_failures));
  return g_failures == 0 ? 0 : 1;
}
