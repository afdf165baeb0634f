// CPU core of the binary uncertainty loss (Eq. 8-11): one branch-free loop
// over the pixels of each image around binary_pixel (math.h), which the CUDA
// kernel calls too.
#include "boxloss/uncertainty/cpu.h"

#include <algorithm>

#include "boxloss/common/cpu_clones.h"

namespace boxloss {
namespace uncertainty {
namespace cpu {
namespace {

// Pixels [begin, end) of one image (`pp`: the image is pixel-perfect).  The
// forward writes loss and returns the BinaryStatus bits of the targets; the
// backward writes grad * dL/dmu and grad * dL/ds.
template <bool kForward, bool kBootstrap, bool kRoute, bool kHasMask, typename scalar>
BOXLOSS_ALWAYS_INLINE int32_t binary_segment(const BinaryProblem& p, const scalar* __restrict grad, int64_t begin,
                                             int64_t end, bool pp, scalar* __restrict loss, scalar* __restrict grad_mu,
                                             scalar* __restrict grad_log_var) {
  using acc = acc_t<scalar>;
  const BinarySettings<acc> st = p.settings<acc>();
  const scalar* __restrict mu = static_cast<const scalar*>(p.mu);
  const scalar* __restrict s = static_cast<const scalar*>(p.log_var);
  const scalar* __restrict y = static_cast<const scalar*>(p.target);
  const uint8_t* __restrict mask = p.box_mask;
  const bool image_uncertain = !pp;
  int32_t bad = 0;
  for (int64_t i = begin; i < end; ++i) {
    const acc yi = static_cast<acc>(y[i]);
    const bool uncertain = kHasMask ? (image_uncertain & (mask[i] != 0)) : image_uncertain;
    acc l, g_mu, g_s;
    binary_pixel<kBootstrap, kRoute>(static_cast<acc>(mu[i]), static_cast<acc>(s[i]), yi, uncertain, st, &l, &g_mu,
                                     &g_s);
    if (kForward) {
      bad |= static_cast<int32_t>(math::outside_unit_interval(yi));
      loss[i] = static_cast<scalar>(l);
    } else {
      const acc g = static_cast<acc>(grad[i]);
      grad_mu[i] = static_cast<scalar>(g * g_mu);
      grad_log_var[i] = static_cast<scalar>(g * g_s);
    }
  }
  return bad ? kTargetNotProbability : 0;
}

// The run-time settings as template arguments, so that each loop is straight
// code (the forward needs no routing: it only changes the gradients).
template <bool kForward, bool kHasMask, typename scalar>
BOXLOSS_ALWAYS_INLINE int32_t binary_segment_switch(const BinaryProblem& p, const scalar* grad, int64_t begin,
                                                    int64_t end, bool pp, scalar* loss, scalar* grad_mu,
                                                    scalar* grad_log_var) {
  if (!p.bootstrap) {
    return binary_segment<kForward, false, false, kHasMask>(p, grad, begin, end, pp, loss, grad_mu, grad_log_var);
  }
  if (kForward || p.route_gradients) {
    return binary_segment<kForward, true, true, kHasMask>(p, grad, begin, end, pp, loss, grad_mu, grad_log_var);
  }
  return binary_segment<kForward, true, false, kHasMask>(p, grad, begin, end, pp, loss, grad_mu, grad_log_var);
}

// The segments of [begin, end) run image by image (pixel_perfect is per
// image), each a straight vectorised loop.
template <bool kForward, typename scalar>
BOXLOSS_CPU_CLONES int32_t binary_impl(const BinaryProblem& p, const scalar* grad, int64_t begin, int64_t end,
                                       scalar* loss, scalar* grad_mu, scalar* grad_log_var) {
  int32_t status = 0;
  while (begin < end) {
    const int64_t b = begin / p.plane;
    const int64_t stop = std::min(end, (b + 1) * p.plane);
    const bool pp = p.pixel_perfect != nullptr && p.pixel_perfect[b] != 0;
    status |= p.box_mask != nullptr
                  ? binary_segment_switch<kForward, true>(p, grad, begin, stop, pp, loss, grad_mu, grad_log_var)
                  : binary_segment_switch<kForward, false>(p, grad, begin, stop, pp, loss, grad_mu, grad_log_var);
    begin = stop;
  }
  return status;
}

}  // namespace

template <typename scalar>
int32_t binary_forward(const BinaryProblem& problem, int64_t begin, int64_t end, scalar* loss) {
  return binary_impl<true, scalar>(problem, nullptr, begin, end, loss, nullptr, nullptr);
}

template <typename scalar>
void binary_backward(const BinaryProblem& problem, const scalar* grad, int64_t begin, int64_t end, scalar* grad_mu,
                     scalar* grad_log_var) {
  binary_impl<false, scalar>(problem, grad, begin, end, nullptr, grad_mu, grad_log_var);
}

template int32_t binary_forward<float>(const BinaryProblem&, int64_t, int64_t, float*);
template int32_t binary_forward<double>(const BinaryProblem&, int64_t, int64_t, double*);
template void binary_backward<float>(const BinaryProblem&, const float*, int64_t, int64_t, float*, float*);
template void binary_backward<double>(const BinaryProblem&, const double*, int64_t, int64_t, double*, double*);

}  // namespace cpu
}  // namespace uncertainty
}  // namespace boxloss
