// CUDA kernels of the permutohedral-lattice ops: device guard, current
// stream, buffers and the vertex numbering (ATen scans) around the
// torch-free launchers of csrc/kernels/permutohedral.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "permutohedral_cuda.h"

namespace boxloss {
namespace ops {

template <typename scalar>
at::Tensor cuda_filter(const LatticeTensors& lattice, const permutohedral::cuda::FilterInput<scalar>& input,
                       bool reverse, at::Tensor& out) {
  const int64_t B = lattice.splat_index.size(0);
  const int64_t V = lattice.blur_neighbours.size(1);
  const int64_t channels = input.filtered_channels();
  const auto options = lattice.splat_weight.options();
  // Vertex rows of all images, plus a zero row that absent neighbours read.
  at::Tensor grid_a = at::zeros({(V + 1) * channels}, options);
  at::Tensor grid_b = at::empty({(V + 1) * channels}, options);
  grid_b.narrow(0, V * channels, channels).zero_();
  const at::Tensor counts = lattice.vertex_offsets.slice(0, 1) - lattice.vertex_offsets.slice(0, 0, B);
  const at::Tensor vertex_image =
      at::arange(B, options.dtype(at::kInt)).repeat_interleave(counts, 0, V).to(at::kInt).contiguous();
  at::Tensor status = at::zeros({B}, options.dtype(at::kInt));
  C10_CUDA_CHECK(permutohedral::cuda::launch_filter<scalar>(
      lattice.view<scalar>(/*device_offsets=*/true), vertex_image.data_ptr<int32_t>(), input, reverse,
      grid_a.data_ptr<scalar>(), grid_b.data_ptr<scalar>(), out.data_ptr<scalar>(), status.data_ptr<int32_t>(),
      at::cuda::getCurrentCUDAStream()));
  return status;
}

template at::Tensor cuda_filter<float>(const LatticeTensors&, const permutohedral::cuda::FilterInput<float>&, bool,
                                       at::Tensor&);
template at::Tensor cuda_filter<double>(const LatticeTensors&, const permutohedral::cuda::FilterInput<double>&, bool,
                                        at::Tensor&);

namespace {

using LatticeResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

std::vector<int32_t> to_vector(const at::Tensor& t) {
  const at::Tensor host = t.to(at::kCPU, at::kInt).contiguous();
  return std::vector<int32_t>(host.data_ptr<int32_t>(), host.data_ptr<int32_t>() + host.numel());
}

// Images are built in groups of at most about 2^21 pixels, which bounds the
// build's scratch memory (the keys of every (pixel, remainder) entry and the
// hash tables, about 170 bytes per pixel) whatever the batch.
LatticeResult permutohedral_lattice_cuda(const at::Tensor& image, double sigma_xy, double sigma_rgb) {
  constexpr const char* op = "permutohedral_lattice";
  namespace pc = permutohedral::cuda;
  const c10::cuda::CUDAGuard guard(image.device());
  check_lattice_image(op, image, sigma_xy, sigma_rgb);
  const at::ScalarType dtype = lattice_compute_dtype(image.scalar_type());
  const at::Tensor img = image.to(dtype).contiguous();
  const int64_t B = img.size(0), H = img.size(2), W = img.size(3), N = H * W;
  constexpr int64_t V1 = permutohedral::kVertices;
  const auto int_options = img.options().dtype(at::kInt);
  at::Tensor splat_index = at::empty({B, N, V1}, int_options);
  at::Tensor splat_weight = at::empty({B, N, V1}, img.options());
  const int64_t capacity = pc::table_capacity(N);
  const int64_t group = std::max<int64_t>(1, (int64_t{1} << 21) / N);
  std::vector<at::Tensor> neighbours, counts;
  std::vector<int32_t> status(static_cast<size_t>(B), 0);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (int64_t b0 = 0; b0 < B; b0 += group) {
    const int64_t nb = std::min(group, B - b0);
    at::Tensor entry_keys = at::empty({nb * N * V1 * permutohedral::kDim}, int_options);
    at::Tensor slot_entry = at::full({nb * capacity}, -1, int_options);
    at::Tensor entry_slot = at::empty({nb * N * V1}, int_options);
    at::Tensor group_status = at::zeros({nb}, int_options);
    pc::BuildBuffers buffers;
    buffers.entry_keys = entry_keys.data_ptr<int32_t>();
    buffers.slot_entry = slot_entry.data_ptr<int32_t>();
    buffers.entry_slot = entry_slot.data_ptr<int32_t>();
    buffers.status = group_status.data_ptr<int32_t>();
    buffers.capacity = capacity;
    C10_CUDA_CHECK(pc::launch_insert(
        static_cast<const char*>(img.data_ptr()) + b0 * 3 * N * img.element_size(),
        dtype == at::kDouble ? pc::DType::kFloat64 : pc::DType::kFloat32, nb, H, W, sigma_xy, sigma_rgb,
        static_cast<char*>(splat_weight.data_ptr()) + b0 * N * V1 * splat_weight.element_size(), buffers, stream));
    // One small device-to-host copy: bad images raise instead of building garbage.
    const std::vector<int32_t> s = to_vector(group_status);
    std::copy(s.begin(), s.end(), status.begin() + b0);
    // A vertex's number is its rank among its image's occupied slots.
    const at::Tensor occupied = slot_entry.view({nb, capacity}) >= 0;
    const at::Tensor slot_vertex = (occupied.cumsum(1, at::kInt) - 1).contiguous();
    const at::Tensor vertex_slot = at::nonzero(occupied.view({-1})).view({-1}).contiguous();  // synchronises
    const int64_t total = vertex_slot.size(0);
    at::Tensor group_neighbours = at::empty({V1, total, 2}, int_options);
    C10_CUDA_CHECK(pc::launch_finish(nb, N, buffers, slot_vertex.data_ptr<int32_t>(), vertex_slot.data_ptr<int64_t>(),
                                     total, splat_index.data_ptr<int32_t>() + b0 * N * V1,
                                     group_neighbours.data_ptr<int32_t>(), stream));
    neighbours.push_back(group_neighbours);
    counts.push_back(occupied.sum(1));
  }
  raise_for_lattice_status(op, status, sigma_xy, sigma_rgb);
  const at::Tensor vertex_counts = at::cat(counts);
  at::Tensor offsets = at::cat({at::zeros({1}, vertex_counts.options()), vertex_counts.cumsum(0)}).to(at::kLong);
  return {splat_index, splat_weight, at::cat(neighbours, 1), offsets};
}

at::Tensor lattice_filter_cuda(const at::Tensor& values, const at::Tensor& splat_index, const at::Tensor& splat_weight,
                               const at::Tensor& blur_neighbours, const at::Tensor& vertex_offsets, bool reverse) {
  constexpr const char* op = "lattice_filter";
  const c10::cuda::CUDAGuard guard(values.device());
  const FilterCall call = prepare_filter_call(op, values, splat_index, splat_weight, blur_neighbours, vertex_offsets);
  at::Tensor out = at::empty_like(call.values);
  at::Tensor status;
  AT_DISPATCH_FLOATING_TYPES(call.values.scalar_type(), "lattice_filter_cuda", [&] {
    permutohedral::cuda::FilterInput<scalar_t> input;
    input.values = call.values.data_ptr<scalar_t>();
    input.channels = call.values.size(1);
    status = cuda_filter<scalar_t>(call.lattice, input, reverse, out);
  });
  raise_for_filter_status(op, "values", to_vector(status));
  return out.to(values.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(boxloss, CUDA, m) {
  m.impl("permutohedral_lattice", &permutohedral_lattice_cuda);
  m.impl("lattice_filter", &lattice_filter_cuda);
}

}  // namespace ops
}  // namespace boxloss
