// Device-independent part of the boxloss uncertainty ops: argument checks,
// the Problems the kernels read, and the errors for bad target values.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "boxloss/uncertainty/problem.h"

namespace boxloss {
namespace ops {

struct BinaryCall {
  at::Tensor mu;             // (B, H, W) contiguous, compute dtype
  at::Tensor log_var;        // (B, H, W) contiguous, compute dtype
  at::Tensor target;         // (B, H, W) contiguous, compute dtype
  at::Tensor box_mask;       // contiguous uint8 view, or undefined
  at::Tensor pixel_perfect;  // contiguous uint8 view, or undefined
  uncertainty::BinaryProblem problem;
};

struct ClassCall {
  at::Tensor mu;       // (B, C, H, W) contiguous, compute dtype
  at::Tensor log_var;  // (B, C, H, W) contiguous, compute dtype
  at::Tensor target;   // (B, H, W) contiguous int64
  at::Tensor box_mask;
  at::Tensor pixel_perfect;
  uncertainty::ClassProblem problem;
};

// float16 and bfloat16 run in float32; float32 and float64 as they are.
at::ScalarType uncertainty_compute_dtype(at::ScalarType dtype);

// Check every argument (ValueError / TypeError naming the argument and what it
// got) and prepare the buffers.
BinaryCall prepare_binary_call(const char* op, const at::Tensor& mu, const at::Tensor& log_var,
                               const at::Tensor& target, const std::optional<at::Tensor>& box_mask,
                               const std::optional<at::Tensor>& pixel_perfect, double tau, double temperature,
                               bool bootstrap, bool route_gradients);

ClassCall prepare_class_call(const char* op, const at::Tensor& mu, const at::Tensor& log_var, const at::Tensor& target,
                             const std::optional<at::Tensor>& box_mask, const std::optional<at::Tensor>& pixel_perfect,
                             const at::Tensor& seed, int64_t samples, double tau, bool bootstrap, bool route_gradients,
                             int64_t ignore_index);

// A per-pixel tensor (B, H, W) for the backward: grad or saved values, on the
// device of the call, in its compute dtype, contiguous.
at::Tensor per_pixel_input(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like);

// After the forward kernel: raise a ValueError naming the bad target values when
// a status bit is set, or naming mu or log_var when either holds NaN or Inf (a
// finite result would then be meaningless: the kernels clamp their exponentials).
void raise_for_binary_status(int32_t status, const BinaryCall& call);
void raise_for_class_status(int32_t status, const ClassCall& call);

}  // namespace ops
}  // namespace boxloss
