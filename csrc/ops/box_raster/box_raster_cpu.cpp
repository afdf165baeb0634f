// CPU kernel of boxloss::box_front_index.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../row_col_max/row_col_max.h"
#include "box_raster.h"
#include "boxloss/box_raster/kernels.h"
#include "boxloss/row_col_max/cpu.h"

namespace boxloss {
namespace ops {
namespace {

std::tuple<at::Tensor, at::Tensor> box_front_index_cpu(const at::Tensor& boxes, const at::Tensor& box_batch,
                                                       const at::Tensor& box_labels, const at::Tensor& priority,
                                                       int64_t batch, int64_t num_classes, int64_t height,
                                                       int64_t width, double spatial_scale) {
  BoxRasterCall call =
      prepare_box_raster_call(boxes, box_batch, box_labels, priority, batch, num_classes, height, width, spatial_scale);
  box_raster::Problem& p = call.problem;
  const auto options = boxes.options().dtype(at::kLong);
  at::Tensor ranges = at::empty({p.num_boxes, 4}, options);
  at::Tensor status = at::zeros({p.num_boxes}, options.dtype(at::kInt));
  row_col_max::cpu::resolve_boxes(call.boxes.data_ptr<double>(), call.box_batch.data_ptr<int64_t>(),
                                  call.box_labels.data_ptr<int64_t>(), 0, p.num_boxes, spatial_scale, batch,
                                  num_classes, height, width, ranges.data_ptr<int64_t>(), status.data_ptr<int32_t>());
  raise_for_box_status("box_front_index", status, call.boxes, call.box_batch, call.box_labels, batch, num_classes);
  p.ranges = ranges.data_ptr<int64_t>();
  at::Tensor front = at::empty({batch, height, width}, options);
  const int64_t grain = std::max<int64_t>(1, 4096 / width);
  at::parallel_for(0, batch * height, grain, [&](int64_t begin, int64_t end) {
    box_raster::cpu::front_rows(p, begin, end, front.data_ptr<int64_t>());
  });
  return {front, ranges};
}

}  // namespace

TORCH_LIBRARY_IMPL(boxloss, CPU, m) { m.impl("box_front_index", &box_front_index_cpu); }

}  // namespace ops
}  // namespace boxloss
