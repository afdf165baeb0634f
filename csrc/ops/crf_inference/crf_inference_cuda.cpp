// CUDA kernel of boxloss::dense_crf_inference: device guard, current stream,
// buffers and the unary check around the torch-free launchers of
// csrc/kernels/crf_inference.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "boxloss/crf_inference/cuda.h"
#include "crf_inference.h"

namespace boxloss {
namespace ops {
namespace {

namespace cc = crf_inference::cuda;

template <typename scalar>
cc::MeanFieldBatch<scalar> batch_view(const CRFInferenceCall& call, const at::Tensor& vertex_image, at::Tensor& out) {
  cc::MeanFieldBatch<scalar> mf;
  mf.unary = call.unary.data_ptr<scalar>();
  mf.valid = call.valid.defined() ? call.valid.data_ptr<uint8_t>() : nullptr;
  mf.batch = call.batch;
  mf.channels = call.channels;
  mf.num_pixels = call.num_pixels;
  if (call.appearance) {
    const LatticeTensors& l = call.appearance_lattice;
    mf.appearance.splat_index = l.splat_index.data_ptr<int32_t>();
    mf.appearance.splat_weight = l.splat_weight.data_ptr<scalar>();
    mf.appearance.blur_neighbours = l.blur_neighbours.data_ptr<int32_t>();
    mf.appearance.vertex_offsets = l.vertex_offsets.data_ptr<int64_t>();
    mf.appearance.vertex_image = vertex_image.data_ptr<int32_t>();
    mf.appearance.total_vertices = l.blur_neighbours.size(1);
    mf.appearance.weight = call.bilateral_weight;
  }
  if (call.smoothness) {
    const SpatialLatticeTensors& s = call.smoothness_lattice;
    mf.smoothness.splat_index = s.splat_index.data_ptr<int32_t>();
    mf.smoothness.splat_weight = s.splat_weight.data_ptr<scalar>();
    mf.smoothness.blur_neighbours = s.blur_neighbours.data_ptr<int32_t>();
    mf.smoothness.num_vertices = s.num_vertices;
    mf.smoothness.weight = call.gaussian_weight;
  }
  mf.iterations = call.iterations;
  mf.out = out.data_ptr<scalar>();
  return mf;
}

at::Tensor dense_crf_inference_cuda(const at::Tensor& unary, const at::Tensor& image,
                                    const std::optional<at::Tensor>& valid_mask, double bilateral_weight,
                                    double bilateral_sigma_xy, double bilateral_sigma_rgb, double gaussian_weight,
                                    double gaussian_sigma_xy, int64_t iterations) {
  constexpr const char* op = "dense_crf_inference";
  const c10::cuda::CUDAGuard guard(unary.device());
  const CRFInferenceCall call =
      prepare_crf_inference_call(op, unary, image, valid_mask, bilateral_weight, bilateral_sigma_xy,
                                 bilateral_sigma_rgb, gaussian_weight, gaussian_sigma_xy, iterations);
  at::Tensor out = at::empty_like(call.unary);
  const int64_t B = call.batch, C = call.channels, N = call.num_pixels;
  if (B == 0) return out.to(unary.scalar_type());
  const auto options = call.unary.options();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor vertex_image;
  int64_t appearance_rows = 0;
  if (call.appearance) {
    const LatticeTensors& l = call.appearance_lattice;
    appearance_rows = l.blur_neighbours.size(1);
    const at::Tensor counts = l.vertex_offsets.slice(0, 1) - l.vertex_offsets.slice(0, 0, B);
    vertex_image =
        at::arange(B, options.dtype(at::kInt)).repeat_interleave(counts, 0, appearance_rows).to(at::kInt).contiguous();
  }
  const int64_t smoothness_rows = call.smoothness ? B * call.smoothness_lattice.num_vertices : 0;
  at::Tensor status = at::zeros({B}, options.dtype(at::kInt));
  at::Tensor rows = at::empty({B * N, C}, options);
  // Each kernel's two grids (zero-filled: the last row of each stays zero) and per-pixel weights.
  const auto grid = [&](int64_t vertex_rows) { return at::zeros({(vertex_rows + 1) * C}, options); };
  at::Tensor a_grid0, a_grid1, a_splat, a_slice, s_grid0, s_grid1, s_splat, s_slice;
  if (call.appearance) {
    a_grid0 = grid(appearance_rows);
    a_grid1 = grid(appearance_rows);
    a_splat = at::empty({B * N * 6}, options);
    a_slice = at::empty({B * N * 6}, options);
  }
  if (call.smoothness) {
    s_grid0 = grid(smoothness_rows);
    s_grid1 = grid(smoothness_rows);
    s_splat = at::empty({B * N * 3}, options);
    s_slice = at::empty({B * N * 3}, options);
  }
  AT_DISPATCH_FLOATING_TYPES(call.unary.scalar_type(), "dense_crf_inference_cuda", [&] {
    const auto mf = batch_view<scalar_t>(call, vertex_image, out);
    C10_CUDA_CHECK(cc::launch_check_unary<scalar_t>(mf, status.data_ptr<int32_t>(), stream));
    // One small device-to-host copy: bad unaries raise before the loop runs.
    const at::Tensor host_status = status.cpu();
    const std::vector<int32_t> bits(host_status.data_ptr<int32_t>(), host_status.data_ptr<int32_t>() + B);
    raise_for_unary_status(op, bits, call.unary);
    cc::MeanFieldBuffers<scalar_t> buffers;
    buffers.rows = rows.data_ptr<scalar_t>();
    if (call.appearance) {
      buffers.appearance_grid[0] = a_grid0.data_ptr<scalar_t>();
      buffers.appearance_grid[1] = a_grid1.data_ptr<scalar_t>();
      buffers.appearance_splat = a_splat.data_ptr<scalar_t>();
      buffers.appearance_slice = a_slice.data_ptr<scalar_t>();
    }
    if (call.smoothness) {
      buffers.smoothness_grid[0] = s_grid0.data_ptr<scalar_t>();
      buffers.smoothness_grid[1] = s_grid1.data_ptr<scalar_t>();
      buffers.smoothness_splat = s_splat.data_ptr<scalar_t>();
      buffers.smoothness_slice = s_slice.data_ptr<scalar_t>();
    }
    C10_CUDA_CHECK(cc::launch_mean_field<scalar_t>(mf, buffers, stream));
  });
  return out.to(unary.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(boxloss, CUDA, m) { m.impl("dense_crf_inference", &dense_crf_inference_cuda); }

}  // namespace ops
}  // namespace boxloss
