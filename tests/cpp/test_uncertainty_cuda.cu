// CUDA launchers of the uncertainty kernels (csrc/kernels/uncertainty/*.cu)
// against the CPU core, without torch.  Built by CMakeLists.txt only when a
// CUDA compiler is found; exits with 77 (ctest: skipped) when no device is.
//
// Both devices draw the same Philox noise for the same seed, so in double the
// multi-class loss, its saved log-sum-exp and both gradients agree to
// rounding, and in float to the precision of the float math; the binary loss
// and its gradients likewise; a bad target sets the status bit.
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "boxloss/uncertainty/cpu.h"
#include "boxloss/uncertainty/cuda.h"
#include "cuda_test_support.h"

namespace {

namespace u = boxloss::uncertainty;

// A device copy of a host vector, freed at scope exit.
template <typename T>
struct Device {
  T* ptr = nullptr;
  size_t n = 0;
  explicit Device(const std::vector<T>& host) : n(host.size()) {
    if (cudaMalloc(&ptr, sizeof(T) * (n ? n : 1)) == cudaSuccess && n) {
      cudaMemcpy(ptr, host.data(), sizeof(T) * n, cudaMemcpyHostToDevice);
    }
  }
  explicit Device(size_t count) : n(count) { cudaMalloc(&ptr, sizeof(T) * (n ? n : 1)); }
  Device(const Device&) = delete;
  ~Device() { cudaFree(ptr); }
  std::vector<T> host() const {
    std::vector<T> out(n);
    cudaMemcpy(out.data(), ptr, sizeof(T) * n, cudaMemcpyDeviceToHost);
    return out;
  }
};

template <typename T>
bool close(const std::vector<T>& a, const std::vector<T>& b, double rtol, double atol, std::string* where) {
  for (size_t i = 0; i < a.size(); ++i) {
    if (!(std::fabs(double(a[i]) - double(b[i])) <= atol + rtol * std::fabs(double(b[i])))) {
      *where =
          "index " + std::to_string(i) + ": " + std::to_string(double(a[i])) + " vs " + std::to_string(double(b[i]));
      return false;
    }
  }
  return true;
}

template <typename scalar>
void test_class(int64_t B, int64_t C, int64_t H, int64_t W, bool bootstrap, bool route, double rtol) {
  std::mt19937 rng(static_cast<uint32_t>(B * 1000 + C * 10 + H));
  std::normal_distribution<double> normal;
  const int64_t plane = H * W, n = B * C * plane;
  std::vector<scalar> mu(n), s(n);
  for (int64_t i = 0; i < n; ++i) {
    mu[i] = static_cast<scalar>(2 * normal(rng));
    s[i] = static_cast<scalar>(normal(rng));
  }
  std::vector<int64_t> target(B * plane);
  std::vector<uint8_t> mask(B * plane), pp(B);
  for (int64_t i = 0; i < B * plane; ++i) {
    target[i] = rng() % 10 == 0 ? 255 : static_cast<int64_t>(rng() % C);
    mask[i] = rng() % 3 != 0;
  }
  for (int64_t b = 0; b < B; ++b) pp[b] = b % 2;
  std::vector<scalar> grad(B * plane);
  for (auto& g : grad) g = static_cast<scalar>(0.5 + (rng() % 100) / 100.0);

  u::ClassProblem p;
  p.batch = B;
  p.num_classes = C;
  p.plane = plane;
  p.samples = 7;
  p.key = u::make_noise_key(0x0123456789abcdefull, 5);
  p.log_tau = std::log(1.5);
  p.bootstrap = bootstrap;
  p.route_gradients = route;
  p.ignore_index = 255;
  // CPU
  p.mu = mu.data();
  p.log_var = s.data();
  p.target = target.data();
  p.box_mask = mask.data();
  p.pixel_perfect = pp.data();
  std::vector<scalar> loss(B * plane), lse(B * plane), gm(n), gs(n);
  const int64_t chunks = u::cpu::class_chunks(p);
  u::cpu::class_forward<scalar>(p, 0, chunks, loss.data(), lse.data());
  u::cpu::class_backward<scalar>(p, grad.data(), lse.data(), 0, chunks, gm.data(), gs.data());
  // CUDA
  Device<scalar> d_mu(mu), d_s(s), d_grad(grad), d_loss(B * plane), d_lse(B * plane), d_gm(n), d_gs(n);
  Device<int64_t> d_target(target);
  Device<uint8_t> d_mask(mask), d_pp(pp);
  Device<int32_t> d_status(std::vector<int32_t>{0});
  u::ClassProblem q = p;
  q.mu = d_mu.ptr;
  q.log_var = d_s.ptr;
  q.target = d_target.ptr;
  q.box_mask = d_mask.ptr;
  q.pixel_perfect = d_pp.ptr;
  CUDA_OK(u::cuda::launch_class_forward<scalar>(q, d_loss.ptr, d_lse.ptr, d_status.ptr, nullptr));
  CUDA_OK(u::cuda::launch_class_backward<scalar>(q, d_grad.ptr, d_lse.ptr, d_gm.ptr, d_gs.ptr, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  const std::string what = std::string(sizeof(scalar) == 8 ? "double" : "float") + " B=" + std::to_string(B) +
                           " C=" + std::to_string(C) + " boot=" + std::to_string(bootstrap) +
                           " route=" + std::to_string(route) + ": ";
  std::string where;
  CHECK(close(d_loss.host(), loss, rtol, rtol, &where), what + "loss " + where);
  CHECK(close(d_lse.host(), lse, rtol, rtol, &where), what + "sample LSE " + where);
  CHECK(close(d_gm.host(), gm, rtol, rtol, &where), what + "grad mu " + where);
  CHECK(close(d_gs.host(), gs, rtol, rtol, &where), what + "grad log_var " + where);
  CHECK(d_status.host()[0] == 0, what + "valid targets set no status bit");

  target[0] = C + 3;  // neither a class nor ignore_index
  Device<int64_t> d_bad(target);
  Device<int32_t> d_status2(std::vector<int32_t>{0});
  q.target = d_bad.ptr;
  CUDA_OK(u::cuda::launch_class_forward<scalar>(q, d_loss.ptr, d_lse.ptr, d_status2.ptr, nullptr));
  CHECK(d_status2.host()[0] == u::kTargetOutOfRange, what + "a bad target sets kTargetOutOfRange");
}

template <typename scalar>
void test_binary(bool bootstrap, bool route, double rtol) {
  std::mt19937 rng(9);
  std::normal_distribution<double> normal;
  const int64_t B = 3, plane = 333, n = B * plane;
  std::vector<scalar> mu(n), s(n), y(n), grad(n);
  std::vector<uint8_t> mask(n), pp = {0, 1, 0};
  for (int64_t i = 0; i < n; ++i) {
    mu[i] = static_cast<scalar>(3 * normal(rng));
    s[i] = static_cast<scalar>(1.5 * normal(rng) + 0.5);
    y[i] = static_cast<scalar>((rng() % 5) / 4.0);
    grad[i] = static_cast<scalar>(0.5 + (rng() % 100) / 100.0);
    mask[i] = rng() % 4 != 0;
  }
  u::BinaryProblem p;
  p.batch = B;
  p.plane = plane;
  p.bootstrap = bootstrap;
  p.route_gradients = route;
  p.mu = mu.data();
  p.log_var = s.data();
  p.target = y.data();
  p.box_mask = mask.data();
  p.pixel_perfect = pp.data();
  std::vector<scalar> loss(n), gm(n), gs(n);
  u::cpu::binary_forward<scalar>(p, 0, n, loss.data());
  u::cpu::binary_backward<scalar>(p, grad.data(), 0, n, gm.data(), gs.data());
  Device<scalar> d_mu(mu), d_s(s), d_y(y), d_grad(grad), d_loss(n), d_gm(n), d_gs(n);
  Device<uint8_t> d_mask(mask), d_pp(pp);
  Device<int32_t> d_status(std::vector<int32_t>{0});
  u::BinaryProblem q = p;
  q.mu = d_mu.ptr;
  q.log_var = d_s.ptr;
  q.target = d_y.ptr;
  q.box_mask = d_mask.ptr;
  q.pixel_perfect = d_pp.ptr;
  CUDA_OK(u::cuda::launch_binary_forward<scalar>(q, d_loss.ptr, d_status.ptr, nullptr));
  CUDA_OK(u::cuda::launch_binary_backward<scalar>(q, d_grad.ptr, d_gm.ptr, d_gs.ptr, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  const std::string what = std::string("binary ") + (sizeof(scalar) == 8 ? "double" : "float") +
                           " boot=" + std::to_string(bootstrap) + " route=" + std::to_string(route) + ": ";
  std::string where;
  CHECK(close(d_loss.host(), loss, rtol, rtol, &where), what + "loss " + where);
  CHECK(close(d_gm.host(), gm, rtol, rtol, &where), what + "grad mu " + where);
  CHECK(close(d_gs.host(), gs, rtol, rtol, &where), what + "grad log_var " + where);
  CHECK(d_status.host()[0] == 0, what + "valid targets set no status bit");
}

}  // namespace

int main() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  for (bool bootstrap : {true, false}) {
    for (bool route : {true, false}) {
      test_class<double>(2, 5, 7, 9, bootstrap, route, 1e-11);
      test_class<double>(1, 21, 13, 17, bootstrap, route, 1e-11);
      test_class<float>(2, 21, 16, 40, bootstrap, route, 2e-4);
      test_class<float>(3, 3, 33, 65, bootstrap, route, 2e-4);
      test_binary<double>(bootstrap, route, 1e-12);
      test_binary<float>(bootstrap, route, 1e-5);
    }
  }
  std::printf("%lld checks, %lld failures\n", static_cast<long long>(g_checks), static_cast<long long>(g_failures));
  return g_failures == 0 ? 0 : 1;
}
