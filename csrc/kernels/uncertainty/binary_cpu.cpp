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

// Forward over pixels [begin, end) of one image (`pp`: the image is pixel-perfect).
template <typename scalar, bool kHasMask, bool kBootstrap>
BOXLOSS_ALWAYS_INLINE int32_t binary_forward_segment(const BinaryProblem& p, int64_t begin, int64_t end, bool pp,
                                                     scalar* __restrict loss) {
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
    bad |= static_cast<int32_t>(math::outside_unit_interval(yi));
    const bool uncertain = kHasMask ? (image_uncertain & (mask[i] != 0)) : image_uncertain;
    acc l, g_mu, g_s;
    binary_pixel<kBootstrap, true>(static_cast<acc>(mu[i]), static_cast<acc>(s[i]), yi, uncertain, st, &l, &g_mu,
                                   &g_s);
    loss[i] = static_cast<scalar>(l);
  }
  return bad ? kTargetNotProbability : 0;
}

template <typename scalar, bool kHasMask, bool kBootstrap, bool kRoute>
BOXLOSS_ALWAYS_INLINE void binary_backward_segment(const BinaryProblem& p, const scalar* __restrict grad,
                                                   int64_t begin, int64_t end, bool pp, scalar* __restrict grad_mu,
                                                   scalar* __restrict grad_log_var) {
  using acc = acc_t<scalar>;
  const BinarySettings<acc> st = p.settings<acc>();
  const scalar* __restrict mu = static_cast<const scalar*>(p.mu);
  const scalar* __restrict s = static_cast<const scalar*>(p.log_var);
  const scalar* __restrict y = static_cast<const scalar*>(p.target);
  const uint8_t* __restrict mask = p.box_mask;
  const bool image_uncertain = !pp;
  for (int64_t i = begin; i < end; ++i) {
    const bool uncertain = kHasMask ? (image_uncertain & (mask[i] != 0)) : image_uncertain;
    acc l, g_mu, g_s;
    binary_pixel<kBootstrap, kRoute>(static_cast<acc>(mu[i]), static_cast<acc>(s[i]), static_cast<acc>(y[i]),
                                     uncertain, st, &l, &g_mu, &g_s);
    const acc g = static_cast<acc>(grad[i]);
    grad_mu[i] = static_cast<scalar>(g * g_mu);
    grad_log_var[i] = static_cast<scalar>(g * g_s);
  }
}

template <typename scalar, bool kHasMask>
BOXLOSS_ALWAYS_INLINE int32_t binary_forward_switch(const BinaryProblem& p, int64_t begin, int64_t end, bool pp,
                                                    scalar* loss) {
  return p.bootstrap ? binary_forward_segment<scalar, kHasMask, true>(p, begin, end, pp, loss)
                     : binary_forward_segment<scalar, kHasMask, false>(p, begin, end, pp, loss);
}

template <typename scalar, bool kHasMask>
BOXLOSS_ALWAYS_INLINE void binary_backward_switch(const BinaryProblem& p, const scalar* grad, int64_t begin,
                                                  int64_t end, bool pp, scalar* grad_mu, scalar* grad_log_var) {
  if (!p.bootstrap) {
    binary_backward_segment<scalar, kHasMask, false, false>(p, grad, begin, end, pp, grad_mu, grad_log_var);
  } else if (p.route_gradients) {
    binary_backward_segment<scalar, kHasMask, true, true>(p, grad, begin, end, pp, grad_mu, grad_log_var);
  } else {
    binary_backward_segment<scalar, kHasMask, true, false>(p, grad, begin, end, pp, grad_mu, grad_log_var);
  }
}

// The segments of [begin, end) run image by image (pixel_perfect is per
// image), each a straight vectorised loop.
template <typename scalar>
BOXLOSS_CPU_CLONES int32_t binary_forward_impl(const BinaryProblem& p, int64_t begin, int64_t end, scalar* loss) {
  int32_t status = 0;
  while (begin < end) {
    const int64_t b = begin / p.plane;
    const int64_t stop = std::min(end, (b + 1) * p.plane);
    const bool pp = p.pixel_perfect != nullptr && p.pixel_perfect[b] != 0;
    status |= p.box_mask != nullptr ? binary_forward_switch<scalar, true>(p, begin, stop, pp, loss)
                                    : binary_forward_switch<scalar, false>(p, begin, stop, pp, loss);
    begin = stop;
  }
  return status;
}

template <typename scalar>
BOXLOSS_CPU_CLONES void binary_backward_impl(const BinaryProblem& p, const scalar* grad, int64_t begin, int64_t end,
                                             scalar* grad_mu, scalar* grad_log_var) {
  while (begin < end) {
    const int64_t b = begin / p.plane;
    const int64_t stop = std::min(end, (b + 1) * p.plane);
    const bool pp = p.pixel_perfect != nullptr && p.pixel_perfect[b] != 0;
    if (p.box_mask != nullptr) {
      binary_backward_switch<scalar, true>(p, grad, begin, stop, pp, grad_mu, grad_log_var);
    } else {
      binary_backward_switch<scalar, false>(p, grad, begin, stop, pp, grad_mu, grad_log_var);
    }
    begin = stop;
  }
}

}  // namespace

template <typename scalar>
int32_t binary_forward(const BinaryProblem& problem, int64_t begin, int64_t end, scalar* loss) {
  return binary_forward_impl<scalar>(problem, begin, end, loss);
}

template <typename scalar>
void binary_backward(const BinaryProblem& problem, const scalar* grad, int64_t begin, int64_t end, scalar* grad_mu,
                     scalar* grad_log_var) {
  binary_backward_impl<scalar>(problem, grad, begin, end, grad_mu, grad_log_var);
}

template int32_t binary_forward<float>(const BinaryProblem&, int64_t, int64_t, float*);
template int32_t binary_forward<double>(const BinaryProblem&, int64_t, int64_t, double*);
template void binary_backward<float>(const BinaryProblem&, const float*, int64_t, int64_t, float*, float*);
template void binary_backward<double>(const BinaryProblem&, const double*, int64_t, int64_t, double*, double*);

}  // namespace cpu
}  // namespace uncertainty
}  // namespace boxloss
