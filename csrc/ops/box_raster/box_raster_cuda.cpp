// CUDA kernel of boxloss::box_front_index.
#define BOXLOSS_WITH_CUDA_RUNTIME 1
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../row_col_max/row_col_max.h"
#include "box_raster.h"
#include "boxloss/box_raster/kernels.h"
#include "boxloss/row_col_max/cuda.h"

namespace boxloss {
namespace ops {
namespace {

std::tuple<at::Tensor, at::Tensor> box_front_index_cuda(const at::Tensor& boxes, const at::Tensor& box_batch,
                                                        const at::Tensor& box_labels, const at::Tensor& priority,
                                                        int64_t batch, int64_t num_classes, int64_t height,
                                                        int64_t width, double spatial_scale) {
  const c10::cuda::CUDAGuard guard(boxes.device());
  BoxRasterCall call =
      prepare_box_raster_call(boxes, box_batch, box_labels, priority, batch, num_classes, height, width, spatial_scale);
  box_raster::Problem& p = call.problem;
  const auto options = boxes.options().dtype(at::kLong);
  const auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor ranges = at::empty({p.num_boxes, 4}, options);
  at::Tensor status = at::zeros({p.num_boxes}, options.dtype(at::kInt));
  C10_CUDA_CHECK(row_col_max::cuda::launch_resolve_boxes(
      call.boxes.data_ptr<double>(), call.box_batch.data_ptr<int64_t>(), call.box_labels.data_ptr<int64_t>(),
      p.num_boxes, spatial_scale, batch, num_classes, height, width, ranges.data_ptr<int64_t>(),
      status.data_ptr<int32_t>(), stream));
  raise_for_box_status("box_front_index", status.cpu(), call.boxes, call.box_batch, call.box_labels, batch,
                       num_classes);
  p.ranges = ranges.data_ptr<int64_t>();
  at::Tensor front = at::empty({batch, height, width}, options);
  C10_CUDA_CHECK(box_raster::cuda::launch_front(p, front.data_ptr<int64_t>(), stream));
  return {front, ranges};
}

}  // namespace

TORCH_LIBRARY_IMPL(boxloss, CUDA, m) { m.impl("box_front_index", &box_front_index_cuda); }

}  // namespace ops
}  // namespace boxloss
