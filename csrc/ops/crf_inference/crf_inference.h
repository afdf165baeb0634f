// Device-independent part of the boxloss::dense_crf_inference op: argument
// checks naming the argument and what it got, the two kernels' lattices (the
// appearance kernel's through boxloss::permutohedral_lattice, the smoothness
// kernel's spatial lattice built here), and the errors the kernels report.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "../permutohedral/permutohedral.h"

namespace boxloss {
namespace ops {

// The 2-d lattice of the positions (x / sigma_xy, y / sigma_xy) of an
// H x W grid, shared by every image of the batch.
struct SpatialLatticeTensors {
  at::Tensor splat_index;      // int32 (H*W, 3)
  at::Tensor splat_weight;     // (H*W, 3), compute dtype
  at::Tensor blur_neighbours;  // int32 (3, V, 2)
  int64_t num_vertices = 0;
};

struct CRFInferenceCall {
  at::Tensor unary;         // (B, C, H, W), contiguous, compute dtype
  at::Tensor valid;         // (B, H, W) contiguous uint8 view of the mask, or undefined
  bool appearance = false;  // bilateral weight > 0
  bool smoothness = false;  // gaussian weight > 0
  LatticeTensors appearance_lattice;
  SpatialLatticeTensors smoothness_lattice;
  double bilateral_weight = 0, gaussian_weight = 0;
  int64_t iterations = 1;
  int64_t batch = 0, channels = 0, height = 0, width = 0, num_pixels = 0;

  const uint8_t* valid_of(int64_t b) const {
    return valid.defined() ? valid.data_ptr<uint8_t>() + b * num_pixels : nullptr;
  }
};

// Checks every argument, converts unary (and the image) to the compute dtype
// (float64 stays float64, the other float dtypes run in float32) and builds
// the lattices of the kernels whose weight is positive, on unary's device.
// batch == 0 returns before building anything.
CRFInferenceCall prepare_crf_inference_call(const char* op, const at::Tensor& unary, const at::Tensor& image,
                                            const std::optional<at::Tensor>& valid_mask, double bilateral_weight,
                                            double bilateral_sigma_xy, double bilateral_sigma_rgb,
                                            double gaussian_weight, double gaussian_sigma_xy, int64_t iterations);

// Raises ValueError for the UnaryStatus bits the kernels reported per image,
// naming the batch elements and the first offending pixel.
void raise_for_unary_status(const char* op, const std::vector<int32_t>& status, const at::Tensor& unary);

}  // namespace ops
}  // namespace boxloss
