// The lattice of one image as the torch wrappers hand it to the torch-free
// kernels (CPU core and CUDA launchers), in the layout of the tensors that
// boxloss::permutohedral_lattice returns.
#pragma once

#include <cstdint>

#include "boxloss/permutohedral/math.h"

namespace boxloss {
namespace permutohedral {

// Lattice of a batch.  Vertex numbers are local to their image; image b's
// vertices are rows [vertex_offsets[b], vertex_offsets[b+1]) of the
// neighbour table, which is laid out axis-major so that each blur pass reads
// one contiguous block.
template <typename scalar>
struct Lattice {
  const int32_t* splat_index = nullptr;      // (batch, num_pixels, d+1): the simplex vertices of each pixel
  const scalar* splat_weight = nullptr;      // (batch, num_pixels, d+1): barycentric weights, summing to 1
  const int32_t* blur_neighbours = nullptr;  // (d+1, total_vertices, 2): one step down / up each axis, -1 if absent
  const int64_t* vertex_offsets = nullptr;   // (batch + 1,), host memory for the CPU kernels
  int64_t batch = 0;
  int64_t num_pixels = 0;
  int64_t total_vertices = 0;

  BOXLOSS_HD_INLINE int64_t vertices_of(int64_t b) const { return vertex_offsets[b + 1] - vertex_offsets[b]; }
  BOXLOSS_HD_INLINE const int32_t* index_of(int64_t b) const { return splat_index + b * num_pixels * kVertices; }
  BOXLOSS_HD_INLINE const scalar* weight_of(int64_t b) const { return splat_weight + b * num_pixels * kVertices; }
  // Neighbour pair (down, up) of local vertex v of image b along `axis`.
  BOXLOSS_HD_INLINE const int32_t* neighbours_of(int64_t b, int axis, int64_t v) const {
    return blur_neighbours + (static_cast<int64_t>(axis) * total_vertices + vertex_offsets[b] + v) * 2;
  }
};

}  // namespace permutohedral
}  // namespace boxloss
