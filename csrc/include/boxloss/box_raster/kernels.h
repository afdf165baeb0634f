// Torch-free CPU core and CUDA launcher of the box rasteriser.
#pragma once

#include <cstdint>

#include "boxloss/box_raster/raster.h"

#if defined(BOXLOSS_WITH_CUDA_RUNTIME)
#include <cuda_runtime_api.h>
#endif

namespace boxloss {
namespace box_raster {
namespace cpu {
// front[b, y, x] for the map rows b * height + y in [row_begin, row_end).
void front_rows(const Problem& problem, int64_t row_begin, int64_t row_end, int64_t* front);
}  // namespace cpu

#if defined(BOXLOSS_WITH_CUDA_RUNTIME)
namespace cuda {
cudaError_t launch_front(const Problem& problem, int64_t* front, cudaStream_t stream);
}  // namespace cuda
#endif

}  // namespace box_raster
}  // namespace boxloss
