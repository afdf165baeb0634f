// Torch-free tests of the permutohedral lattice core and the DenseCRF loss
// passes (csrc/kernels/permutohedral, csrc/kernels/dense_crf):
//
// * every pixel's simplex: its d+1 vertices are lattice points of remainders
//   0..d, the weights are >= 0 and sum to 1, and they reproduce the elevated
//   feature (the barycentric interpolation is exact);
// * the vertex numbering is first use in pixel order, and the neighbour table
//   agrees with a search over all vertex keys;
// * the filter equals alpha S^T B_d ... B_0 S built as dense matrices, the
//   reverse filter its transpose, and the self-affinity lower bound never
//   exceeds the diagonal of that matrix (so the loss's W has no negative entry);
// * the loss's E, Z and gradient equal the dense-matrix formulas, the gradient
//   matches central differences of E, and no result depends on how the work is
//   split into ranges;
// * non-finite images, huge features and non-finite values are reported.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "boxloss/dense_crf/cpu.h"
#include "boxloss/permutohedral/cpu.h"
#include "test_support.h"

namespace {

namespace pl = boxloss::permutohedral;
namespace dc = boxloss::dense_crf;
using pl::kDim;
using pl::kVertices;

std::string tag(const char* what, int64_t h, int64_t w, double sxy, double srgb) {
  char buffer[160];
  std::snprintf(buffer, sizeof(buffer), "[%s H=%lld W=%lld sigma_xy=%g sigma_rgb=%g]", what, static_cast<long long>(h),
                static_cast<long long>(w), sxy, srgb);
  return buffer;
}

// A runner that splits [0, n) into pieces of `piece` elements and runs them
// in reverse order: any dependence on the split or the order shows up.
pl::cpu::RangeRunner chunked(int64_t piece) {
  return [piece](int64_t n, int64_t /*grain*/, const pl::cpu::RangeFn& fn) {
    std::vector<std::pair<int64_t, int64_t>> parts;
    for (int64_t b = 0; b < n; b += piece) parts.push_back({b, std::min(n, b + piece)});
    for (auto it = parts.rbegin(); it != parts.rend(); ++it) fn(it->first, it->second);
  };
}

// A smooth image with a few flat regions and some noise, colours in [0, 255].
std::vector<double> make_image(int64_t h, int64_t w, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> noise(0.0, 4.0);
  std::vector<double> img(static_cast<size_t>(3 * h * w));
  for (int c = 0; c < 3; ++c) {
    for (int64_t y = 0; y < h; ++y) {
      for (int64_t x = 0; x < w; ++x) {
        double v = 128 + 90 * std::sin(0.3 * x + c) * std::cos(0.25 * y - c);
        if (x > w / 2 && y < h / 2) v = 40.0 + 60 * c;  // a flat block
        img[(c * h + y) * w + x] = std::min(255.0, std::max(0.0, v + noise(rng)));
      }
    }
  }
  return img;
}

struct Built {
  std::vector<int32_t> index;
  std::vector<double> weight;
  pl::cpu::ImageLattice lattice;
  std::vector<int64_t> offsets;

  pl::Lattice<double> view(int64_t num_pixels) const {
    pl::Lattice<double> l;
    l.splat_index = index.data();
    l.splat_weight = weight.data();
    l.blur_neighbours = lattice.neighbours.data();
    l.vertex_offsets = offsets.data();
    l.batch = 1;
    l.num_pixels = num_pixels;
    l.total_vertices = lattice.num_vertices;
    return l;
  }
};

Built build(const std::vector<double>& img, int64_t h, int64_t w, double sxy, double srgb) {
  Built b;
  b.index.resize(static_cast<size_t>(h * w * kVertices));
  b.weight.resize(b.index.size());
  pl::cpu::build_lattice<double>(img.data(), h, w, sxy, srgb, b.index.data(), b.weight.data(), &b.lattice);
  b.offsets = {0, b.lattice.num_vertices};
  return b;
}

std::vector<double> features_of(const std::vector<double>& img, int64_t h, int64_t w, int64_t p, double sxy,
                                double srgb) {
  const int64_t n = h * w;
  return {static_cast<double>(p % w) * (1.0 / sxy), static_cast<double>(p / w) * (1.0 / sxy), img[p] * (1.0 / srgb),
          img[n + p] * (1.0 / srgb), img[2 * n + p] * (1.0 / srgb)};
}

// The full d+1 coordinates of a key (the last is minus the sum of the others).
std::vector<int64_t> full_key(const int32_t* key) {
  std::vector<int64_t> k(kVertices);
  int64_t sum = 0;
  for (int i = 0; i < kDim; ++i) {
    k[i] = key[i];
    sum += key[i];
  }
  k[kDim] = -sum;
  return k;
}

void test_simplices(const std::vector<double>& img, int64_t h, int64_t w, double sxy, double srgb) {
  const std::string what = tag("simplex", h, w, sxy, srgb);
  const int64_t n = h * w;
  int64_t bad_sum = 0, bad_negative = 0, bad_remainder = 0, bad_reconstruct = 0;
  for (int64_t p = 0; p < n; ++p) {
    const std::vector<double> f = features_of(img, h, w, p, sxy, srgb);
    pl::Simplex<double> s;
    pl::locate(f.data(), &s);
    double total = 0.0;
    std::vector<double> reconstructed(kVertices, 0.0);
    for (int r = 0; r < kVertices; ++r) {
      total += s.weights[r];
      bad_negative += s.weights[r] < -1e-12;
      const std::vector<int64_t> k = full_key(s.keys[r]);
      for (int i = 0; i < kVertices; ++i) {
        bad_remainder += ((k[i] % kVertices) + kVertices) % kVertices != r;
        reconstructed[i] += s.weights[r] * static_cast<double>(k[i]);
      }
    }
    bad_sum += std::fabs(total - 1.0) > 1e-12;
    // The elevated point, E f (Adams et al. p. 5), from the definition.
    std::vector<double> elevated(kVertices, 0.0);
    for (int j = 0; j < kDim; ++j) {
      const double cf = f[j] * pl::scale_factor(j);
      for (int i = 0; i <= j; ++i) elevated[i] += cf;
      elevated[j + 1] -= (j + 1) * cf;
    }
    for (int i = 0; i < kVertices; ++i) bad_reconstruct += std::fabs(reconstructed[i] - elevated[i]) > 1e-9;
  }
  CHECK(bad_sum == 0, what + " weights do not sum to 1 for " + std::to_string(bad_sum) + " pixels");
  CHECK(bad_negative == 0, what + " negative weights: " + std::to_string(bad_negative));
  CHECK(bad_remainder == 0,
        what + " vertex coordinates not congruent to their remainder: " + std::to_string(bad_remainder));
  CHECK(bad_reconstruct == 0,
        what + " barycentric interpolation misses the elevated point: " + std::to_string(bad_reconstruct));
}

void test_numbering(const Built& b, const std::vector<double>& img, int64_t h, int64_t w, double sxy, double srgb) {
  const std::string what = tag("numbering", h, w, sxy, srgb);
  const int64_t n = h * w;
  std::map<std::vector<int64_t>, int32_t> number;
  std::vector<std::vector<int64_t>> keys;
  int64_t bad = 0;
  for (int64_t p = 0; p < n; ++p) {
    const std::vector<double> f = features_of(img, h, w, p, sxy, srgb);
    pl::Simplex<double> s;
    pl::locate(f.data(), &s);
    for (int r = 0; r < kVertices; ++r) {
      const std::vector<int64_t> k = full_key(s.keys[r]);
      auto it = number.find(k);
      if (it == number.end()) {
        it = number.emplace(k, static_cast<int32_t>(keys.size())).first;
        keys.push_back(k);
      }
      bad += b.index[p * kVertices + r] != it->second;
      bad += b.weight[p * kVertices + r] != s.weights[r];
    }
  }
  CHECK(static_cast<int64_t>(keys.size()) == b.lattice.num_vertices,
        what + " vertex count " + std::to_string(b.lattice.num_vertices) + " vs " + std::to_string(keys.size()));
  CHECK(bad == 0, what + " splat entries differ from first-use numbering: " + std::to_string(bad));
  const int64_t V = static_cast<int64_t>(keys.size());
  int64_t bad_neighbours = 0;
  for (int axis = 0; axis < kVertices && V == b.lattice.num_vertices; ++axis) {
    for (int64_t v = 0; v < V; ++v) {
      for (int side = 0; side < 2; ++side) {
        std::vector<int64_t> k = keys[v];
        const int64_t sign = side == 0 ? 1 : -1;  // side 0: + e_axis, e_axis = (d+1) unit_axis - 1
        for (int i = 0; i < kVertices; ++i) k[i] += sign * ((i == axis ? kVertices : 0) - 1);
        const auto it = number.find(k);
        const int32_t want = it == number.end() ? -1 : it->second;
        bad_neighbours += b.lattice.neighbours[(axis * V + v) * 2 + side] != want;
      }
    }
  }
  CHECK(bad_neighbours == 0, what + " neighbour table entries wrong: " + std::to_string(bad_neighbours));
}

// Dense (N x N) matrix of the lattice filter, alpha S^T B S, with B the blurs
// in the given axis order, built from the splat entries and neighbour table.
std::vector<double> dense_filter_matrix(const Built& b, int64_t n, bool reverse) {
  const int64_t V = b.lattice.num_vertices;
  std::vector<double> grid(static_cast<size_t>(V * n), 0.0);  // grid[v][p] = S
  for (int64_t p = 0; p < n; ++p) {
    for (int r = 0; r < kVertices; ++r) grid[b.index[p * kVertices + r] * n + p] += b.weight[p * kVertices + r];
  }
  std::vector<double> next(grid.size());
  for (int step = 0; step < kVertices; ++step) {
    const int axis = reverse ? kDim - step : step;
    for (int64_t v = 0; v < V; ++v) {
      const int32_t down = b.lattice.neighbours[(axis * V + v) * 2];
      const int32_t up = b.lattice.neighbours[(axis * V + v) * 2 + 1];
      for (int64_t p = 0; p < n; ++p) {
        double x = grid[v * n + p];
        if (down >= 0) x += 0.5 * grid[down * n + p];
        if (up >= 0) x += 0.5 * grid[up * n + p];
        next[v * n + p] = x;
      }
    }
    grid.swap(next);
  }
  std::vector<double> L(static_cast<size_t>(n * n), 0.0);
  const double alpha = pl::alpha<double>();
  for (int64_t i = 0; i < n; ++i) {
    for (int r = 0; r < kVertices; ++r) {
      const int64_t v = b.index[i * kVertices + r];
      const double wv = b.weight[i * kVertices + r];
      for (int64_t j = 0; j < n; ++j) L[i * n + j] += alpha * wv * grid[v * n + j];
    }
  }
  return L;
}

double max_abs(const std::vector<double>& v) {
  double m = 0.0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

void test_filter(const Built& b, const std::vector<double>& img, int64_t h, int64_t w, double sxy, double srgb,
                 int64_t channels, uint64_t seed) {
  const std::string what = tag("filter", h, w, sxy, srgb);
  const int64_t n = h * w;
  const std::vector<double> L = dense_filter_matrix(b, n, false);
  const std::vector<double> LT = dense_filter_matrix(b, n, true);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  std::vector<double> values(static_cast<size_t>(channels * n));
  for (auto& v : values) v = unit(rng);
  std::vector<uint8_t> mask(static_cast<size_t>(n));
  for (auto& m : mask) m = unit(rng) < 0.8;
  const pl::Lattice<double> lattice = b.view(n);

  for (int variant = 0; variant < 4; ++variant) {
    const bool reverse = variant & 1;
    const bool masked = variant & 2;
    pl::cpu::FilterInput<double> input;
    input.values = values.data();
    input.channels = channels;
    input.mask = masked ? mask.data() : nullptr;
    input.append_mask = masked || variant == 1;
    const int64_t out_channels = input.filtered_channels();
    std::vector<double> out(static_cast<size_t>(out_channels * n), -1.0);
    const int32_t status = pl::cpu::filter_image<double>(lattice, 0, input, reverse, out.data(), pl::cpu::run_serially);
    CHECK(status == 0, what + " status " + std::to_string(status) + " for finite values and a sound lattice");
    const std::vector<double>& M = reverse ? LT : L;
    double worst = 0.0, scale = 0.0;
    for (int64_t c = 0; c < out_channels; ++c) {
      for (int64_t i = 0; i < n; ++i) {
        double want = 0.0;
        for (int64_t j = 0; j < n; ++j) {
          const double m = masked ? mask[j] : 1.0;
          const double x = c < channels ? values[c * n + j] * m : m;
          want += M[i * n + j] * x;
        }
        worst = std::max(worst, std::fabs(out[c * n + i] - want));
        scale = std::max(scale, std::fabs(want));
      }
    }
    CHECK(worst <= 1e-12 * std::max(scale, 1.0),
          what + " variant " + std::to_string(variant) + " differs from the dense matrix by " + std::to_string(worst));
    // The same result, bit for bit, whatever the split into ranges.
    for (int64_t piece : {1, 3, 1000}) {
      std::vector<double> again(out.size(), -2.0);
      pl::cpu::filter_image<double>(lattice, 0, input, reverse, again.data(), chunked(piece));
      CHECK(again == out,
            what + " variant " + std::to_string(variant) + " depends on the range split " + std::to_string(piece));
    }
  }
  // The reverse filter is the transpose.
  double asym = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) asym = std::max(asym, std::fabs(L[i * n + j] - LT[j * n + i]));
  }
  CHECK(asym <= 1e-14 * max_abs(L), what + " reverse filter is not the transpose: " + std::to_string(asym));
  // Every entry >= 0, and the self-affinity lower bound never exceeds the diagonal.
  int64_t negative = 0, above_diagonal = 0;
  double slack_min = 1e9, slack_max = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) negative += L[i * n + j] < 0.0;
    const double c = pl::self_affinity_lower_bound(b.weight.data() + i * kVertices);
    const double slack = L[i * n + i] - c;
    above_diagonal += slack < -1e-14;
    slack_min = std::min(slack_min, slack);
    slack_max = std::max(slack_max, slack);
  }
  CHECK(negative == 0, what + " negative filter weights: " + std::to_string(negative));
  CHECK(above_diagonal == 0, what + " self-affinity bound above L_ii for " + std::to_string(above_diagonal) +
                                 " pixels (min slack " + std::to_string(slack_min) + ")");
  std::printf("%s V=%lld  L_ii - c_i in [%.4f, %.4f]\n", what.c_str(), static_cast<long long>(b.lattice.num_vertices),
              slack_min, slack_max);
}

// E, Z, and dE/dS from dense matrices: W = (L + L^T)/2 - diag(c).
struct DenseLoss {
  double energy = 0.0, normaliser = 0.0;
  std::vector<double> grad;
};

DenseLoss dense_loss(const std::vector<double>& L, const std::vector<double>& c, const std::vector<double>& probs,
                     const std::vector<uint8_t>& mask, int64_t channels, int64_t n) {
  std::vector<double> W(static_cast<size_t>(n * n));
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) W[i * n + j] = 0.5 * (L[i * n + j] + L[j * n + i]) - (i == j ? c[i] : 0.0);
  }
  DenseLoss out;
  out.grad.assign(static_cast<size_t>(channels * n), 0.0);
  std::vector<double> wm(static_cast<size_t>(n), 0.0);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) wm[i] += W[i * n + j] * mask[j];
    out.normaliser += mask[i] * wm[i];
  }
  for (int64_t k = 0; k < channels; ++k) {
    std::vector<double> s(static_cast<size_t>(n)), ws(static_cast<size_t>(n), 0.0);
    for (int64_t i = 0; i < n; ++i) s[i] = probs[k * n + i] * mask[i];
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < n; ++j) ws[i] += W[i * n + j] * s[j];
    }
    for (int64_t i = 0; i < n; ++i) {
      out.energy += s[i] * (wm[i] - ws[i]);
      out.grad[k * n + i] = mask[i] * (wm[i] - 2.0 * ws[i]);
    }
  }
  return out;
}

void test_loss(const Built& b, int64_t h, int64_t w, double sxy, double srgb, int64_t channels, bool with_mask,
               uint64_t seed) {
  const std::string what = tag(with_mask ? "loss masked" : "loss", h, w, sxy, srgb);
  const int64_t n = h * w;
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  std::vector<double> probs(static_cast<size_t>(channels * n));
  for (int64_t i = 0; i < n; ++i) {  // a softmax-like map: positive, summing to 1
    double total = 0.0;
    for (int64_t k = 0; k < channels; ++k) total += (probs[k * n + i] = 0.05 + unit(rng));
    for (int64_t k = 0; k < channels; ++k) probs[k * n + i] /= total;
  }
  std::vector<uint8_t> mask(static_cast<size_t>(n), 1);
  if (with_mask) {
    for (auto& m : mask) m = unit(rng) < 0.7;
  }
  const pl::Lattice<double> lattice = b.view(n);
  const uint8_t* mask_ptr = with_mask ? mask.data() : nullptr;
  pl::cpu::FilterInput<double> input;
  input.values = probs.data();
  input.channels = channels;
  input.mask = mask_ptr;
  input.append_mask = true;
  std::vector<double> forward(static_cast<size_t>((channels + 1) * n)), reversed(forward.size());
  pl::cpu::filter_image<double>(lattice, 0, input, false, forward.data(), pl::cpu::run_serially);
  pl::cpu::filter_image<double>(lattice, 0, input, true, reversed.data(), pl::cpu::run_serially);
  double energy = 0.0, normaliser = 0.0;
  const int32_t status = dc::cpu::energy_image<double>(probs.data(), channels, mask_ptr, forward.data(),
                                                       b.weight.data(), n, &energy, &normaliser, pl::cpu::run_serially);
  CHECK(status == 0, what + " status " + std::to_string(status) + " for valid probabilities");
  const double scale = 0.75;
  std::vector<double> grad(static_cast<size_t>(channels * n));
  dc::cpu::gradient_image<double>(probs.data(), channels, mask_ptr, forward.data(), reversed.data(), b.weight.data(), n,
                                  scale, grad.data(), pl::cpu::run_serially);

  const std::vector<double> L = dense_filter_matrix(b, n, false);
  std::vector<double> c(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) c[i] = pl::self_affinity_lower_bound(b.weight.data() + i * kVertices);
  const DenseLoss want = dense_loss(L, c, probs, mask, channels, n);
  CHECK(std::fabs(energy - want.energy) <= 1e-11 * std::fabs(want.normaliser),
        what + " E " + std::to_string(energy) + " vs dense " + std::to_string(want.energy));
  CHECK(std::fabs(normaliser - want.normaliser) <= 1e-11 * std::fabs(want.normaliser),
        what + " Z " + std::to_string(normaliser) + " vs dense " + std::to_string(want.normaliser));
  CHECK(energy >= 0.0 && energy <= normaliser * (1 + 1e-12),
        what + " E / Z = " + std::to_string(energy / normaliser) + " outside [0, 1] for probabilities summing to 1");
  double worst = 0.0;
  for (size_t i = 0; i < grad.size(); ++i) worst = std::max(worst, std::fabs(grad[i] - scale * want.grad[i]));
  CHECK(worst <= 1e-11 * max_abs(want.grad),
        what + " gradient differs from the dense formula by " + std::to_string(worst));
  // Central differences of E (the energy pass alone, refiltering the perturbed input).
  int64_t fd_bad = 0;
  const double eps = 1e-6;
  for (int64_t t = 0; t < 12; ++t) {
    const int64_t k = static_cast<int64_t>(rng() % channels);
    const int64_t i = static_cast<int64_t>(rng() % n);
    double e_at[2];
    for (int side = 0; side < 2; ++side) {
      std::vector<double> shifted = probs;
      shifted[k * n + i] += side == 0 ? eps : -eps;
      input.values = shifted.data();
      std::vector<double> f(forward.size());
      pl::cpu::filter_image<double>(lattice, 0, input, false, f.data(), pl::cpu::run_serially);
      double z;
      dc::cpu::energy_image<double>(shifted.data(), channels, mask_ptr, f.data(), b.weight.data(), n, &e_at[side], &z,
                                    pl::cpu::run_serially);
    }
    input.values = probs.data();
    const double fd = scale * (e_at[0] - e_at[1]) / (2 * eps);
    fd_bad += std::fabs(fd - grad[k * n + i]) > 1e-7 * std::max(1.0, max_abs(want.grad));
  }
  CHECK(fd_bad == 0, what + " gradient differs from central differences at " + std::to_string(fd_bad) + " of 12");
  // Split-independence of the loss passes.
  double energy2 = 0.0, normaliser2 = 0.0;
  dc::cpu::energy_image<double>(probs.data(), channels, mask_ptr, forward.data(), b.weight.data(), n, &energy2,
                                &normaliser2, chunked(1));
  CHECK(energy2 == energy && normaliser2 == normaliser, what + " energy depends on the range split");
  std::vector<double> grad2(grad.size());
  dc::cpu::gradient_image<double>(probs.data(), channels, mask_ptr, forward.data(), reversed.data(), b.weight.data(), n,
                                  scale, grad2.data(), chunked(1));
  CHECK(grad2 == grad, what + " gradient depends on the range split");
  // Out-of-range probabilities are reported.
  std::vector<double> bad = probs;
  bad[rng() % bad.size()] = std::numeric_limits<double>::quiet_NaN();
  CHECK(dc::cpu::energy_image<double>(bad.data(), channels, mask_ptr, forward.data(), b.weight.data(), n, &energy2,
                                      &normaliser2, pl::cpu::run_serially) == dc::kProbsOutOfRange,
        what + " NaN probability not reported");
  bad = probs;
  bad[rng() % bad.size()] = 1.5;
  CHECK(dc::cpu::energy_image<double>(bad.data(), channels, mask_ptr, forward.data(), b.weight.data(), n, &energy2,
                                      &normaliser2, pl::cpu::run_serially) == dc::kProbsOutOfRange,
        what + " probability 1.5 not reported");
}

// The lattice against the exact Gaussian: the normalised filter L v / L 1 is close.
void test_against_gaussian() {
  const int64_t h = 24, w = 28, n = h * w;
  const double sxy = 6.0, srgb = 20.0;
  const std::vector<double> img = make_image(h, w, 99);
  const Built b = build(img, h, w, sxy, srgb);
  std::vector<double> values(static_cast<size_t>(n));
  for (int64_t p = 0; p < n; ++p) values[p] = img[p] / 255.0;  // a smooth signal
  pl::cpu::FilterInput<double> input;
  input.values = values.data();
  input.channels = 1;
  input.append_mask = true;  // the filter of ones
  std::vector<double> out(static_cast<size_t>(2 * n));
  pl::cpu::filter_image<double>(b.view(n), 0, input, false, out.data(), pl::cpu::run_serially);
  double err = 0.0, norm = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const std::vector<double> fi = features_of(img, h, w, i, sxy, srgb);
    double num = 0.0, den = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      const std::vector<double> fj = features_of(img, h, w, j, sxy, srgb);
      double d2 = 0.0;
      for (int k = 0; k < kDim; ++k) d2 += (fi[k] - fj[k]) * (fi[k] - fj[k]);
      const double kij = std::exp(-0.5 * d2);
      num += kij * values[j];
      den += kij;
    }
    const double exact = num / den;
    const double lattice = out[i] / out[n + i];
    err += (lattice - exact) * (lattice - exact);
    norm += exact * exact;
  }
  const double rel = std::sqrt(err / norm);
  std::printf("normalised lattice filter vs exact Gaussian: relative L2 error %.4f\n", rel);
  CHECK(rel < 0.03, "normalised lattice filter far from the exact Gaussian: " + std::to_string(rel));
}

void test_status() {
  const int64_t h = 5, w = 6, n = h * w;
  std::vector<double> img = make_image(h, w, 3);
  img[17] = std::numeric_limits<double>::quiet_NaN();
  Built b = build(img, h, w, 5.0, 15.0);
  CHECK(b.lattice.status == pl::kImageNotFinite, "NaN image not reported: status " + std::to_string(b.lattice.status));
  img = make_image(h, w, 3);
  img[2 * n + 4] = std::numeric_limits<double>::infinity();
  b = build(img, h, w, 5.0, 15.0);
  CHECK(b.lattice.status == pl::kImageNotFinite, "Inf image not reported");
  img = make_image(h, w, 3);
  b = build(img, h, w, 1e-7, 15.0);
  CHECK(b.lattice.status == pl::kFeaturesTooLarge,
        "huge features not reported: status " + std::to_string(b.lattice.status));
  b = build(img, h, w, 5.0, 15.0);
  CHECK(b.lattice.status == 0, "a clean image reported a status");
  std::vector<double> values(static_cast<size_t>(2 * n), 0.5);
  values[n + 3] = std::numeric_limits<double>::infinity();
  pl::cpu::FilterInput<double> input;
  input.values = values.data();
  input.channels = 2;
  std::vector<double> out(values.size());
  CHECK(pl::cpu::filter_image<double>(b.view(n), 0, input, false, out.data(), pl::cpu::run_serially) ==
            pl::kValuesNotFinite,
        "Inf value not reported by the filter");
  std::vector<uint8_t> mask(static_cast<size_t>(n), 1);
  mask[3] = 0;  // the Inf pixel is masked out: it is never read
  input.mask = mask.data();
  CHECK(pl::cpu::filter_image<double>(b.view(n), 0, input, false, out.data(), pl::cpu::run_serially) == 0,
        "a masked-out Inf value was reported");
  // A corrupt lattice (vertex or neighbour numbers out of range) is reported, and read safely.
  Built corrupt = b;
  corrupt.index[7] = static_cast<int32_t>(corrupt.lattice.num_vertices);
  input.mask = nullptr;
  values[n + 3] = 0.5;
  CHECK(pl::cpu::filter_image<double>(corrupt.view(n), 0, input, false, out.data(), pl::cpu::run_serially) ==
            pl::kLatticeCorrupt,
        "a vertex number out of range was not reported");
  corrupt = b;
  corrupt.index[0] = -3;
  CHECK(pl::cpu::filter_image<double>(corrupt.view(n), 0, input, true, out.data(), pl::cpu::run_serially) ==
            pl::kLatticeCorrupt,
        "a negative vertex number was not reported");
  corrupt = b;
  corrupt.lattice.neighbours[5] = -2;
  CHECK(pl::cpu::filter_image<double>(corrupt.view(n), 0, input, false, out.data(), pl::cpu::run_serially) ==
            pl::kLatticeCorrupt,
        "a neighbour number out of range was not reported");
  corrupt = b;
  corrupt.lattice.neighbours[9] = static_cast<int32_t>(corrupt.lattice.num_vertices) + 4;
  CHECK(pl::cpu::filter_image<double>(corrupt.view(n), 0, input, true, out.data(), pl::cpu::run_serially) ==
            pl::kLatticeCorrupt,
        "a neighbour number beyond the vertices was not reported");
}

// Float and double lattices agree where the rounding leaves the same simplices.
void test_float_matches_double() {
  const int64_t h = 20, w = 30, n = h * w;
  const std::vector<double> img = make_image(h, w, 8);
  std::vector<float> imgf(img.begin(), img.end());
  const Built b = build(img, h, w, 7.0, 15.0);
  std::vector<int32_t> index(static_cast<size_t>(n * kVertices));
  std::vector<float> weight(index.size());
  pl::cpu::ImageLattice lf;
  pl::cpu::build_lattice<float>(imgf.data(), h, w, 7.0, 15.0, index.data(), weight.data(), &lf);
  int64_t same = 0;
  double worst = 0.0;
  for (size_t i = 0; i < index.size(); ++i) {
    same += index[i] == b.index[i];
    worst = std::max(worst, std::fabs(static_cast<double>(weight[i]) - b.weight[i]));
  }
  CHECK(lf.num_vertices == b.lattice.num_vertices && same == static_cast<int64_t>(index.size()),
        "float lattice numbers vertices differently from double");
  CHECK(worst < 1e-5, "float weights differ from double by " + std::to_string(worst));
}

// A runner with several workers lays wide vertex rows out in whole 64-byte
// blocks and splits the splat among them (18 doubles: rows of 24 instead of
// 20; 30 doubles: 32 either way, split in 4 blocks); the result is the same,
// bit for bit, as the serial filter's.  The image is big enough (pixels x
// channels >= 2^18) for the split to happen.
void test_worker_layout_is_invisible() {
  const int64_t h = 120, w = 130, n = h * w;
  const std::vector<double> img = make_image(h, w, 9);
  const Built b = build(img, h, w, 9.0, 15.0);
  std::mt19937_64 rng(17);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  for (int64_t channels : {int64_t{18}, int64_t{30}}) {
    std::vector<double> values(static_cast<size_t>(channels * n));
    for (auto& v : values) v = unit(rng);
    pl::cpu::FilterInput<double> input;
    input.values = values.data();
    input.channels = channels;
    for (bool reverse : {false, true}) {
      std::vector<double> serial(values.size(), -1.0), split(values.size(), -2.0);
      pl::cpu::filter_image<double>(b.view(n), 0, input, reverse, serial.data(), pl::cpu::run_serially);
      const pl::cpu::RangeRunner workers(chunked(1).run, 3);
      pl::cpu::filter_image<double>(b.view(n), 0, input, reverse, split.data(), workers);
      CHECK(split == serial, "filter with 3 workers differs from the serial one, " + std::to_string(channels) +
                                 " channels" + (reverse ? ", reverse" : ""));
    }
  }
}

}  // namespace

int main() {
  struct Case {
    int64_t h, w;
    double sxy, srgb;
    int64_t channels;
  };
  const Case cases[] = {
      {1, 1, 3.0, 15.0, 2},  {1, 9, 2.0, 10.0, 3},    {7, 1, 2.0, 10.0, 1},   {6, 8, 3.0, 15.0, 4},
      {9, 11, 1.0, 5.0, 21}, {10, 12, 30.0, 60.0, 5}, {8, 13, 4.0, 15.0, 17},
  };
  uint64_t seed = 1;
  for (const Case& c : cases) {
    const std::vector<double> img = make_image(c.h, c.w, seed);
    const Built b = build(img, c.h, c.w, c.sxy, c.srgb);
    CHECK(b.lattice.status == 0, tag("build", c.h, c.w, c.sxy, c.srgb) + " status");
    test_simplices(img, c.h, c.w, c.sxy, c.srgb);
    test_numbering(b, img, c.h, c.w, c.sxy, c.srgb);
    test_filter(b, img, c.h, c.w, c.sxy, c.srgb, c.channels, seed + 100);
    test_loss(b, c.h, c.w, c.sxy, c.srgb, c.channels, false, seed + 200);
    test_loss(b, c.h, c.w, c.sxy, c.srgb, c.channels, true, seed + 300);
    ++seed;
  }
  test_against_gaussian();
  test_status();
  test_float_matches_double();
  test_worker_layout_is_invisible();
  std::printf("permutohedral_core: %lld checks, %lld failed\n", static_cast<long long>(g_checks),
              static_cast<long long>(g_failures));
  return g_failures == 0 ? 0 : 1;
}
