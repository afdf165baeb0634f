// Torch-free CPU core of the permutohedral lattice: build one image's lattice,
// and filter any number of channels of one image through it in one
// splat-blur-slice pass.  The caller chooses the parallelism: over images it
// calls these per image; within an image it passes a RangeRunner (the torch op
// wraps at::parallel_for, the C++ tests a plain loop).  Results do not depend
// on the runner: every sum is taken in a fixed order.
#pragma once

#include <cstdint>
#include <functional>
#include <type_traits>
#include <utility>
#include <vector>

#include "boxloss/permutohedral/lattice.h"

namespace boxloss {
namespace permutohedral {
namespace cpu {

// Calls fn(begin, end) on pieces of [0, n) of at least `grain` elements, in
// any order and possibly concurrently.
using RangeFn = std::function<void(int64_t, int64_t)>;

// A runner: run(n, grain, fn) calls fn on pieces of [0, n) as above, on at
// most `workers` threads at once.  Any callable converts to a runner of one
// worker.  With more than one worker the filter lays a wide vertex row out in
// whole 64-byte blocks so that its splat can be split among the threads by
// channel block (the results are the same either way).
struct RangeRunner {
  template <typename F, typename = std::enable_if_t<!std::is_same_v<std::decay_t<F>, RangeRunner>>>
  RangeRunner(F run_fn, int64_t max_workers = 1)  // NOLINT(google-explicit-constructor): any callable is a runner
      : run(std::move(run_fn)), workers(max_workers) {}
  void operator()(int64_t n, int64_t grain, const RangeFn& fn) const { run(n, grain, fn); }

  std::function<void(int64_t n, int64_t grain, const RangeFn& fn)> run;
  int64_t workers = 1;
};

// A runner that calls fn(0, n) on the calling thread.
void run_serially(int64_t n, int64_t grain, const RangeFn& fn);

// One image's lattice before it is copied into the batch's tensors.
struct ImageLattice {
  std::vector<int32_t> neighbours;  // (d+1, num_vertices, 2), local vertex numbers, -1 where absent
  int64_t num_vertices = 0;
  int32_t status = 0;  // LatticeStatus bits
};

// Builds the lattice of one (3, height, width) image: writes each pixel's
// simplex vertices (numbered by first use in pixel order) and weights into
// splat_index / splat_weight (num_pixels x (d+1)), and the vertices' blur
// neighbours into `out`.  Pixels whose features are not finite or too large
// get weight 0 on vertex 0 and set out->status.
template <typename scalar>
void build_lattice(const scalar* image, int64_t height, int64_t width, double sigma_xy, double sigma_rgb,
                   int32_t* splat_index, scalar* splat_weight, ImageLattice* out);

// What the filter reads: `channels` planes of `num_pixels` values of one
// image; with `mask` (num_pixels bytes, 0/1) each value is taken as 0 at
// masked-out pixels, and with `append_mask` the mask itself (as 0/1; all 1
// without a mask) is filtered as one more channel after the others.
template <typename scalar>
struct FilterInput {
  const scalar* values = nullptr;
  int64_t channels = 0;
  const uint8_t* mask = nullptr;
  bool append_mask = false;

  int64_t filtered_channels() const { return channels + (append_mask ? 1 : 0); }
};

// out (filtered_channels x num_pixels, planar) = alpha * S^T B S in, with B
// the blurs along axes 0..d (d..0 when `reverse`, which is the exact transpose).
// Returns FilterStatus bits (0: all well).  Vertex numbers outside the
// image's range (a corrupt lattice) are reported and read as the zero row,
// so no array is ever indexed out of bounds.
template <typename scalar>
int32_t filter_image(const Lattice<scalar>& lattice, int64_t b, const FilterInput<scalar>& input, bool reverse,
                     scalar* out, const RangeRunner& runner);

}  // namespace cpu
}  // namespace permutohedral
}  // namespace boxloss
