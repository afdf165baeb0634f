// Torch-free CPU core of the DenseCRF loss: the per-pixel passes around the
// lattice filter (boxloss/permutohedral/cpu.h).  Per image; sums are taken in
// fixed chunks in a fixed order, so results do not depend on the runner.
#pragma once

#include <cstdint>

#include "boxloss/dense_crf/math.h"
#include "boxloss/permutohedral/cpu.h"

namespace boxloss {
namespace dense_crf {
namespace cpu {

using permutohedral::cpu::RangeRunner;

// E and Z of one image (math.h) from its probabilities (channels x num_pixels),
// mask (num_pixels, or nullptr: all valid), F (channels + 1 planes: the
// filtered masked probabilities and mask) and splat weights (num_pixels x (d+1)).
// Returns kProbsOutOfRange when a probability (valid or not) is NaN, Inf or
// outside [0, 1], else 0.
template <typename scalar>
int32_t energy_image(const scalar* probs, int64_t channels, const uint8_t* mask, const scalar* filtered,
                     const scalar* splat_weight, int64_t num_pixels, double* energy, double* normaliser,
                     const RangeRunner& runner);

// grad (channels x num_pixels) = scale * dE/dS, with R (`reversed`) the
// transpose filter of the same input; 0 at invalid pixels.
template <typename scalar>
void gradient_image(const scalar* probs, int64_t channels, const uint8_t* mask, const scalar* filtered,
                    const scalar* reversed, const scalar* splat_weight, int64_t num_pixels, scalar scale, scalar* grad,
                    const RangeRunner& runner);

}  // namespace cpu
}  // namespace dense_crf
}  // namespace boxloss
