// Schema and device-independent part of boxloss::dense_crf_inference.
#include "crf_inference.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <sstream>
#include <string>
#include <tuple>

#include "boxloss/crf_inference/cpu.h"
#include "boxloss/crf_inference/math.h"

namespace boxloss {
namespace ops {
namespace {

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_weight(const char* op, const char* name, double value) {
  TORCH_CHECK_VALUE(std::isfinite(value) && value >= 0, op, ": ", name,
                    " must be a finite number >= 0 (0 drops the kernel), got ", value);
}

void check_sigma(const char* op, const char* name, double value) {
  TORCH_CHECK_VALUE(std::isfinite(value) && value > 0, op, ": ", name, " must be a positive finite number, got ",
                    value);
}

// The appearance kernel's lattice through the registered lattice op (CPU or
// CUDA kernel alike); its errors (a non-finite image, sigmas too small for the
// image) are raised again under this op's name.
LatticeTensors appearance_lattice(const char* op, const at::Tensor& image, double sigma_xy, double sigma_rgb) {
  static const auto lattice_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("boxloss::permutohedral_lattice", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, double, double)>();
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> built;
  try {
    built = lattice_op.call(image, sigma_xy, sigma_rgb);
  } catch (const c10::ValueError& e) {
    std::string message = e.what_without_backtrace();
    const std::string prefix = "permutohedral_lattice: ";
    if (message.rfind(prefix, 0) == 0) message = message.substr(prefix.size());
    TORCH_CHECK_VALUE(false, op, ": ", message, " (the appearance kernel, bilateral = (weight, sigma_xy = ", sigma_xy,
                      ", sigma_rgb = ", sigma_rgb, "))");
  }
  LatticeTensors l;
  l.splat_index = std::get<0>(built).contiguous();
  l.splat_weight = std::get<1>(built).contiguous();
  l.blur_neighbours = std::get<2>(built).contiguous();
  l.vertex_offsets = std::get<3>(built).contiguous();
  l.host_offsets = l.vertex_offsets.cpu();
  return l;
}

SpatialLatticeTensors smoothness_lattice(const char* op, int64_t height, int64_t width, double sigma_xy,
                                         at::ScalarType dtype, const at::Device& device) {
  const auto cpu = at::TensorOptions().device(at::kCPU);
  SpatialLatticeTensors s;
  s.splat_index = at::empty({height * width, crf_inference::cpu::kSmoothnessSimplex}, cpu.dtype(at::kInt));
  s.splat_weight = at::empty({height * width, crf_inference::cpu::kSmoothnessSimplex}, cpu.dtype(dtype));
  std::vector<int32_t> neighbours;
  int32_t status = 0;
  AT_DISPATCH_FLOATING_TYPES(dtype, "spatial_lattice", [&] {
    status = crf_inference::cpu::build_spatial_lattice<scalar_t>(
        height, width, sigma_xy, s.splat_index.data_ptr<int32_t>(), s.splat_weight.data_ptr<scalar_t>(), &neighbours,
        &s.num_vertices);
  });
  TORCH_CHECK_VALUE(status == 0, op, ": the positions x / sigma_xy, y / sigma_xy of a ", height, " x ", width,
                    " image exceed the lattice's range (about 1e6); the smoothness kernel's sigma_xy = ", sigma_xy,
                    " is too small for the image");
  s.blur_neighbours =
      at::from_blob(neighbours.data(), {crf_inference::cpu::kSmoothnessSimplex, s.num_vertices, 2}, cpu.dtype(at::kInt))
          .clone();
  if (device != at::kCPU) {
    // The spatial lattice depends on H, W and sigma only; it is built on the
    // host (a hash table over ~0.1 points per pixel) and copied.
    s.splat_index = s.splat_index.to(device);
    s.splat_weight = s.splat_weight.to(device);
    s.blur_neighbours = s.blur_neighbours.to(device);
  }
  return s;
}

// (b, y, x) of the first pixel where `bad` (B, H, W) holds, as text.
std::string first_pixel(const at::Tensor& bad) {
  const at::Tensor where = at::nonzero(bad.cpu());
  if (where.size(0) == 0) return "";
  const auto w = where[0];
  std::ostringstream out;
  out << " (first at batch element " << w[0].item<int64_t>() << ", y = " << w[1].item<int64_t>()
      << ", x = " << w[2].item<int64_t>() << ")";
  return out.str();
}

}  // namespace

CRFInferenceCall prepare_crf_inference_call(const char* op, const at::Tensor& unary, const at::Tensor& image,
                                            const std::optional<at::Tensor>& valid_mask, double bilateral_weight,
                                            double bilateral_sigma_xy, double bilateral_sigma_rgb,
                                            double gaussian_weight, double gaussian_sigma_xy, int64_t iterations) {
  TORCH_CHECK_TYPE(unary.defined(), op, ": unary must be a tensor");
  TORCH_CHECK_VALUE(unary.dim() == 4, op, ": unary must have shape (B, C, H, W), got shape ", shape_string(unary));
  TORCH_CHECK_TYPE(is_float_type(unary.scalar_type()), op,
                   ": unary must be float16, bfloat16, float32 or float64, got ", unary.scalar_type());
  const int64_t B = unary.size(0), C = unary.size(1), H = unary.size(2), W = unary.size(3);
  TORCH_CHECK_VALUE(C > 0 && H > 0 && W > 0, op, ": unary must have at least one class and one pixel, got shape ",
                    shape_string(unary));
  TORCH_CHECK_TYPE(image.defined(), op, ": image must be a tensor");
  TORCH_CHECK_VALUE(image.dim() == 4 && image.size(1) == 3, op,
                    ": image must have shape (B, 3, H, W) (RGB colours in [0, 255]), got shape ", shape_string(image));
  TORCH_CHECK_VALUE(image.size(0) == B && image.size(2) == H && image.size(3) == W, op,
                    ": image must match unary in B, H and W (unary ", shape_string(unary), "), got shape ",
                    shape_string(image));
  TORCH_CHECK_TYPE(is_float_type(image.scalar_type()) || image.scalar_type() == at::kByte, op,
                   ": image must be uint8 or a float dtype, got ", image.scalar_type());
  TORCH_CHECK_VALUE(image.device() == unary.device(), op, ": image must be on the device of unary (", unary.device(),
                    "), got ", image.device());
  check_weight(op, "bilateral weight", bilateral_weight);
  check_sigma(op, "bilateral sigma_xy", bilateral_sigma_xy);
  check_sigma(op, "bilateral sigma_rgb", bilateral_sigma_rgb);
  check_weight(op, "gaussian weight", gaussian_weight);
  check_sigma(op, "gaussian sigma_xy", gaussian_sigma_xy);
  TORCH_CHECK_VALUE(iterations >= 1, op, ": iterations must be >= 1, got ", iterations);

  CRFInferenceCall call;
  const at::ScalarType compute = lattice_compute_dtype(unary.scalar_type());
  call.batch = B;
  call.channels = C;
  call.height = H;
  call.width = W;
  call.num_pixels = H * W;
  call.iterations = iterations;
  call.bilateral_weight = bilateral_weight;
  call.gaussian_weight = gaussian_weight;
  if (valid_mask.has_value() && valid_mask->defined()) {
    const at::Tensor& mask = *valid_mask;
    TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, op, ": valid_mask must be a bool tensor, got ",
                     mask.scalar_type());
    TORCH_CHECK_VALUE(mask.dim() == 3 && mask.size(0) == B && mask.size(1) == H && mask.size(2) == W, op,
                      ": valid_mask must have shape (B, H, W) = (", B, ", ", H, ", ", W, "), got shape ",
                      shape_string(mask));
    TORCH_CHECK_VALUE(mask.device() == unary.device(), op, ": valid_mask must be on the device of unary (",
                      unary.device(), "), got ", mask.device());
    call.valid = mask.contiguous().view(at::kByte);
  }
  call.unary = unary.to(compute).contiguous();
  if (B == 0) return call;
  call.appearance = bilateral_weight > 0;
  call.smoothness = gaussian_weight > 0;
  if (call.appearance) {
    call.appearance_lattice =
        appearance_lattice(op, image.to(compute).contiguous(), bilateral_sigma_xy, bilateral_sigma_rgb);
  }
  if (call.smoothness) {
    call.smoothness_lattice = smoothness_lattice(op, H, W, gaussian_sigma_xy, compute, unary.device());
  }
  return call;
}

void raise_for_unary_status(const char* op, const std::vector<int32_t>& status, const at::Tensor& unary) {
  std::vector<int64_t> nan, negative, all_infinite;
  for (size_t b = 0; b < status.size(); ++b) {
    if (status[b] & crf_inference::kUnaryNaN) nan.push_back(static_cast<int64_t>(b));
    if (status[b] & crf_inference::kUnaryNegativeInfinity) negative.push_back(static_cast<int64_t>(b));
    if (status[b] & crf_inference::kUnaryAllInfinite) all_infinite.push_back(static_cast<int64_t>(b));
  }
  TORCH_CHECK_VALUE(nan.empty(), op, ": unary must not contain NaN, but batch element(s) ", at::IntArrayRef(nan), " do",
                    first_pixel(unary.isnan().any(1)));
  TORCH_CHECK_VALUE(negative.empty(), op,
                    ": unary must not be -Inf (it holds negative log-probabilities; +Inf marks an impossible "
                    "label), but batch element(s) ",
                    at::IntArrayRef(negative), " contain -Inf", first_pixel((unary == -INFINITY).any(1)));
  TORCH_CHECK_VALUE(all_infinite.empty(), op,
                    ": unary is +Inf for every class at some pixel (no label is possible there) in batch element(s) ",
                    at::IntArrayRef(all_infinite), first_pixel((unary == INFINITY).all(1)));
}

TORCH_LIBRARY_FRAGMENT(boxloss, m) {
  m.def(
      "dense_crf_inference(Tensor unary, Tensor image, Tensor? valid_mask, float bilateral_weight, "
      "float bilateral_sigma_xy, float bilateral_sigma_rgb, float gaussian_weight, float gaussian_sigma_xy, "
      "int iterations) -> Tensor");
}

}  // namespace ops
}  // namespace boxloss
