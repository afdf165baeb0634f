// Device-independent part of the permutohedral-lattice ops
// (boxloss::permutohedral_lattice, boxloss::lattice_filter) and of the ops
// that take a lattice (boxloss::dense_crf_loss): argument checks naming the
// argument and what it got, and the Lattice view the kernels read.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "boxloss/permutohedral/lattice.h"

namespace boxloss {
namespace ops {

// float64 stays float64; float32, float16 and bfloat16 run in float32.
at::ScalarType lattice_compute_dtype(at::ScalarType dtype);

std::string shape_string(const at::Tensor& t);

// image: (B, 3, H, W), floating point, non-empty; sigmas positive and finite.
void check_lattice_image(const char* op, const at::Tensor& image, double sigma_xy, double sigma_rgb);

// The four lattice tensors, checked against each other and against a batch
// of `batch` images of `num_pixels` pixels on `device` whose values run in
// `compute_dtype`, and the offsets' contents.  The kernels check every vertex
// number they read, so a hand-made lattice cannot make them read out of bounds.
struct LatticeTensors {
  at::Tensor splat_index;      // contiguous int32 (B, N, d+1)
  at::Tensor splat_weight;     // contiguous (B, N, d+1)
  at::Tensor blur_neighbours;  // contiguous int32 (d+1, V, 2)
  at::Tensor vertex_offsets;   // contiguous int64 (B+1,), on the device
  at::Tensor host_offsets;     // the same on the CPU

  // The view the kernels read; the CPU kernels take the offsets from host
  // memory, the CUDA kernels (device_offsets) from the device.
  template <typename scalar>
  permutohedral::Lattice<scalar> view(bool device_offsets = false) const {
    permutohedral::Lattice<scalar> l;
    l.splat_index = splat_index.data_ptr<int32_t>();
    l.splat_weight = splat_weight.data_ptr<scalar>();
    l.blur_neighbours = blur_neighbours.data_ptr<int32_t>();
    l.vertex_offsets = (device_offsets ? vertex_offsets : host_offsets).data_ptr<int64_t>();
    l.batch = splat_index.size(0);
    l.num_pixels = splat_index.size(1);
    l.total_vertices = blur_neighbours.size(1);
    return l;
  }
};

LatticeTensors check_lattice(const char* op, const at::Tensor& splat_index, const at::Tensor& splat_weight,
                             const at::Tensor& blur_neighbours, const at::Tensor& vertex_offsets, int64_t batch,
                             int64_t num_pixels, const at::Device& device, at::ScalarType compute_dtype);

// Raises ValueError naming the images whose lattice build reported a status bit.
void raise_for_lattice_status(const char* op, const std::vector<int32_t>& status, double sigma_xy, double sigma_rgb);

// values (B, C, H, W) in the compute dtype, contiguous, and the lattice checked against it.
struct FilterCall {
  at::Tensor values;
  LatticeTensors lattice;
};

FilterCall prepare_filter_call(const char* op, const at::Tensor& values, const at::Tensor& splat_index,
                               const at::Tensor& splat_weight, const at::Tensor& blur_neighbours,
                               const at::Tensor& vertex_offsets);

// Raises ValueError naming the images whose filter reported a FilterStatus
// bit (a corrupt lattice, or NaN/Inf in `values_name`).
void raise_for_filter_status(const char* op, const char* values_name, const std::vector<int32_t>& status);

}  // namespace ops
}  // namespace boxloss
