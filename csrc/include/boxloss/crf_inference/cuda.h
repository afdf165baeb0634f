// Torch-free launchers of CUDA DenseCRF mean-field inference (math.h).  The
// torch op (csrc/ops/crf_inference/crf_inference_cuda.cpp) builds the
// lattices, allocates the buffers and passes its stream; these functions only
// launch and report the launch status.
//
// All images of the batch run in the same launches.  Vertex rows hold the
// `channels` values of one lattice point; the appearance grids hold the rows
// of every image's lattice (image b's from vertex_offsets[b]) and a last zero
// row, the smoothness grids one copy of the shared spatial lattice per image
// (image b's rows from b * num_vertices) and a last zero row.  The splat adds
// with atomics, so results can differ from run to run in the last bits.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "boxloss/crf_inference/math.h"

namespace boxloss {
namespace crf_inference {
namespace cuda {

constexpr int kThreads = 256;

// The appearance kernel's lattice (the layout of boxloss::permutohedral_lattice).
template <typename scalar>
struct AppearanceLattice {
  const int32_t* splat_index = nullptr;      // (batch, N, 6), local vertex numbers
  const scalar* splat_weight = nullptr;      // (batch, N, 6)
  const int32_t* blur_neighbours = nullptr;  // (6, total_vertices, 2), local numbers, -1 if absent
  const int64_t* vertex_offsets = nullptr;   // (batch + 1), device memory
  const int32_t* vertex_image = nullptr;     // (total_vertices): the image of each vertex
  int64_t total_vertices = 0;
  double weight = 0.0;  // 0: the kernel is skipped
};

// The smoothness kernel's 2-d lattice, the same for every image.
template <typename scalar>
struct SmoothnessLattice {
  const int32_t* splat_index = nullptr;      // (N, 3)
  const scalar* splat_weight = nullptr;      // (N, 3)
  const int32_t* blur_neighbours = nullptr;  // (3, num_vertices, 2), -1 if absent
  int64_t num_vertices = 0;
  double weight = 0.0;
};

template <typename scalar>
struct MeanFieldBatch {
  const scalar* unary = nullptr;   // (batch, channels, N)
  const uint8_t* valid = nullptr;  // (batch, N) or nullptr
  int64_t batch = 0, channels = 0, num_pixels = 0;
  AppearanceLattice<scalar> appearance;
  SmoothnessLattice<scalar> smoothness;
  int64_t iterations = 1;
  scalar* out = nullptr;  // (batch, channels, N)
};

// Scratch of the loop, allocated by the caller.
template <typename scalar>
struct MeanFieldBuffers {
  scalar* rows = nullptr;  // (batch * N, channels): each pixel's logits / Q
  // Appearance ((total_vertices + 1) * channels each; zero-filled by the caller) and their
  // per-pixel weights (batch * N * 6 each); null when the kernel is skipped.
  scalar* appearance_grid[2] = {nullptr, nullptr};
  scalar* appearance_splat = nullptr;
  scalar* appearance_slice = nullptr;
  // Smoothness ((batch * num_vertices + 1) * channels each; zero-filled) and weights (batch * N * 3 each).
  scalar* smoothness_grid[2] = {nullptr, nullptr};
  scalar* smoothness_splat = nullptr;
  scalar* smoothness_slice = nullptr;
};

// status (batch, zeroed by the caller) |= UnaryStatus bits of each image's unaries.
template <typename scalar>
cudaError_t launch_check_unary(const MeanFieldBatch<scalar>& batch, int32_t* status, cudaStream_t stream);

// The whole loop: normalisers and per-pixel weights, then `iterations` steps;
// writes batch.out.  The unaries must have passed launch_check_unary.
template <typename scalar>
cudaError_t launch_mean_field(const MeanFieldBatch<scalar>& batch, const MeanFieldBuffers<scalar>& buffers,
                              cudaStream_t stream);

}  // namespace cuda
}  // namespace crf_inference
}  // namespace boxloss
