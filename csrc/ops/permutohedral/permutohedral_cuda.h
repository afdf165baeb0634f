// The CUDA lattice filter, shared by the ops that filter on the GPU.
#pragma once

#include <ATen/ATen.h>

#include "boxloss/permutohedral/cuda.h"
#include "permutohedral.h"

namespace boxloss {
namespace ops {

// out (B, filtered_channels, H*W) = the lattice filter of `input`, on the
// current stream; returns the (B,) int32 FilterStatus bits, on the device.
template <typename scalar>
at::Tensor cuda_filter(const LatticeTensors& lattice, const permutohedral::cuda::FilterInput<scalar>& input,
                       bool reverse, at::Tensor& out);

}  // namespace ops
}  // namespace boxloss
