// Device-independent part of the boxloss::dense_crf_loss ops: argument checks
// and the buffers the kernels read.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "../permutohedral/permutohedral.h"

namespace boxloss {
namespace ops {

struct DenseCRFCall {
  at::Tensor probs;  // (B, C, H, W), contiguous, compute dtype
  at::Tensor valid;  // (B, H, W) contiguous uint8 view of the mask, or undefined
  LatticeTensors lattice;
  int64_t batch = 0, channels = 0, num_pixels = 0;

  const uint8_t* mask_of(int64_t b) const {
    return valid.defined() ? valid.data_ptr<uint8_t>() + b * num_pixels : nullptr;
  }
};

DenseCRFCall prepare_dense_crf_call(const char* op, const at::Tensor& probs,
                                    const std::optional<at::Tensor>& valid_mask, const at::Tensor& splat_index,
                                    const at::Tensor& splat_weight, const at::Tensor& blur_neighbours,
                                    const at::Tensor& vertex_offsets);

// (B,) bool on the device of probs: the image has at least two valid pixels.
// An image with fewer has no pair; the lattice's residual self-affinity
// (W_ii = L_ii - c_i, small but not 0) would otherwise give a lone pixel a
// loss of sum_k S_k (1 - S_k), so such images give E = Z = 0 and no gradient.
at::Tensor images_with_pairs(const DenseCRFCall& call);

// ValueError naming the images whose probabilities are out of range.
void raise_for_dense_crf_probs_status(const char* op, const std::vector<int32_t>& status, const at::Tensor& probs);

}  // namespace ops
}  // namespace boxloss
