// Threading of the CPU lattice kernels, shared by the ops that filter.
#pragma once

#include <cstdint>
#include <functional>

#include "boxloss/permutohedral/cpu.h"

namespace boxloss {
namespace ops {

// A RangeRunner on at::parallel_for.
void parallel_runner(int64_t n, int64_t grain, const permutohedral::cpu::RangeFn& fn);

// Images of num_pixels pixels per parallel task: enough work to pay for a region.
int64_t images_per_task(int64_t num_pixels);

// fn(b, runner) for every image b: in parallel over images when there are at
// least as many as threads (runner then runs serially), else image by image
// with the threads working inside each image (runner = parallel_runner).
void for_each_image(int64_t batch, int64_t num_pixels,
                    const std::function<void(int64_t, const permutohedral::cpu::RangeRunner&)>& fn);

}  // namespace ops
}  // namespace boxloss
