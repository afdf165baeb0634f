// CPU kernel of boxloss::dense_crf_inference: the torch-free mean-field loop
// (csrc/kernels/crf_inference) per image, in parallel over images or, with
// fewer images than threads, within each image.
#include <torch/library.h>

#include <vector>

#include "../permutohedral/permutohedral_cpu.h"
#include "boxloss/crf_inference/cpu.h"
#include "crf_inference.h"

namespace boxloss {
namespace ops {
namespace {

at::Tensor dense_crf_inference_cpu(const at::Tensor& unary, const at::Tensor& image,
                                   const std::optional<at::Tensor>& valid_mask, double bilateral_weight,
                                   double bilateral_sigma_xy, double bilateral_sigma_rgb, double gaussian_weight,
                                   double gaussian_sigma_xy, int64_t iterations) {
  constexpr const char* op = "dense_crf_inference";
  const CRFInferenceCall call =
      prepare_crf_inference_call(op, unary, image, valid_mask, bilateral_weight, bilateral_sigma_xy,
                                 bilateral_sigma_rgb, gaussian_weight, gaussian_sigma_xy, iterations);
  at::Tensor out = at::empty_like(call.unary);
  const int64_t B = call.batch, C = call.channels, N = call.num_pixels;
  if (B == 0) return out.to(unary.scalar_type());
  std::vector<int32_t> status(static_cast<size_t>(B), 0);
  AT_DISPATCH_FLOATING_TYPES(call.unary.scalar_type(), "dense_crf_inference_cpu", [&] {
    crf_inference::cpu::KernelLattice<scalar_t> appearance, smoothness;
    permutohedral::Lattice<scalar_t> bilateral;
    if (call.appearance) {
      bilateral = call.appearance_lattice.view<scalar_t>();
      appearance.axis_stride = 2 * bilateral.total_vertices;
      appearance.weight = call.bilateral_weight;
    }
    if (call.smoothness) {
      const SpatialLatticeTensors& s = call.smoothness_lattice;
      smoothness.splat_index = s.splat_index.data_ptr<int32_t>();
      smoothness.splat_weight = s.splat_weight.data_ptr<scalar_t>();
      smoothness.neighbours = s.blur_neighbours.data_ptr<int32_t>();
      smoothness.axis_stride = 2 * s.num_vertices;
      smoothness.num_vertices = s.num_vertices;
      smoothness.weight = call.gaussian_weight;
    }
    for_each_image(B, N, [&](int64_t b, const permutohedral::cpu::RangeRunner& runner) {
      crf_inference::cpu::MeanFieldImage<scalar_t> problem;
      problem.unary = call.unary.data_ptr<scalar_t>() + b * C * N;
      problem.channels = C;
      problem.num_pixels = N;
      problem.valid = call.valid_of(b);
      problem.appearance = appearance;
      if (call.appearance) {
        problem.appearance.splat_index = bilateral.index_of(b);
        problem.appearance.splat_weight = bilateral.weight_of(b);
        problem.appearance.neighbours = bilateral.neighbours_of(b, 0, 0);
        problem.appearance.num_vertices = bilateral.vertices_of(b);
      }
      problem.smoothness = smoothness;
      problem.iterations = call.iterations;
      problem.out = out.data_ptr<scalar_t>() + b * C * N;
      status[b] = crf_inference::cpu::mean_field_image<scalar_t>(problem, runner);
    });
  });
  raise_for_unary_status(op, status, call.unary);
  return out.to(unary.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(boxloss, CPU, m) { m.impl("dense_crf_inference", &dense_crf_inference_cpu); }

}  // namespace ops
}  // namespace boxloss
