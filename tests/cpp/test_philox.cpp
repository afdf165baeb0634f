// Torch-free tests of the counter-based generator and the float math the
// uncertainty kernels draw their noise with:
//
// * Philox4x32-10 against the known-answer vectors of Random123
//   (kat_vectors, the three "philox4x32 10" lines: counter, key, output);
// * the branch-free float exp, log, sine/cosine, log1p, softplus and sigmoid
//   of vector_math.h against the C library in double;
// * float Box-Muller against double Box-Muller on the same draws, and the
//   moments of the normals the kernels see.
#include <cmath>
#include <cstdio>
#include <random>
#include <string>

#include "boxloss/common/philox.h"
#include "boxloss/common/vector_math.h"
#include "boxloss/uncertainty/math.h"
#include "test_support.h"

namespace {

namespace bm = boxloss::math;

void test_known_answers() {
  struct Vector {
    uint32_t counter[4];
    uint32_t key[2];
    uint32_t expected[4];
  };
  const Vector vectors[] = {
      {{0x00000000u, 0x00000000u, 0x00000000u, 0x00000000u},
       {0x00000000u, 0x00000000u},
       {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
       {0xffffffffu, 0xffffffffu},
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
       {0xa4093822u, 0x299f31d0u},
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const Vector& v : vectors) {
    uint32_t x0 = v.counter[0], x1 = v.counter[1], x2 = v.counter[2], x3 = v.counter[3];
    boxloss::philox::philox4x32_10(v.key[0], v.key[1], x0, x1, x2, x3);
    // The same generator on 64-bit words (the AVX-512 lane loops).
    uint64_t w0 = v.counter[0], w1 = v.counter[1], w2 = v.counter[2], w3 = v.counter[3];
    boxloss::philox::philox4x32_10<uint64_t>(v.key[0], v.key[1], w0, w1, w2, w3);
    const uint32_t got[4] = {x0, x1, x2, x3};
    const uint64_t got64[4] = {w0, w1, w2, w3};
    for (int i = 0; i < 4; ++i) {
      char context[128];
      std::snprintf(context, sizeof(context), "word %d: got %08x, expected %08x", i, got[i], v.expected[i]);
      CHECK(got[i] == v.expected[i], context);
      std::snprintf(context, sizeof(context), "64-bit word %d: got %016llx, expected %08x", i,
                    static_cast<unsigned long long>(got64[i]), v.expected[i]);
      CHECK(got64[i] == v.expected[i], context);
    }
  }
  // Random counters and keys: both word types and a plain 64-bit-product
  // implementation of the rounds agree.
  std::mt19937 rng(3);
  for (int n = 0; n < 20000; ++n) {
    uint32_t c[4] = {static_cast<uint32_t>(rng()), static_cast<uint32_t>(rng()), static_cast<uint32_t>(rng()),
                     static_cast<uint32_t>(rng())};
    uint32_t k0 = rng(), k1 = rng();
    uint32_t x[4] = {c[0], c[1], c[2], c[3]};
    uint64_t w[4] = {c[0], c[1], c[2], c[3]};
    boxloss::philox::philox4x32_10(k0, k1, x[0], x[1], x[2], x[3]);
    boxloss::philox::philox4x32_10<uint64_t>(k0, k1, w[0], w[1], w[2], w[3]);
    uint32_t r[4] = {c[0], c[1], c[2], c[3]};
    for (int round = 0; round < 10; ++round) {
      const uint64_t p0 = uint64_t{0xD2511F53u} * r[0], p1 = uint64_t{0xCD9E8D57u} * r[2];
      const uint32_t next[4] = {static_cast<uint32_t>(p1 >> 32) ^ r[1] ^ k0, static_cast<uint32_t>(p1),
                                static_cast<uint32_t>(p0 >> 32) ^ r[3] ^ k1, static_cast<uint32_t>(p0)};
      for (int i = 0; i < 4; ++i) r[i] = next[i];
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    bool same = true;
    for (int i = 0; i < 4; ++i) same = same && x[i] == r[i] && w[i] == r[i];
    CHECK(same, "random counter: 32-bit words, 64-bit words and the plain rounds agree");
  }
}

double relative_error(double got, double want) { return std::fabs(got - want) / std::fmax(std::fabs(want), 1e-300); }

void test_float_math() {
  std::mt19937 rng(7);
  double worst_exp = 0, worst_log = 0, worst_sincos = 0, worst_log1p = 0, worst_softplus = 0, worst_sigmoid = 0;
  std::uniform_real_distribution<float> exp_arg(-87.0f, 88.0f);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  std::uniform_real_distribution<float> exponent(-125.0f, 127.0f);
  std::uniform_real_distribution<float> wide(-60.0f, 60.0f);
  for (int i = 0; i < 200000; ++i) {
    const float x = exp_arg(rng);
    worst_exp = std::fmax(worst_exp, relative_error(bm::exp_clamped(x), std::exp(double(x))));
    const float y = std::ldexp(1.0f + unit(rng), static_cast<int>(exponent(rng)));
    worst_log = std::fmax(worst_log, std::fabs(bm::log_positive(y) - std::log(double(y))) /
                                         std::fmax(1.0, std::fabs(std::log(double(y)))));
    const float u = unit(rng);
    float s, c;
    bm::sincos_turns(u, &s, &c);
    const double angle = 6.283185307179586476925 * double(u);
    worst_sincos = std::fmax(worst_sincos, std::fmax(std::fabs(s - std::sin(angle)), std::fabs(c - std::cos(angle))));
    const float e = unit(rng) * (i % 2 ? 1.0f : 1e-20f);
    worst_log1p = std::fmax(worst_log1p, relative_error(bm::log1p_unit(e), std::log1p(double(e))));
    const float z = wide(rng);
    const double sp = std::fmax(double(z), 0.0) + std::log1p(std::exp(-std::fabs(double(z))));
    worst_softplus = std::fmax(worst_softplus, relative_error(bm::softplus(z), sp));
    worst_sigmoid = std::fmax(worst_sigmoid, relative_error(bm::sigmoid(z), 1.0 / (1.0 + std::exp(-double(z)))));
  }
  const auto report = [](const char* name, double value, double bound) {
    char context[128];
    std::snprintf(context, sizeof(context), "%s: worst error %.3g, bound %.3g", name, value, bound);
    CHECK(value <= bound, context);
  };
  report("exp_clamped relative", worst_exp, 3e-7);
  report("log_positive (relative, absolute below 1)", worst_log, 3e-7);
  report("sincos_turns absolute", worst_sincos, 3e-7);
  report("log1p_unit relative", worst_log1p, 3e-7);
  report("softplus relative", worst_softplus, 5e-7);
  report("sigmoid relative", worst_sigmoid, 5e-7);
  // The clamps: finite, normal results far outside the range.
  CHECK(std::isfinite(bm::exp_clamped(1e30f)) && bm::exp_clamped(-1e30f) > 0.0f, "exp_clamped clamps");
  CHECK(bm::softplus(-1e4f) >= 0.0f && bm::softplus(1e4f) == 1e4f, "softplus at +-1e4");
  CHECK(bm::sigmoid(1e4f) == 1.0f && bm::sigmoid(-1e4f) >= 0.0f && bm::sigmoid(-1e4f) < 1e-30f, "sigmoid at +-1e4");
}

void test_box_muller() {
  std::mt19937 rng(11);
  double worst = 0;
  double sum = 0, sum2 = 0, sum4 = 0;
  const int pairs = 500000;
  for (int i = 0; i < pairs; ++i) {
    const uint32_t a = rng(), b = rng();
    float f0, f1;
    double d0, d1;
    boxloss::philox::box_muller(a, b, &f0, &f1);
    boxloss::philox::box_muller(a, b, &d0, &d1);
    worst = std::fmax(worst, std::fmax(std::fabs(f0 - d0), std::fabs(f1 - d1)));
    for (double z : {d0, d1}) {
      sum += z;
      sum2 += z * z;
      sum4 += z * z * z * z;
    }
  }
  // The extreme draws: u = 2^-33 (largest radius) and u = 1 - 2^-33.
  for (uint32_t a : {0u, 1u, 0xffffffffu}) {
    float f0, f1;
    double d0, d1;
    boxloss::philox::box_muller(a, 0x40000000u, &f0, &f1);
    boxloss::philox::box_muller(a, 0x40000000u, &d0, &d1);
    CHECK(std::isfinite(f0) && std::isfinite(f1), "float Box-Muller finite at the extreme draws");
    worst = std::fmax(worst, std::fmax(std::fabs(f0 - d0), std::fabs(f1 - d1)));
  }
  char context[128];
  std::snprintf(context, sizeof(context), "float vs double Box-Muller: worst absolute difference %.3g", worst);
  // Largest where u rounds to 1 in float (r = 0 against sqrt(2^-32) = 1.5e-5).
  CHECK(worst < 2e-5, context);
  const double n = 2.0 * pairs;
  const double mean = sum / n, var = sum2 / n - mean * mean, kurtosis = sum4 / n;
  std::snprintf(context, sizeof(context), "normal moments: mean %.4f, variance %.4f, E z^4 %.4f", mean, var, kurtosis);
  CHECK(std::fabs(mean) < 0.005 && std::fabs(var - 1) < 0.01 && std::fabs(kurtosis - 3) < 0.05, context);
}

// The noise layout: class 4k + j of a block, pixels split into two words.
void test_noise_layout() {
  const auto key = boxloss::uncertainty::make_noise_key(0x0123456789abcdefull, 3);
  CHECK(key.k0 == 0x89abcdefu && key.k1 == 0x01234567u, "key words");
  const uint64_t pixel = (uint64_t{5} << 32) + 17;
  const auto words = boxloss::uncertainty::pixel_words(key, pixel);
  CHECK(words.lo == 17u && words.hi == 8u, "pixel words: low 32 bits, high bits + offset");
  double z[4];
  boxloss::uncertainty::noise_block(key, 2, 9, words.lo, words.hi, &z[0], &z[1], &z[2], &z[3]);
  uint32_t x0 = 2, x1 = 9, x2 = 17, x3 = 8;
  boxloss::philox::philox4x32_10(key.k0, key.k1, x0, x1, x2, x3);
  double e0, e1, e2, e3;
  boxloss::philox::box_muller(x0, x1, &e0, &e1);
  boxloss::philox::box_muller(x2, x3, &e2, &e3);
  CHECK(z[0] == e0 && z[1] == e1 && z[2] == e2 && z[3] == e3,
        "noise_block = Box-Muller of Philox(class block, sample, pixel)");
}

}  // namespace

int main() {
  test_known_answers();
  test_float_math();
  test_box_muller();
  test_noise_layout();
  std::printf("%lld checks, %lld failures\n", static_cast<long long>(g_checks), static_cast<long long>(g_failures));
  return g_failures == 0 ? 0 : 1;
}
