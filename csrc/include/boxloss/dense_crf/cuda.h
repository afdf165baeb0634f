// Torch-free launchers of the CUDA DenseCRF loss passes around the lattice
// filter (boxloss/permutohedral/cuda.h).  The per-pixel math is that of
// dense_crf/math.h, shared with the CPU core.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "boxloss/dense_crf/math.h"

namespace boxloss {
namespace dense_crf {
namespace cuda {

constexpr int kThreads = 256;

// Partial sums the energy pass writes per image.
int64_t energy_blocks_per_image(int64_t num_pixels);

// partial_energy, partial_normaliser: (batch, energy_blocks_per_image), each
// block's sum of E and Z terms in a fixed order; status (batch, zeroed by the
// caller) receives kProbsOutOfRange.  probs (batch, channels, N), mask
// (batch, N) or nullptr, filtered (batch, channels + 1, N), splat_weight
// (batch, N, d+1).
template <typename scalar>
cudaError_t launch_energy(const scalar* probs, int64_t batch, int64_t channels, int64_t num_pixels, const uint8_t* mask,
                          const scalar* filtered, const scalar* splat_weight, scalar* partial_energy,
                          scalar* partial_normaliser, int32_t* status, cudaStream_t stream);

// grad (batch, channels, N) = scale[b] * dE/dS, with `reversed` the
// transposed filter of the same input; 0 at invalid pixels.
template <typename scalar>
cudaError_t launch_gradient(const scalar* probs, int64_t batch, int64_t channels, int64_t num_pixels,
                            const uint8_t* mask, const scalar* filtered, const scalar* reversed,
                            const scalar* splat_weight, const scalar* scale, scalar* grad, cudaStream_t stream);

}  // namespace cuda
}  // namespace dense_crf
}  // namespace boxloss
