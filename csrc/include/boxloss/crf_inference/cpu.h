// Torch-free CPU core of DenseCRF mean-field inference (math.h): the whole
// loop of one image (splat, blur, slice of both kernels, the Potts messages
// and the softmax) in C++, and the build of the 2-d spatial lattice of the
// smoothness kernel.  The 5-d lattice of the appearance kernel comes from
// boxloss/permutohedral.  Results do not depend on the runner: every sum is
// taken in a fixed order.
#pragma once

#include <cstdint>
#include <vector>

#include "boxloss/crf_inference/math.h"
#include "boxloss/permutohedral/cpu.h"

namespace boxloss {
namespace crf_inference {
namespace cpu {

using permutohedral::cpu::RangeRunner;

// Simplex size (d + 1) of the two kernels' lattices.
constexpr int kAppearanceSimplex = 6;  // x, y, r, g, b
constexpr int kSmoothnessSimplex = 3;  // x, y

// One kernel's lattice over the pixels of one image and the kernel's weight.
// A kernel of weight 0 is skipped (its lattice is not read).
template <typename scalar>
struct KernelLattice {
  const int32_t* splat_index = nullptr;  // (num_pixels, simplex): local vertex numbers
  const scalar* splat_weight = nullptr;  // (num_pixels, simplex): barycentric weights
  const int32_t* neighbours = nullptr;   // neighbours[axis * axis_stride + 2 v + side], -1 if absent
  int64_t axis_stride = 0;
  int64_t num_vertices = 0;
  double weight = 0.0;
};

// One image: unary (channels, num_pixels) planar negative log-probabilities,
// valid (num_pixels, 0/1) or nullptr for all valid, the two kernels, the
// number of mean-field steps (>= 1), and out (channels, num_pixels) planar.
template <typename scalar>
struct MeanFieldImage {
  const scalar* unary = nullptr;
  int64_t channels = 0;
  int64_t num_pixels = 0;
  const uint8_t* valid = nullptr;
  KernelLattice<scalar> appearance;  // simplex kAppearanceSimplex
  KernelLattice<scalar> smoothness;  // simplex kSmoothnessSimplex
  int64_t iterations = 1;
  scalar* out = nullptr;
  // Pixels from which the loop uses the runner's workers: each step of a
  // smaller image costs less than the dozen parallel regions it would open
  // (tens of microseconds each on an idle machine, far more on a loaded one).
  int64_t parallel_pixels = int64_t{1} << 16;
};

// Runs the mean-field loop of one image.  Returns UnaryStatus bits (0: all
// well); with any bit set nothing is iterated and `out` is not written.
// Vertex numbers are trusted (the caller built the lattices).
template <typename scalar>
int32_t mean_field_image(const MeanFieldImage<scalar>& image, const RangeRunner& runner);

// The 2-d lattice of the features (x / sigma_xy, y / sigma_xy) of a
// height x width pixel grid, the same for every image of that size: each
// pixel's 3 simplex vertices (numbered by first use in pixel order) and
// weights into splat_index / splat_weight (num_pixels x 3), the vertices'
// blur neighbours (3, num_vertices, 2) into `neighbours`.  Returns
// permutohedral::kFeaturesTooLarge when x / sigma_xy or y / sigma_xy leave
// the lattice's range (then nothing else is meaningful), else 0.
template <typename scalar>
int32_t build_spatial_lattice(int64_t height, int64_t width, double sigma_xy, int32_t* splat_index,
                              scalar* splat_weight, std::vector<int32_t>* neighbours, int64_t* num_vertices);

}  // namespace cpu
}  // namespace crf_inference
}  // namespace boxloss
