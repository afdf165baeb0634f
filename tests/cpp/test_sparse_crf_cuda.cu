// CUDA launchers of the Sparse-CRF kernels (csrc/kernels/sparse_crf/*.cu)
// against the CPU core, without torch.  Built by CMakeLists.txt only when a
// CUDA compiler is found; exits with 77 (ctest: skipped) when no device is.
//
// For float and double on a few problems: the forward's partial sums, summed
// per image, match the CPU core's row sums summed per image; the per-image
// status matches the OR of the CPU's row statuses; the backward gradient
// matches the CPU core's, and unselected channels keep their old values.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "boxloss/sparse_crf/cpu.h"
#include "boxloss/sparse_crf/cuda.h"
#include "boxloss/sparse_crf/problem.h"
#include "cuda_test_support.h"

namespace {

using boxloss::acc_t;
using boxloss::sparse_crf::Kind;
using boxloss::sparse_crf::Problem;
namespace sc = boxloss::sparse_crf;

struct Config {
  const char* name;
  int64_t batch, num_channels, height, width, image_channels;
  int32_t neighbourhood, dilation;
  bool with_mask;
  std::vector<int32_t> channels;  // empty: all
  Kind kind;
  double sigma;
  bool bad_values;  // a NaN in probs of the last image and an Inf in the image of the first
};

cudaError_t upload(DeviceBuffer* buffer, const void* host, size_t bytes) {
  cudaError_t err = cudaMalloc(&buffer->ptr, bytes == 0 ? 1 : bytes);
  if (err != cudaSuccess) return err;
  if (bytes == 0) return cudaSuccess;
  return cudaMemcpy(buffer->ptr, host, bytes, cudaMemcpyHostToDevice);
}

template <typename T>
struct DTypeOf;
template <>
struct DTypeOf<float> {
  static constexpr sc::cuda::DType value = sc::cuda::DType::kFloat32;
  static constexpr double rel = 1e-4;  // float sums in different orders on CPU and GPU
  static constexpr const char* name = "float";
};
template <>
struct DTypeOf<double> {
  static constexpr sc::cuda::DType value = sc::cuda::DType::kFloat64;
  static constexpr double rel = 1e-11;
  static constexpr const char* name = "double";
};

template <typename T>
void run_case(const Config& config, uint64_t seed) {
  using acc = acc_t<T>;
  const std::string what = std::string("[") + DTypeOf<T>::name + " " + config.name + "]";
  const int64_t plane = config.height * config.width;
  const int64_t rows = config.batch * config.height;

  // Host inputs.
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  std::vector<T> probs(static_cast<size_t>(config.batch * config.num_channels * plane));
  for (auto& v : probs) v = static_cast<T>(unit(rng));
  std::vector<T> image(static_cast<size_t>(config.batch * config.image_channels * plane));
  for (auto& v : image) v = static_cast<T>(unit(rng));
  std::vector<uint8_t> valid;
  if (config.with_mask) {
    valid.resize(static_cast<size_t>(config.batch * plane));
    for (auto& v : valid) v = unit(rng) < 0.75 ? 1 : 0;
  }
  std::vector<acc> scale;
  for (int64_t b = 0; b < config.batch; ++b)
    scale.push_back(static_cast<acc>((b % 2 ? -1.0 : 1.0) * (0.5 + unit(rng))));
  std::vector<bool> is_selected(static_cast<size_t>(config.num_channels), config.channels.empty());
  for (int32_t c : config.channels) is_selected[static_cast<size_t>(c)] = true;
  if (config.bad_values) {
    const int64_t first_selected = config.channels.empty() ? 0 : config.channels[0];
    probs[static_cast<size_t>(((config.batch - 1) * config.num_channels + first_selected) * plane + plane / 2)] =
        std::numeric_limits<T>::quiet_NaN();
    image[static_cast<size_t>(plane - 1)] = std::numeric_limits<T>::infinity();
  }

  const Problem host_problem =
      make_problem(config, probs.data(), image.data(), valid.empty() ? nullptr : valid.data(), config.channels.data());

  // CPU reference.
  std::vector<double> row_sums(static_cast<size_t>(rows));
  std::vector<int32_t> row_status(static_cast<size_t>(rows));
  sc::cpu::forward_rows<T>(host_problem, 0, rows, row_sums.data(), row_status.data());
  const T sentinel = static_cast<T>(12345);
  std::vector<T> grad_cpu(probs.size(), sentinel);
  sc::cpu::backward_rows<T>(host_problem, scale.data(), 0, rows, grad_cpu.data());

  // Device inputs: every pointer in the Problem the kernels see is a device pointer.
  DeviceBuffer d_probs, d_image, d_valid, d_channels, d_scale, d_partials, d_status, d_grad;
  CUDA_OK(upload(&d_probs, probs.data(), probs.size() * sizeof(T)));
  CUDA_OK(upload(&d_image, image.data(), image.size() * sizeof(T)));
  if (!valid.empty()) CUDA_OK(upload(&d_valid, valid.data(), valid.size()));
  if (!config.channels.empty()) {
    CUDA_OK(upload(&d_channels, config.channels.data(), config.channels.size() * sizeof(int32_t)));
  }
  CUDA_OK(upload(&d_scale, scale.data(), scale.size() * sizeof(acc)));
  Problem problem = host_problem;
  problem.probs = d_probs.ptr;
  problem.image = d_image.ptr;
  problem.valid = valid.empty() ? nullptr : d_valid.as<const uint8_t>();
  problem.channels = config.channels.empty() ? nullptr : d_channels.as<const int32_t>();

  // Forward.
  const int64_t blocks = sc::cuda::forward_blocks_per_image(problem);
  CHECK(blocks >= 1, what + " forward_blocks_per_image >= 1");
  const size_t n_partials = static_cast<size_t>(config.batch * blocks);
  CUDA_OK(cudaMalloc(&d_partials.ptr, n_partials * sizeof(acc)));
  CUDA_OK(cudaMalloc(&d_status.ptr, static_cast<size_t>(config.batch) * sizeof(int32_t)));
  CUDA_OK(cudaMemset(d_status.ptr, 0, static_cast<size_t>(config.batch) * sizeof(int32_t)));
  CUDA_OK(sc::cuda::launch_forward(problem, DTypeOf<T>::value, d_partials.ptr, d_status.as<int32_t>(), 0));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<acc> partials(n_partials);
  std::vector<int32_t> status(static_cast<size_t>(config.batch));
  CUDA_OK(cudaMemcpy(partials.data(), d_partials.ptr, n_partials * sizeof(acc), cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(status.data(), d_status.ptr, status.size() * sizeof(int32_t), cudaMemcpyDeviceToHost));

  for (int64_t b = 0; b < config.batch; ++b) {
    double gpu = 0.0;
    for (int64_t i = 0; i < blocks; ++i) gpu += static_cast<double>(partials[static_cast<size_t>(b * blocks + i)]);
    double cpu = 0.0;
    int32_t cpu_status = 0;
    for (int64_t y = 0; y < config.height; ++y) {
      cpu += row_sums[static_cast<size_t>(b * config.height + y)];
      cpu_status |= row_status[static_cast<size_t>(b * config.height + y)];
    }
    char buffer[256];
    std::snprintf(buffer, sizeof(buffer), " image %lld: status gpu %d cpu %d", static_cast<long long>(b),
                  status[static_cast<size_t>(b)], cpu_status);
    CHECK(status[static_cast<size_t>(b)] == cpu_status, what + buffer);
    if (config.bad_values) {
      CHECK(cpu_status != 0, what + " bad values flagged by the CPU core");
      continue;  // the sums are NaN there
    }
    std::snprintf(buffer, sizeof(buffer), " image %lld: forward gpu %.17g cpu %.17g", static_cast<long long>(b), gpu,
                  cpu);
    CHECK(std::fabs(gpu - cpu) <= DTypeOf<T>::rel * std::fabs(cpu) + 1e-6 * DTypeOf<T>::rel, what + buffer);
  }

  // Backward, into a gradient prefilled with the sentinel.
  if (config.bad_values) return;
  std::vector<T> grad_gpu(probs.size(), sentinel);
  CUDA_OK(upload(&d_grad, grad_gpu.data(), grad_gpu.size() * sizeof(T)));
  CUDA_OK(sc::cuda::launch_backward(problem, DTypeOf<T>::value, d_scale.ptr, d_grad.ptr, 0));
  CUDA_OK(cudaDeviceSynchronize());
  CUDA_OK(cudaMemcpy(grad_gpu.data(), d_grad.ptr, grad_gpu.size() * sizeof(T), cudaMemcpyDeviceToHost));
  int64_t bad = 0, untouched_bad = 0;
  std::string first;
  for (int64_t b = 0; b < config.batch; ++b) {
    // Each entry sums at most `neighbourhood` terms w * dphi with |w|, |dphi| <= 1.
    const double bound = std::fabs(static_cast<double>(scale[static_cast<size_t>(b)])) * config.neighbourhood;
    for (int64_t c = 0; c < config.num_channels; ++c) {
      for (int64_t p = 0; p < plane; ++p) {
        const size_t i = static_cast<size_t>((b * config.num_channels + c) * plane + p);
        if (!is_selected[static_cast<size_t>(c)]) {
          untouched_bad += grad_gpu[i] != sentinel;
          continue;
        }
        const double g = static_cast<double>(grad_gpu[i]);
        const double r = static_cast<double>(grad_cpu[i]);
        if (!(std::fabs(g - r) <= DTypeOf<T>::rel * (std::fabs(r) + bound))) {
          if (bad++ == 0) {
            char buffer[256];
            std::snprintf(buffer, sizeof(buffer), " first at b=%lld c=%lld p=%lld: gpu %.17g cpu %.17g",
                          static_cast<long long>(b), static_cast<long long>(c), static_cast<long long>(p), g, r);
            first = buffer;
          }
        }
      }
    }
  }
  CHECK(untouched_bad == 0, what + " unselected channels written: " + std::to_string(untouched_bad));
  CHECK(bad == 0, what + " gradient entries differ: " + std::to_string(bad) + first);
}

}  // namespace

int main() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    std::printf("no CUDA device: skipped (%s)\n", err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
    return 77;
  }
  const std::vector<Config> configs = {
      // name, B, C, H, W, K, nb, dil, mask, channels, kind, sigma, bad_values
      {"plain 8-nb L1", 2, 3, 37, 45, 3, 8, 1, false, {}, Kind::L1, 0.15, false},
      {"4-nb Potts mask subset", 3, 4, 20, 300, 3, 4, 2, true, {3, 1}, Kind::Potts, 0.3, false},
      {"single row", 2, 2, 1, 513, 1, 8, 3, true, {}, Kind::L1, 0.5, false},
      {"single column", 1, 2, 300, 1, 3, 8, 1, false, {1}, Kind::Potts, 0.15, false},
      {"dilation beyond image", 2, 2, 5, 6, 3, 8, 7, false, {}, Kind::L1, 0.15, false},
      {"128x128 mask", 2, 3, 128, 128, 3, 8, 2, true, {0, 2}, Kind::L1, 0.2, false},
      {"bad values", 2, 3, 16, 17, 3, 8, 1, false, {2, 0}, Kind::L1, 0.15, true},
  };
  uint64_t seed = 1;
  for (const Config& config : configs) {
    run_case<float>(config, seed);
    run_case<double>(config, seed);
    ++seed;
  }
  std::printf("sparse_crf_cuda: %lld checks, %lld failed\n", static_cast<long long>(g_checks),
              static_cast<long long>(g_failures));
  return g_failures == 0 ? 0 : 1;
}
