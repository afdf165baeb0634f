// CUDA launchers of the permutohedral lattice and the DenseCRF passes
// (csrc/kernels/permutohedral/lattice_cuda.cu, csrc/kernels/dense_crf/
// dense_crf_cuda.cu) against the CPU core, without torch.  Built by
// CMakeLists.txt only when a CUDA compiler is found; exits with 77 (ctest:
// skipped) when no device is.
//
// The GPU numbers vertices by hash slot, the CPU by first use, so lattices
// are compared through what they compute: the same number of vertices per
// image, equal splat weights pixel by pixel, equal filter outputs (forward
// and reverse, masked, with the appended mask channel), and equal E, Z and
// gradients of the loss.  The vertex numbering is done on the host here, as
// the torch op does it with ATen scans.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "boxloss/dense_crf/cpu.h"
#include "boxloss/dense_crf/cuda.h"
#include "boxloss/permutohedral/cpu.h"
#include "boxloss/permutohedral/cuda.h"
#include "cuda_test_support.h"

namespace {

namespace pl = boxloss::permutohedral;
namespace dc = boxloss::dense_crf;

template <typename T>
cudaError_t upload(DeviceBuffer* buffer, const std::vector<T>& host) {
  const size_t bytes = host.size() * sizeof(T);
  cudaError_t err = cudaMalloc(&buffer->ptr, bytes == 0 ? 1 : bytes);
  if (err != cudaSuccess || bytes == 0) return err;
  return cudaMemcpy(buffer->ptr, host.data(), bytes, cudaMemcpyHostToDevice);
}

template <typename T>
cudaError_t download(std::vector<T>* host, const DeviceBuffer& buffer) {
  return cudaMemcpy(host->data(), buffer.ptr, host->size() * sizeof(T), cudaMemcpyDeviceToHost);
}

template <typename T>
struct Precision;
template <>
struct Precision<float> {
  static constexpr pl::cuda::DType dtype = pl::cuda::DType::kFloat32;
  static constexpr double rel = 2e-4;  // atomics and another summation order
  static constexpr const char* name = "float";
};
template <>
struct Precision<double> {
  static constexpr pl::cuda::DType dtype = pl::cuda::DType::kFloat64;
  static constexpr double rel = 1e-10;
  static constexpr const char* name = "double";
};

struct Config {
  const char* name;
  int64_t batch, height, width, channels;
  double sigma_xy, sigma_rgb;
  bool with_mask;
};

template <typename T>
double max_rel(const std::vector<T>& a, const std::vector<T>& b) {
  double worst = 0.0, scale = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    worst = std::max(worst, std::fabs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
    scale = std::max(scale, std::fabs(static_cast<double>(b[i])));
  }
  return worst / std::max(scale, 1e-300);
}

template <typename T>
void run_case(const Config& c, uint64_t seed) {
  const std::string what = std::string("[") + Precision<T>::name + " " + c.name + "]";
  const int64_t B = c.batch, N = c.height * c.width, C = c.channels;
  constexpr int64_t V1 = pl::kVertices;
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  std::vector<T> image(static_cast<size_t>(B * 3 * N));
  for (int64_t b = 0; b < B; ++b) {  // smooth colours with noise, in [0, 255]
    for (int64_t k = 0; k < 3; ++k) {
      for (int64_t p = 0; p < N; ++p) {
        const double x = static_cast<double>(p % c.width), y = static_cast<double>(p / c.width);
        image[(b * 3 + k) * N + p] =
            static_cast<T>(128 + 100 * std::sin(0.2 * x + k + b) * std::cos(0.15 * y - k) + 8 * (unit(rng) - 0.5));
      }
    }
  }
  std::vector<T> probs(static_cast<size_t>(B * C * N));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t p = 0; p < N; ++p) {
      double total = 0.0;
      for (int64_t k = 0; k < C; ++k) total += (probs[(b * C + k) * N + p] = static_cast<T>(0.05 + unit(rng)));
      for (int64_t k = 0; k < C; ++k) probs[(b * C + k) * N + p] = static_cast<T>(probs[(b * C + k) * N + p] / total);
    }
  }
  std::vector<uint8_t> mask(static_cast<size_t>(B * N), 1);
  if (c.with_mask) {
    for (auto& m : mask) m = unit(rng) < 0.8;
  }

  // CPU lattice.
  std::vector<int32_t> cpu_index(static_cast<size_t>(B * N * V1));
  std::vector<T> cpu_weight(cpu_index.size());
  std::vector<pl::cpu::ImageLattice> cpu_images(static_cast<size_t>(B));
  std::vector<int64_t> cpu_offsets = {0};
  for (int64_t b = 0; b < B; ++b) {
    pl::cpu::build_lattice<T>(image.data() + b * 3 * N, c.height, c.width, c.sigma_xy, c.sigma_rgb,
                              cpu_index.data() + b * N * V1, cpu_weight.data() + b * N * V1, &cpu_images[b]);
    cpu_offsets.push_back(cpu_offsets.back() + cpu_images[b].num_vertices);
  }
  const int64_t cpu_total = cpu_offsets.back();
  std::vector<int32_t> cpu_neighbours(static_cast<size_t>(V1 * cpu_total * 2));
  for (int axis = 0; axis < V1; ++axis) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t count = cpu_images[b].num_vertices;
      std::copy(cpu_images[b].neighbours.begin() + axis * count * 2,
                cpu_images[b].neighbours.begin() + (axis + 1) * count * 2,
                cpu_neighbours.begin() + (axis * cpu_total + cpu_offsets[b]) * 2);
    }
  }

  // GPU lattice: insert, number the occupied slots on the host, finish.
  const int64_t capacity = pl::cuda::table_capacity(N);
  DeviceBuffer d_image, d_weight, d_keys, d_slot_entry, d_entry_slot, d_status;
  CUDA_OK(upload(&d_image, image));
  CUDA_OK(cudaMalloc(&d_weight.ptr, cpu_weight.size() * sizeof(T)));
  CUDA_OK(cudaMalloc(&d_keys.ptr, static_cast<size_t>(B * N * V1 * pl::kDim) * sizeof(int32_t)));
  CUDA_OK(upload(&d_slot_entry, std::vector<int32_t>(static_cast<size_t>(B * capacity), -1)));
  CUDA_OK(cudaMalloc(&d_entry_slot.ptr, cpu_index.size() * sizeof(int32_t)));
  CUDA_OK(upload(&d_status, std::vector<int32_t>(static_cast<size_t>(B), 0)));
  pl::cuda::BuildBuffers buffers;
  buffers.entry_keys = d_keys.as<int32_t>();
  buffers.slot_entry = d_slot_entry.as<int32_t>();
  buffers.entry_slot = d_entry_slot.as<int32_t>();
  buffers.status = d_status.as<int32_t>();
  buffers.capacity = capacity;
  CUDA_OK(pl::cuda::launch_insert(d_image.ptr, Precision<T>::dtype, B, c.height, c.width, c.sigma_xy, c.sigma_rgb,
                                  d_weight.ptr, buffers, 0));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<int32_t> status(static_cast<size_t>(B)), slot_entry(static_cast<size_t>(B * capacity));
  CUDA_OK(download(&status, d_status));
  CUDA_OK(download(&slot_entry, d_slot_entry));
  for (int64_t b = 0; b < B; ++b) CHECK(status[b] == 0, what + " build status " + std::to_string(status[b]));
  std::vector<int32_t> slot_vertex(slot_entry.size(), -1);
  std::vector<int64_t> vertex_slot, gpu_offsets = {0};
  for (int64_t b = 0; b < B; ++b) {
    int32_t next = 0;
    for (int64_t s = 0; s < capacity; ++s) {
      if (slot_entry[b * capacity + s] < 0) continue;
      slot_vertex[b * capacity + s] = next++;
      vertex_slot.push_back(b * capacity + s);
    }
    gpu_offsets.push_back(gpu_offsets.back() + next);
    CHECK(next == cpu_images[b].num_vertices, what + " image " + std::to_string(b) + ": " + std::to_string(next) +
                                                  " GPU vertices vs " + std::to_string(cpu_images[b].num_vertices) +
                                                  " CPU");
  }
  const int64_t total = static_cast<int64_t>(vertex_slot.size());
  if (total != cpu_total) return;
  DeviceBuffer d_slot_vertex, d_vertex_slot, d_index, d_neighbours, d_offsets, d_vertex_image;
  CUDA_OK(upload(&d_slot_vertex, slot_vertex));
  CUDA_OK(upload(&d_vertex_slot, vertex_slot));
  CUDA_OK(cudaMalloc(&d_index.ptr, cpu_index.size() * sizeof(int32_t)));
  CUDA_OK(cudaMalloc(&d_neighbours.ptr, static_cast<size_t>(V1 * total * 2) * sizeof(int32_t)));
  CUDA_OK(pl::cuda::launch_finish(B, N, buffers, d_slot_vertex.as<int32_t>(), d_vertex_slot.as<int64_t>(), total,
                                  d_index.as<int32_t>(), d_neighbours.as<int32_t>(), 0));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<T> gpu_weight(cpu_weight.size());
  CUDA_OK(download(&gpu_weight, d_weight));
  CHECK(max_rel(gpu_weight, cpu_weight) <= Precision<T>::rel, what + " splat weights differ");
  std::vector<int32_t> vertex_image;
  for (int64_t b = 0; b < B; ++b) vertex_image.insert(vertex_image.end(), gpu_offsets[b + 1] - gpu_offsets[b], b);
  CUDA_OK(upload(&d_offsets, gpu_offsets));
  CUDA_OK(upload(&d_vertex_image, vertex_image));

  pl::Lattice<T> cpu_lattice;
  cpu_lattice.splat_index = cpu_index.data();
  cpu_lattice.splat_weight = cpu_weight.data();
  cpu_lattice.blur_neighbours = cpu_neighbours.data();
  cpu_lattice.vertex_offsets = cpu_offsets.data();
  cpu_lattice.batch = B;
  cpu_lattice.num_pixels = N;
  cpu_lattice.total_vertices = total;
  pl::Lattice<T> gpu_lattice = cpu_lattice;
  gpu_lattice.splat_index = d_index.as<int32_t>();
  gpu_lattice.splat_weight = d_weight.as<T>();
  gpu_lattice.blur_neighbours = d_neighbours.as<int32_t>();
  gpu_lattice.vertex_offsets = d_offsets.as<int64_t>();

  // Filters: plain values both ways, and the loss's masked input with the mask appended.
  DeviceBuffer d_probs, d_mask, d_grid_a, d_grid_b, d_out, d_out_reverse, d_filter_status;
  CUDA_OK(upload(&d_probs, probs));
  CUDA_OK(upload(&d_mask, mask));
  const int64_t Cf = C + 1;
  CUDA_OK(cudaMalloc(&d_grid_a.ptr, static_cast<size_t>((total + 1) * Cf) * sizeof(T)));
  CUDA_OK(cudaMalloc(&d_grid_b.ptr, static_cast<size_t>((total + 1) * Cf) * sizeof(T)));
  CUDA_OK(cudaMalloc(&d_out.ptr, static_cast<size_t>(B * Cf * N) * sizeof(T)));
  CUDA_OK(cudaMalloc(&d_out_reverse.ptr, static_cast<size_t>(B * Cf * N) * sizeof(T)));
  CUDA_OK(upload(&d_filter_status, std::vector<int32_t>(static_cast<size_t>(B), 0)));
  for (int variant = 0; variant < 2; ++variant) {
    const bool loss_input = variant == 1;
    for (int reverse = 0; reverse < 2; ++reverse) {
      pl::cuda::FilterInput<T> gpu_input;
      gpu_input.values = d_probs.as<T>();
      gpu_input.channels = C;
      gpu_input.mask = loss_input && c.with_mask ? d_mask.as<uint8_t>() : nullptr;
      gpu_input.append_mask = loss_input;
      const int64_t channels = gpu_input.filtered_channels();
      CUDA_OK(cudaMemset(d_grid_a.ptr, 0, static_cast<size_t>((total + 1) * channels) * sizeof(T)));
      CUDA_OK(cudaMemset(d_grid_b.ptr, 0, static_cast<size_t>((total + 1) * channels) * sizeof(T)));
      DeviceBuffer& d_result = reverse ? d_out_reverse : d_out;
      CUDA_OK(pl::cuda::launch_filter<T>(gpu_lattice, d_vertex_image.as<int32_t>(), gpu_input, reverse != 0,
                                         d_grid_a.as<T>(), d_grid_b.as<T>(), d_result.as<T>(),
                                         d_filter_status.as<int32_t>(), 0));
      CUDA_OK(cudaDeviceSynchronize());
      std::vector<T> gpu_out(static_cast<size_t>(B * channels * N)), cpu_out(gpu_out.size());
      CUDA_OK(download(&gpu_out, d_result));
      for (int64_t b = 0; b < B; ++b) {
        pl::cpu::FilterInput<T> input;
        input.values = probs.data() + b * C * N;
        input.channels = C;
        input.mask = loss_input && c.with_mask ? mask.data() + b * N : nullptr;
        input.append_mask = loss_input;
        pl::cpu::filter_image<T>(cpu_lattice, b, input, reverse != 0, cpu_out.data() + b * channels * N,
                                 pl::cpu::run_serially);
      }
      const double err = max_rel(gpu_out, cpu_out);
      CHECK(err <= Precision<T>::rel, what + " filter variant " + std::to_string(variant) + " reverse " +
                                          std::to_string(reverse) + " differs from the CPU by " + std::to_string(err));
    }
  }
  std::vector<int32_t> filter_status(static_cast<size_t>(B));
  CUDA_OK(download(&filter_status, d_filter_status));
  for (int64_t b = 0; b < B; ++b) CHECK(filter_status[b] == 0, what + " filter status");

  // Loss passes on the filtered loss input (d_out / d_out_reverse hold it now).
  const int64_t blocks = dc::cuda::energy_blocks_per_image(N);
  DeviceBuffer d_pe, d_pz, d_probs_status, d_scale, d_grad;
  CUDA_OK(cudaMalloc(&d_pe.ptr, static_cast<size_t>(B * blocks) * sizeof(T)));
  CUDA_OK(cudaMalloc(&d_pz.ptr, static_cast<size_t>(B * blocks) * sizeof(T)));
  CUDA_OK(upload(&d_probs_status, std::vector<int32_t>(static_cast<size_t>(B), 0)));
  const uint8_t* gpu_mask = c.with_mask ? d_mask.as<uint8_t>() : nullptr;
  CUDA_OK(dc::cuda::launch_energy<T>(d_probs.as<T>(), B, C, N, gpu_mask, d_out.as<T>(), d_weight.as<T>(), d_pe.as<T>(),
                                     d_pz.as<T>(), d_probs_status.as<int32_t>(), 0));
  std::vector<T> scale(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) scale[b] = static_cast<T>(0.5 + b);
  CUDA_OK(upload(&d_scale, scale));
  CUDA_OK(cudaMalloc(&d_grad.ptr, probs.size() * sizeof(T)));
  CUDA_OK(dc::cuda::launch_gradient<T>(d_probs.as<T>(), B, C, N, gpu_mask, d_out.as<T>(), d_out_reverse.as<T>(),
                                       d_weight.as<T>(), d_scale.as<T>(), d_grad.as<T>(), 0));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<T> pe(static_cast<size_t>(B * blocks)), pz(pe.size()), grad(probs.size());
  CUDA_OK(download(&pe, d_pe));
  CUDA_OK(download(&pz, d_pz));
  CUDA_OK(download(&grad, d_grad));
  std::vector<T> cpu_grad(probs.size()), forward(static_cast<size_t>(Cf * N)), reversed(forward.size());
  for (int64_t b = 0; b < B; ++b) {
    pl::cpu::FilterInput<T> input;
    input.values = probs.data() + b * C * N;
    input.channels = C;
    input.mask = c.with_mask ? mask.data() + b * N : nullptr;
    input.append_mask = true;
    pl::cpu::filter_image<T>(cpu_lattice, b, input, false, forward.data(), pl::cpu::run_serially);
    pl::cpu::filter_image<T>(cpu_lattice, b, input, true, reversed.data(), pl::cpu::run_serially);
    double e = 0.0, z = 0.0;
    dc::cpu::energy_image<T>(probs.data() + b * C * N, C, input.mask, forward.data(), cpu_weight.data() + b * N * V1, N,
                             &e, &z, pl::cpu::run_serially);
    double ge = 0.0, gz = 0.0;
    for (int64_t i = 0; i < blocks; ++i) {
      ge += static_cast<double>(pe[b * blocks + i]);
      gz += static_cast<double>(pz[b * blocks + i]);
    }
    CHECK(
        std::fabs(ge - e) <= Precision<T>::rel * std::fabs(z) && std::fabs(gz - z) <= Precision<T>::rel * std::fabs(z),
        what + " image " + std::to_string(b) + ": E, Z gpu " + std::to_string(ge) + ", " + std::to_string(gz) +
            " cpu " + std::to_string(e) + ", " + std::to_string(z));
    dc::cpu::gradient_image<T>(probs.data() + b * C * N, C, input.mask, forward.data(), reversed.data(),
                               cpu_weight.data() + b * N * V1, N, scale[b], cpu_grad.data() + b * C * N,
                               pl::cpu::run_serially);
  }
  CHECK(max_rel(grad, cpu_grad) <= Precision<T>::rel, what + " gradient differs from the CPU");
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
      {"one pixel", 1, 1, 1, 2, 3.0, 15.0, false},      {"row", 2, 1, 130, 3, 2.0, 10.0, true},
      {"21 classes", 2, 40, 52, 21, 8.0, 15.0, true},   {"dense lattice", 1, 96, 80, 4, 80.0, 15.0, false},
      {"sparse lattice", 3, 33, 29, 2, 1.0, 3.0, true},
  };
  uint64_t seed = 1;
  for (const Config& config : configs) {
    run_case<float>(config, seed);
    run_case<double>(config, seed);
    ++seed;
  }
  std::printf("permutohedral_cuda: %lld checks, %lld failed\n", static_cast<long long>(g_checks),
              static_cast<long long>(g_failures));
  return g_failures == 0 ? 0 : 1;
}
