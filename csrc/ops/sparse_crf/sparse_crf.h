// Device-independent part of the boxloss::sparse_crf_loss ops: argument
// checks, the Problem the kernels read, and the per-image normalisation.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "boxloss/sparse_crf/problem.h"

namespace boxloss {
namespace ops {

struct SparseCRFCall {
  at::Tensor probs;     // contiguous, compute dtype
  at::Tensor image;     // contiguous, compute dtype
  at::Tensor valid;     // contiguous uint8 view of the mask, or undefined
  at::Tensor channels;  // int32 on the device, or undefined (all channels)
  sparse_crf::Problem problem;
};

// Checks every argument (ValueError / TypeError naming the argument and what
// it got) and prepares the buffers.  `compute_dtype` is the dtype the kernel
// runs in (the CPU kernel runs float16/bfloat16 in float32).
SparseCRFCall prepare_sparse_crf_call(const char* op_name, const at::Tensor& probs, const at::Tensor& image,
                                      const std::optional<at::Tensor>& valid_mask, at::OptionalIntArrayRef channels,
                                      double sigma, int64_t neighbourhood, int64_t dilation, c10::string_view kind,
                                      at::ScalarType compute_dtype);

// |P_b| per image as `dtype`: the valid pixels, or H * W without a mask.
at::Tensor valid_pixel_counts(const SparseCRFCall& call, at::ScalarType dtype);

// sum / |P_b|, 0 for an image without valid pixels.
at::Tensor divide_by_counts(const at::Tensor& sums, const at::Tensor& counts);

// Raises a ValueError that names the offending argument and images when a
// status bit is set.  `status` holds one int per image, on the CPU.
void raise_for_input_status(const at::Tensor& status, const SparseCRFCall& call);

at::ScalarType accumulation_dtype(at::ScalarType dtype);

}  // namespace ops
}  // namespace boxloss
