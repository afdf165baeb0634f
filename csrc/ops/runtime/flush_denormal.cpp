// boxloss::_set_flush_denormal: flush subnormal floats to zero on every thread of
// ATen's intra-op pool, not only on the calling thread.
//
// torch.set_flush_denormal sets the floating-point control register of the thread
// that calls it. CPU kernels (ATen's parallel loops, oneDNN's convolutions) run on
// the OpenMP pool, whose threads keep their own registers: with two threads half
// of a subnormal product is still computed at the slow, microcode-assisted speed
// (a convolution over subnormal activations runs tens of times slower). A weakly
// supervised network whose outputs collapse produces such values. Setting the
// flag inside a parallel region of the pool's size reaches each pool thread; the
// pool's threads persist between regions.
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace boxloss {
namespace ops {
namespace {

bool set_flush_denormal(bool on) {
  bool supported = at::globalContext().setFlushDenormal(on);
#ifdef _OPENMP
  const int threads = at::get_num_threads();
  int failures = 0;
#pragma omp parallel num_threads(threads) reduction(+ : failures)
  { failures += at::globalContext().setFlushDenormal(on) ? 0 : 1; }
  supported = supported && failures == 0;
#endif
  return supported;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(boxloss, m) { m.def("_set_flush_denormal(bool on) -> bool", &set_flush_denormal); }

}  // namespace ops
}  // namespace boxloss
