// Device-independent part of boxloss::box_front_index: checks and buffers.
#pragma once

#include <ATen/ATen.h>

#include "boxloss/box_raster/raster.h"

namespace boxloss {
namespace ops {

struct BoxRasterCall {
  at::Tensor boxes;             // (K, 4) double, contiguous
  at::Tensor box_batch;         // (K,) int64
  at::Tensor box_labels;        // (K,) int64
  at::Tensor priority;          // (K,) int64
  at::Tensor order;             // (K,) int64, box indices sorted by image
  at::Tensor image_offsets;     // (batch + 1,) int64
  box_raster::Problem problem;  // ranges filled in by the caller
};

BoxRasterCall prepare_box_raster_call(const at::Tensor& boxes, const at::Tensor& box_batch,
                                      const at::Tensor& box_labels, const at::Tensor& priority, int64_t batch,
                                      int64_t num_classes, int64_t height, int64_t width, double spatial_scale);

}  // namespace ops
}  // namespace boxloss
