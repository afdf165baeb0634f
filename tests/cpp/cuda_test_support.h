// Shared by the CUDA C++ tests (with test_support.h): a CHECK for CUDA calls
// and a device buffer freed at scope exit.
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "test_support.h"

// Evaluates a CUDA call; on error records a failure and returns from the
// enclosing function (which returns void).
#define CUDA_OK(call)                                                                                       \
  do {                                                                                                      \
    const cudaError_t err_ = (call);                                                                        \
    if (err_ != cudaSuccess) {                                                                              \
      check_impl(false, #call, __FILE__, __LINE__, std::string("CUDA error: ") + cudaGetErrorString(err_)); \
      return;                                                                                               \
    }                                                                                                       \
  } while (0)

// Device buffer freed at scope exit.
struct DeviceBuffer {
  void* ptr = nullptr;
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr != nullptr) cudaFree(ptr);
  }
  template <typename U>
  U* as() const {
    return static_cast<U*>(ptr);
  }
};
