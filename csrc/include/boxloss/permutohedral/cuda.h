// Torch-free launchers of the CUDA permutohedral lattice and filter.  The
// torch ops (csrc/ops/permutohedral/permutohedral_cuda.cpp) allocate the
// buffers, number the vertices between the two build launches, and pass
// their stream; these functions only launch and report the launch status.
//
// The build inserts every (pixel, remainder) vertex key of all images at once
// into one device hash table per image (open addressing, linear probing,
// slots claimed with atomicCAS); a slot's vertex number is its rank among
// the image's occupied slots, so vertex numbers depend on which of two
// colliding keys claimed a slot first: they can differ from run to run and
// from the CPU's first-use numbering, while the lattice they describe (the
// keys, each pixel's vertices and weights, the neighbours) is the same.
// The splat adds with atomics, so filter outputs can differ from run to run
// in the last bits of float rounding; blur and slice are gathers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "boxloss/permutohedral/lattice.h"

namespace boxloss {
namespace permutohedral {
namespace cuda {

enum class DType : int32_t { kFloat32 = 0, kFloat64 = 1 };

constexpr int kThreads = 256;

// Slots per image's hash table: a power of two >= 2 (d+1) N, so the table is
// never more than half full whatever the image.
int64_t table_capacity(int64_t num_pixels);

// Buffers of the build, allocated by the caller.
struct BuildBuffers {
  int32_t* entry_keys = nullptr;  // (batch * N * (d+1), d): the key of each (pixel, remainder)
  int32_t* slot_entry = nullptr;  // (batch * capacity): the entry that claimed the slot, -1 (caller-filled) if free
  int32_t* entry_slot = nullptr;  // (batch * N * (d+1)): the slot (within its image's table) of each entry
  int32_t* status = nullptr;      // (batch): LatticeStatus bits, zeroed by the caller
  int64_t capacity = 0;
};

// Locates every pixel's simplex, writes splat_weight (batch, N, d+1) and the
// entries' keys, and inserts the keys into the images' tables.
cudaError_t launch_insert(const void* image, DType dtype, int64_t batch, int64_t height, int64_t width, double sigma_xy,
                          double sigma_rgb, void* splat_weight, const BuildBuffers& buffers, cudaStream_t stream);

// After the caller has numbered the occupied slots (slot_vertex: (batch *
// capacity) local vertex number of each occupied slot; vertex_slot: (total
// vertices) the global slot index of each vertex, image by image): writes
// splat_index (batch, N, d+1) and blur_neighbours (d+1, total_vertices, 2).
cudaError_t launch_finish(int64_t batch, int64_t num_pixels, const BuildBuffers& buffers, const int32_t* slot_vertex,
                          const int64_t* vertex_slot, int64_t total_vertices, int32_t* splat_index,
                          int32_t* blur_neighbours, cudaStream_t stream);

// What the filter reads, as in the CPU core: `channels` planes per image
// (batch, channels, N), optionally masked (batch, N) and with the mask (or
// ones) appended as one more channel.
template <typename scalar>
struct FilterInput {
  const scalar* values = nullptr;
  int64_t channels = 0;
  const uint8_t* mask = nullptr;
  bool append_mask = false;

  BOXLOSS_HD_INLINE int64_t filtered_channels() const { return channels + (append_mask ? 1 : 0); }
};

// out (batch, filtered_channels, N) = alpha S^T B S in, image by image.
// `lattice.vertex_offsets` must be device memory here; vertex_image
// (total_vertices) holds each vertex's image; grid_a and grid_b are
// ((total_vertices + 1) * filtered_channels) scratch buffers.  status (batch,
// zeroed by the caller) receives FilterStatus bits.
template <typename scalar>
cudaError_t launch_filter(const Lattice<scalar>& lattice, const int32_t* vertex_image, const FilterInput<scalar>& input,
                          bool reverse, scalar* grid_a, scalar* grid_b, scalar* out, int32_t* status,
                          cudaStream_t stream);

}  // namespace cuda
}  // namespace permutohedral
}  // namespace boxloss
