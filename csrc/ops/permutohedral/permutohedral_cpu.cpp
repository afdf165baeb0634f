// CPU kernels of the permutohedral-lattice ops: at::parallel_for over images,
// or within each image when there are fewer images than threads, around the
// torch-free core of csrc/kernels/permutohedral.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "boxloss/permutohedral/cpu.h"
#include "permutohedral.h"
#include "permutohedral_cpu.h"

namespace boxloss {
namespace ops {

void parallel_runner(int64_t n, int64_t grain, const permutohedral::cpu::RangeFn& fn) {
  at::parallel_for(0, n, grain, fn);
}

int64_t images_per_task(int64_t num_pixels) {
  // A parallel region costs tens of microseconds (far more on a loaded
  // machine); small images are grouped so that each task has work enough.
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, num_pixels));
}

void for_each_image(int64_t batch, int64_t num_pixels,
                    const std::function<void(int64_t, const permutohedral::cpu::RangeRunner&)>& fn) {
  // Across images when there are enough of them to keep every thread busy
  // (each image then runs on one thread), else one image at a time with
  // every thread on it.  Either way each image's result is the same.
  if (batch >= at::get_num_threads()) {
    at::parallel_for(0, batch, images_per_task(num_pixels), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) fn(b, permutohedral::cpu::run_serially);
    });
  } else {
    const permutohedral::cpu::RangeRunner runner(parallel_runner, at::get_num_threads());
    for (int64_t b = 0; b < batch; ++b) fn(b, runner);
  }
}

namespace {

using LatticeResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

LatticeResult permutohedral_lattice_cpu(const at::Tensor& image, double sigma_xy, double sigma_rgb) {
  constexpr const char* op = "permutohedral_lattice";
  check_lattice_image(op, image, sigma_xy, sigma_rgb);
  const at::ScalarType dtype = lattice_compute_dtype(image.scalar_type());
  const at::Tensor img = image.to(dtype).contiguous();
  const int64_t B = img.size(0), H = img.size(2), W = img.size(3), N = H * W;
  const auto int_options = img.options().dtype(at::kInt);
  at::Tensor splat_index = at::empty({B, N, permutohedral::kVertices}, int_options);
  at::Tensor splat_weight = at::empty({B, N, permutohedral::kVertices}, img.options());
  std::vector<permutohedral::cpu::ImageLattice> lattices(static_cast<size_t>(B));
  at::parallel_for(0, B, images_per_task(N), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      if (dtype == at::kDouble) {
        permutohedral::cpu::build_lattice<double>(img.data_ptr<double>() + b * 3 * N, H, W, sigma_xy, sigma_rgb,
                                                  splat_index.data_ptr<int32_t>() + b * N * permutohedral::kVertices,
                                                  splat_weight.data_ptr<double>() + b * N * permutohedral::kVertices,
                                                  &lattices[b]);
      } else {
        permutohedral::cpu::build_lattice<float>(img.data_ptr<float>() + b * 3 * N, H, W, sigma_xy, sigma_rgb,
                                                 splat_index.data_ptr<int32_t>() + b * N * permutohedral::kVertices,
                                                 splat_weight.data_ptr<float>() + b * N * permutohedral::kVertices,
                                                 &lattices[b]);
      }
    }
  });
  std::vector<int32_t> status(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) status[b] = lattices[b].status;
  raise_for_lattice_status(op, status, sigma_xy, sigma_rgb);

  at::Tensor offsets = at::empty({B + 1}, img.options().dtype(at::kLong));
  int64_t* o = offsets.data_ptr<int64_t>();
  o[0] = 0;
  for (int64_t b = 0; b < B; ++b) o[b + 1] = o[b] + lattices[b].num_vertices;
  const int64_t total = o[B];
  at::Tensor neighbours = at::empty({permutohedral::kVertices, total, 2}, int_options);
  int32_t* dst = neighbours.data_ptr<int32_t>();
  at::parallel_for(0, B, images_per_task(N), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t count = lattices[b].num_vertices;
      for (int axis = 0; axis < permutohedral::kVertices; ++axis) {
        const int32_t* src = lattices[b].neighbours.data() + axis * count * 2;
        std::copy(src, src + count * 2, dst + (axis * total + o[b]) * 2);
      }
    }
  });
  return {splat_index, splat_weight, neighbours, offsets};
}

at::Tensor lattice_filter_cpu(const at::Tensor& values, const at::Tensor& splat_index, const at::Tensor& splat_weight,
                              const at::Tensor& blur_neighbours, const at::Tensor& vertex_offsets, bool reverse) {
  constexpr const char* op = "lattice_filter";
  const FilterCall call = prepare_filter_call(op, values, splat_index, splat_weight, blur_neighbours, vertex_offsets);
  const int64_t B = call.values.size(0), C = call.values.size(1), N = call.lattice.splat_index.size(1);
  at::Tensor out = at::empty_like(call.values);
  std::vector<int32_t> status(static_cast<size_t>(B), 0);
  AT_DISPATCH_FLOATING_TYPES(call.values.scalar_type(), "lattice_filter_cpu", [&] {
    const auto lattice = call.lattice.view<scalar_t>();
    for_each_image(B, N, [&](int64_t b, const permutohedral::cpu::RangeRunner& runner) {
      permutohedral::cpu::FilterInput<scalar_t> input;
      input.values = call.values.data_ptr<scalar_t>() + b * C * N;
      input.channels = C;
      status[b] = permutohedral::cpu::filter_image<scalar_t>(lattice, b, input, reverse,
                                                             out.data_ptr<scalar_t>() + b * C * N, runner);
    });
  });
  raise_for_filter_status(op, "values", status);
  return out.to(values.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(boxloss, CPU, m) {
  m.impl("permutohedral_lattice", &permutohedral_lattice_cpu);
  m.impl("lattice_filter", &lattice_filter_cpu);
}

}  // namespace ops
}  // namespace boxloss
