// Schemas and device-independent checks of the permutohedral-lattice ops.
#include "permutohedral.h"

#include <torch/library.h>

#include <cmath>
#include <sstream>

namespace boxloss {
namespace ops {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

std::string image_list(const std::vector<int64_t>& images) {
  std::ostringstream out;
  out << at::IntArrayRef(images);
  return out.str();
}

}  // namespace

at::ScalarType lattice_compute_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

std::string shape_string(const at::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

void check_lattice_image(const char* op, const at::Tensor& image, double sigma_xy, double sigma_rgb) {
  TORCH_CHECK_TYPE(image.defined(), op, ": image must be a tensor");
  TORCH_CHECK_VALUE(image.dim() == 4, op, ": image must have shape (B, 3, H, W), got shape ", shape_string(image));
  TORCH_CHECK_VALUE(image.size(1) == 3, op, ": image must have 3 (RGB) channels, got shape ", shape_string(image));
  TORCH_CHECK_TYPE(is_supported_float(image.scalar_type()), op,
                   ": image must be float16, bfloat16, float32 or float64, got ", image.scalar_type());
  TORCH_CHECK_VALUE(image.size(0) > 0 && image.size(2) > 0 && image.size(3) > 0, op,
                    ": image must be non-empty in every dimension, got shape ", shape_string(image));
  TORCH_CHECK_VALUE(std::isfinite(sigma_xy) && sigma_xy > 0, op, ": sigma_xy must be a positive finite number, got ",
                    sigma_xy);
  TORCH_CHECK_VALUE(std::isfinite(sigma_rgb) && sigma_rgb > 0, op, ": sigma_rgb must be a positive finite number, got ",
                    sigma_rgb);
}

LatticeTensors check_lattice(const char* op, const at::Tensor& splat_index, const at::Tensor& splat_weight,
                             const at::Tensor& blur_neighbours, const at::Tensor& vertex_offsets, int64_t batch,
                             int64_t num_pixels, const at::Device& device, at::ScalarType compute_dtype) {
  constexpr int64_t V1 = permutohedral::kVertices;
  TORCH_CHECK_TYPE(splat_index.scalar_type() == at::kInt, op, ": splat_index must be an int32 tensor, got ",
                   splat_index.scalar_type());
  TORCH_CHECK_TYPE(blur_neighbours.scalar_type() == at::kInt, op, ": blur_neighbours must be an int32 tensor, got ",
                   blur_neighbours.scalar_type());
  TORCH_CHECK_TYPE(vertex_offsets.scalar_type() == at::kLong, op, ": vertex_offsets must be an int64 tensor, got ",
                   vertex_offsets.scalar_type());
  TORCH_CHECK_TYPE(splat_weight.scalar_type() == compute_dtype, op, ": splat_weight must be ", compute_dtype,
                   " for these values (a float64 lattice filters float64 values, a float32 lattice the others)",
                   ", got ", splat_weight.scalar_type());
  TORCH_CHECK_VALUE(splat_index.dim() == 3 && splat_index.size(0) == batch && splat_index.size(1) == num_pixels &&
                        splat_index.size(2) == V1,
                    op, ": splat_index must have shape (B, H*W, 6) = (", batch, ", ", num_pixels, ", 6), got shape ",
                    shape_string(splat_index));
  TORCH_CHECK_VALUE(splat_weight.sizes() == splat_index.sizes(), op, ": splat_weight must have shape ",
                    shape_string(splat_index), " like splat_index, got shape ", shape_string(splat_weight));
  TORCH_CHECK_VALUE(blur_neighbours.dim() == 3 && blur_neighbours.size(0) == V1 && blur_neighbours.size(2) == 2, op,
                    ": blur_neighbours must have shape (6, V, 2), got shape ", shape_string(blur_neighbours));
  TORCH_CHECK_VALUE(vertex_offsets.dim() == 1 && vertex_offsets.size(0) == batch + 1, op,
                    ": vertex_offsets must have shape (B+1,) = (", batch + 1, ",), got shape ",
                    shape_string(vertex_offsets));
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"splat_index", &splat_index},
                                {"splat_weight", &splat_weight},
                                {"blur_neighbours", &blur_neighbours},
                                {"vertex_offsets", &vertex_offsets}}) {
    TORCH_CHECK_VALUE(t->device() == device, op, ": ", name, " must be on the device of the values (", device,
                      "), got ", t->device());
  }
  LatticeTensors l;
  l.splat_index = splat_index.contiguous();
  l.splat_weight = splat_weight.contiguous();
  l.blur_neighbours = blur_neighbours.contiguous();
  l.vertex_offsets = vertex_offsets.contiguous();
  l.host_offsets = l.vertex_offsets.cpu();
  const int64_t* o = l.host_offsets.data_ptr<int64_t>();
  const int64_t total = blur_neighbours.size(1);
  bool offsets_ok = o[0] == 0 && o[batch] == total;
  for (int64_t b = 0; b < batch && offsets_ok; ++b) offsets_ok = o[b] <= o[b + 1];
  TORCH_CHECK_VALUE(offsets_ok, op, ": vertex_offsets must rise from 0 to the ", total,
                    " vertices of blur_neighbours, got ", l.host_offsets.sizes(), " values ",
                    at::IntArrayRef(o, static_cast<size_t>(batch + 1)));
  // The vertex numbers themselves are checked by the kernels as they read
  // them (an out-of-range number reads a zero row and is reported through
  // raise_for_filter_status), which costs nothing next to a separate pass.
  return l;
}

void raise_for_lattice_status(const char* op, const std::vector<int32_t>& status, double sigma_xy, double sigma_rgb) {
  std::vector<int64_t> not_finite, too_large;
  for (size_t b = 0; b < status.size(); ++b) {
    if (status[b] & permutohedral::kImageNotFinite) not_finite.push_back(static_cast<int64_t>(b));
    if (status[b] & permutohedral::kFeaturesTooLarge) too_large.push_back(static_cast<int64_t>(b));
  }
  TORCH_CHECK_VALUE(not_finite.empty(), op, ": image must be finite, but it contains NaN or Inf in batch element(s) ",
                    image_list(not_finite));
  TORCH_CHECK_VALUE(too_large.empty(), op, ": the features x / sigma_xy, y / sigma_xy and colour / sigma_rgb of ",
                    "batch element(s) ", image_list(too_large), " exceed the lattice's range (about 1e6); ",
                    "sigma_xy = ", sigma_xy, " or sigma_rgb = ", sigma_rgb,
                    " is too small for the image's size or colour range");
}

FilterCall prepare_filter_call(const char* op, const at::Tensor& values, const at::Tensor& splat_index,
                               const at::Tensor& splat_weight, const at::Tensor& blur_neighbours,
                               const at::Tensor& vertex_offsets) {
  TORCH_CHECK_TYPE(values.defined(), op, ": values must be a tensor");
  TORCH_CHECK_VALUE(values.dim() == 4, op, ": values must have shape (B, C, H, W), got shape ", shape_string(values));
  const auto dtype = values.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
                   ": values must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK_VALUE(values.size(0) > 0 && values.size(2) > 0 && values.size(3) > 0, op,
                    ": values must be non-empty in B, H and W, got shape ", shape_string(values));
  FilterCall call;
  const at::ScalarType compute = lattice_compute_dtype(dtype);
  call.lattice = check_lattice(op, splat_index, splat_weight, blur_neighbours, vertex_offsets, values.size(0),
                               values.size(2) * values.size(3), values.device(), compute);
  call.values = values.to(compute).contiguous();
  return call;
}

void raise_for_filter_status(const char* op, const char* values_name, const std::vector<int32_t>& status) {
  std::vector<int64_t> not_finite, corrupt;
  for (size_t b = 0; b < status.size(); ++b) {
    if (status[b] & permutohedral::kValuesNotFinite) not_finite.push_back(static_cast<int64_t>(b));
    if (status[b] & permutohedral::kLatticeCorrupt) corrupt.push_back(static_cast<int64_t>(b));
  }
  TORCH_CHECK_VALUE(corrupt.empty(), op, ": the lattice of batch element(s) ", at::IntArrayRef(corrupt),
                    " holds vertex numbers outside its image's range (splat_index must lie in [0, V_b) and ",
                    "blur_neighbours in [-1, V_b), V_b = vertex_offsets[b+1] - vertex_offsets[b]); pass a lattice "
                    "from permutohedral_lattice");
  TORCH_CHECK_VALUE(not_finite.empty(), op, ": ", values_name, " must be finite, but it contains NaN or Inf in ",
                    "batch element(s) ", at::IntArrayRef(not_finite));
}

TORCH_LIBRARY_FRAGMENT(boxloss, m) {
  m.def(
      "permutohedral_lattice(Tensor image, float sigma_xy, float sigma_rgb) -> "
      "(Tensor splat_index, Tensor splat_weight, Tensor blur_neighbours, Tensor vertex_offsets)");
  m.def(
      "lattice_filter(Tensor values, Tensor splat_index, Tensor splat_weight, Tensor blur_neighbours, "
      "Tensor vertex_offsets, bool reverse) -> Tensor");
}

}  // namespace ops
}  // namespace boxloss
