// Torch-free CPU core of background attention and background-aware pooling.
// Each function works on a range, so the caller chooses the parallelism.
#pragma once

#include <cstdint>
#include <vector>

#include "boxloss/background_attention/problem.h"

namespace boxloss {
namespace background_attention {
namespace cpu {

// inside[b, y, x] = 1 for every pixel of every box (ranges as resolve_boxes
// gives them); inside must be zeroed by the caller.
void mark_inside(const int64_t* ranges, const int64_t* box_batch, int64_t num_boxes, int64_t height, int64_t width,
                 uint8_t* inside);

// attention[i] for flat pixels i in [begin, end) of (batch, pixels); dots is (batch, num_queries, pixels).
template <typename scalar>
void attention_forward(const AttentionProblem<scalar>& p, const scalar* dots, int64_t begin, int64_t end,
                       scalar* attention);

// Backward of attention_forward for flat pixels [begin, end): overwrites dots
// with g (see pixel_attention_backward) and writes coef.
template <typename scalar>
void attention_backward(const AttentionProblem<scalar>& p, const scalar* grad_attention, scalar* dots, int64_t begin,
                        int64_t end, scalar* coef);

// pooled (num_boxes, channels, S, S) and weight_sum (num_boxes, S, S) for the
// flat (box, bin) pairs [begin, end).
template <typename scalar>
void pool_forward(const PoolProblem<scalar>& p, int64_t begin, int64_t end, scalar* pooled, scalar* weight_sum);

// The boxes grouped by image, in box order within an image.
struct ImagePlan {
  std::vector<int64_t> offsets;  // (batch + 1,)
  std::vector<int64_t> boxes;
};
ImagePlan plan_by_image(const int64_t* box_batch, int64_t num_boxes, int64_t batch);

// Gradients of images [image_begin, image_end): zeroes their planes of
// grad_features (batch, channels, h, w) and grad_attention (batch, h, w), then
// adds every box's contribution, boxes in order (deterministic).
template <typename scalar>
void pool_backward(const PoolProblem<scalar>& p, const ImagePlan& plan, const scalar* grad_pooled, const scalar* pooled,
                   const scalar* weight_sum, int64_t image_begin, int64_t image_end, scalar* grad_features,
                   scalar* grad_attention);

}  // namespace cpu
}  // namespace background_attention
}  // namespace boxloss
