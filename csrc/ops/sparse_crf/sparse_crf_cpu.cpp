// CPU kernels of the Sparse-CRF ops: at::parallel_for over image rows around
// the torch-free core of csrc/kernels/sparse_crf.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "boxloss/sparse_crf/cpu.h"
#include "sparse_crf.h"

namespace boxloss {
namespace ops {
namespace {

// float16 and bfloat16 run in float32 on the CPU.
at::ScalarType cpu_compute_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

int64_t rows_per_task(const sparse_crf::Problem& p, int32_t offsets) {
  const int64_t work_per_row = std::max<int64_t>(1, p.width * (p.num_selected + p.image_channels) * offsets);
  return std::max<int64_t>(1, (int64_t{1} << 16) / work_per_row);
}

at::Tensor sparse_crf_loss_cpu(const at::Tensor& probs, const at::Tensor& image,
                               const std::optional<at::Tensor>& valid_mask, at::OptionalIntArrayRef channels,
                               double sigma, int64_t neighbourhood, int64_t dilation, c10::string_view kind) {
  TORCH_CHECK_VALUE(probs.device().is_cpu(), "sparse_crf_loss: probs must be a CPU tensor here");
  const at::ScalarType dtype = cpu_compute_dtype(probs.scalar_type());
  SparseCRFCall call = prepare_sparse_crf_call("sparse_crf_loss", probs, image, valid_mask, channels, sigma,
                                               neighbourhood, dilation, kind, dtype);
  const sparse_crf::Problem& p = call.problem;
  const int64_t rows = p.batch * p.height;
  at::Tensor row_sums = at::empty({rows}, probs.options().dtype(at::kDouble));
  at::Tensor row_status = at::empty({rows}, probs.options().dtype(at::kInt));
  double* sums = row_sums.data_ptr<double>();
  int32_t* status = row_status.data_ptr<int32_t>();
  at::parallel_for(0, rows, rows_per_task(p, p.neighbourhood / 2), [&](int64_t begin, int64_t end) {
    if (dtype == at::kDouble) {
      sparse_crf::cpu::forward_rows<double>(p, begin, end, sums, status);
    } else {
      sparse_crf::cpu::forward_rows<float>(p, begin, end, sums, status);
    }
  });
  at::Tensor image_status = at::zeros({p.batch}, probs.options().dtype(at::kInt));
  for (int64_t r = 0; r < rows; ++r) image_status.data_ptr<int32_t>()[r / p.height] |= status[r];
  raise_for_input_status(image_status, call);
  // Rows are summed in a fixed order, so the result does not depend on the
  // number of threads.
  const at::Tensor per_image = row_sums.view({p.batch, p.height}).sum(1);
  return divide_by_counts(per_image, valid_pixel_counts(call, at::kDouble)).to(probs.scalar_type());
}

at::Tensor sparse_crf_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& probs, const at::Tensor& image,
                                        const std::optional<at::Tensor>& valid_mask, at::OptionalIntArrayRef channels,
                                        double sigma, int64_t neighbourhood, int64_t dilation, c10::string_view kind) {
  const at::ScalarType dtype = cpu_compute_dtype(probs.scalar_type());
  SparseCRFCall call = prepare_sparse_crf_call("_sparse_crf_loss_backward", probs, image, valid_mask, channels, sigma,
                                               neighbourhood, dilation, kind, dtype);
  const sparse_crf::Problem& p = call.problem;
  TORCH_CHECK_VALUE(grad.dim() == 1 && grad.size(0) == p.batch,
                    "_sparse_crf_loss_backward: grad must have shape (B,) = (", p.batch, ",), got ", grad.sizes());
  const at::Tensor scale =
      divide_by_counts(grad.to(probs.device(), dtype), valid_pixel_counts(call, dtype)).contiguous();
  at::Tensor out = call.channels.defined() ? at::zeros_like(call.probs) : at::empty_like(call.probs);
  at::parallel_for(0, p.batch * p.height, rows_per_task(p, p.neighbourhood), [&](int64_t begin, int64_t end) {
    if (dtype == at::kDouble) {
      sparse_crf::cpu::backward_rows<double>(p, scale.data_ptr<double>(), begin, end, out.data_ptr<double>());
    } else {
      sparse_crf::cpu::backward_rows<float>(p, scale.data_ptr<float>(), begin, end, out.data_ptr<float>());
    }
  });
  return out.to(probs.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(boxloss, CPU, m) {
  m.impl("sparse_crf_loss", &sparse_crf_loss_cpu);
  m.impl("_sparse_crf_loss_backward", &sparse_crf_loss_backward_cpu);
}

}  // namespace ops
}  // namespace boxloss
