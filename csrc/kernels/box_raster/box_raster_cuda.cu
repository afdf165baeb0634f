// CUDA box rasteriser: one thread per pixel runs the shared front_box rule.
#define BOXLOSS_WITH_CUDA_RUNTIME 1
#include "boxloss/box_raster/kernels.h"

namespace boxloss {
namespace box_raster {
namespace cuda {
namespace {

__global__ void front_kernel(Problem problem, int64_t* __restrict front) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t plane = problem.height * problem.width;
  if (i >= problem.batch * plane) return;
  const int64_t b = i / plane;
  const int64_t y = (i - b * plane) / problem.width;
  const int64_t x = i - b * plane - y * problem.width;
  front[i] = front_box(problem, b, y, x);
}

}  // namespace

cudaError_t launch_front(const Problem& problem, int64_t* front, cudaStream_t stream) {
  const int64_t pixels = problem.batch * problem.height * problem.width;
  if (pixels == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  front_kernel<<<static_cast<unsigned int>((pixels + kThreads - 1) / kThreads), kThreads, 0, stream>>>(problem, front);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace box_raster
}  // namespace boxloss
