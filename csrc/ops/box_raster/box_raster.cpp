// Schema and checks of boxloss::box_front_index: which box is in front at
// every pixel of a (batch, height, width) map.
#include "box_raster.h"

#include <torch/library.h>

#include <sstream>

namespace boxloss {
namespace ops {

BoxRasterCall prepare_box_raster_call(const at::Tensor& boxes, const at::Tensor& box_batch,
                                      const at::Tensor& box_labels, const at::Tensor& priority, int64_t batch,
                                      int64_t num_classes, int64_t height, int64_t width, double spatial_scale) {
  constexpr const char* op = "box_front_index";
  TORCH_CHECK_VALUE(batch > 0 && height > 0 && width > 0 && num_classes > 0, op,
                    ": batch, num_classes, height and width must be positive, got ", batch, ", ", num_classes, ", ",
                    height, ", ", width);
  TORCH_CHECK_VALUE(boxes.dim() == 2 && boxes.size(1) == 4, op, ": boxes must have shape (K, 4), got ", boxes.sizes());
  TORCH_CHECK_TYPE(boxes.is_floating_point(), op, ": boxes must be a floating-point tensor, got ", boxes.scalar_type());
  const int64_t K = boxes.size(0);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"box_batch", &box_batch},
                                {"box_labels", &box_labels},
                                {"priority", &priority}}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == K, op, ": ", name, " must have shape (K,) = (", K, ",), got ",
                      t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == at::kLong, op, ": ", name, " must be an int64 tensor, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == boxes.device(), op, ": ", name, " must be on the device of boxes (",
                      boxes.device(), "), got ", t->device());
  }
  TORCH_CHECK_VALUE(std::isfinite(spatial_scale) && spatial_scale > 0, op,
                    ": spatial_scale must be a positive finite number, got ", spatial_scale);
  BoxRasterCall call;
  call.boxes = boxes.to(at::kDouble).contiguous();
  call.box_batch = box_batch.contiguous();
  call.box_labels = box_labels.contiguous();
  call.priority = priority.contiguous();
  // Boxes grouped by image, in index order within an image.  Out-of-range
  // batch indices are rejected before these are used.
  call.order = std::get<1>(at::sort(call.box_batch.clamp(0, batch - 1), /*stable=*/true, 0, false));
  const at::Tensor counts = at::bincount(call.box_batch.clamp(0, batch - 1), {}, batch);
  call.image_offsets = at::cat({at::zeros({1}, counts.options()), counts.cumsum(0)}).contiguous();
  box_raster::Problem& p = call.problem;
  p.priority = call.priority.data_ptr<int64_t>();
  p.order = call.order.data_ptr<int64_t>();
  p.image_offsets = call.image_offsets.data_ptr<int64_t>();
  p.batch = batch;
  p.height = height;
  p.width = width;
  p.num_boxes = K;
  return call;
}

TORCH_LIBRARY_FRAGMENT(boxloss, m) {
  m.def(
      "box_front_index(Tensor boxes, Tensor box_batch, Tensor box_labels, Tensor priority, int batch, "
      "int num_classes, int height, int width, float spatial_scale) -> (Tensor front, Tensor ranges)");
}

}  // namespace ops
}  // namespace boxloss
