// CPU core of the Sparse-CRF loss: row by row, each inner loop runs over x with
// unit stride and no branches so that the compiler vectorises it.  A row's
// colour weights are computed once into a small buffer and reused by every
// channel; nothing of size [B, neighbours, H, W] ever exists.
#include "boxloss/sparse_crf/cpu.h"

#include <vector>

// The row loops are compiled for baseline x86-64 and again for AVX2+FMA and
// AVX-512 (x86-64-v3 / v4); the loader picks the widest the CPU supports.
// Other architectures get the single default build.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BOXLOSS_CPU_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define BOXLOSS_CPU_CLONES
#endif
#define BOXLOSS_ALWAYS_INLINE inline __attribute__((always_inline))

namespace boxloss {
namespace sparse_crf {
namespace cpu {
namespace {

template <typename T>
struct RowView {
  const T* __restrict p;
  const T* __restrict q;
};

// Fills weight[x] = valid(p) valid(q) exp(-||I_p - I_q||^2 / (2 sigma^2)) for the
// pairs p = (y, x), q = (y + dy, x + dx) with x in [x_begin, x_end); `scratch`
// holds the squared distances.  Entries outside the range are set to 0.
template <typename scalar>
BOXLOSS_ALWAYS_INLINE void pair_weights_row(const Problem& problem, int64_t b, int64_t y, Offset offset, int64_t x_begin,
                      int64_t x_end, acc_t<scalar>* __restrict weight,
                      acc_t<scalar>* __restrict scratch) {
  using acc = acc_t<scalar>;
  const int64_t width = problem.width;
  const int64_t plane = problem.plane();
  const int64_t y2 = y + offset.dy;
  const int64_t dx = offset.dx;
  for (int64_t x = 0; x < width; ++x) {
    weight[x] = acc(0);
    scratch[x] = acc(0);
  }
  const scalar* image = static_cast<const scalar*>(problem.image) + b * problem.image_channels * plane;
  for (int64_t k = 0; k < problem.image_channels; ++k) {
    const scalar* __restrict ip = image + k * plane + y * width;
    const scalar* __restrict iq = image + k * plane + y2 * width + dx;
    for (int64_t x = x_begin; x < x_end; ++x) {
      const acc d = static_cast<acc>(ip[x]) - static_cast<acc>(iq[x]);
      scratch[x] += d * d;
    }
  }
  const acc scale = weight_exponent_scale<acc>(problem.sigma);
  for (int64_t x = x_begin; x < x_end; ++x) {
    weight[x] = pair_weight<acc>(scratch[x], scale);
  }
  if (problem.valid != nullptr) {
    const uint8_t* __restrict vp = problem.valid + b * plane + y * width;
    const uint8_t* __restrict vq = problem.valid + b * plane + y2 * width + dx;
    for (int64_t x = x_begin; x < x_end; ++x) {
      weight[x] *= static_cast<acc>(vp[x] & vq[x]);
    }
  }
}

template <typename scalar>
BOXLOSS_ALWAYS_INLINE int32_t row_status(const Problem& problem, int64_t b, int64_t y) {
  using acc = acc_t<scalar>;
  const int64_t width = problem.width;
  const int64_t plane = problem.plane();
  int32_t probs_bad = 0;
  const scalar* probs = static_cast<const scalar*>(problem.probs) + b * problem.num_channels * plane;
  for (int64_t s = 0; s < problem.num_selected; ++s) {
    const scalar* __restrict row = probs + problem.channel_at(s) * plane + y * width;
    for (int64_t x = 0; x < width; ++x) {
      probs_bad |= static_cast<int32_t>(outside_unit_interval(static_cast<acc>(row[x])));
    }
  }
  int32_t image_bad = 0;
  const scalar* image = static_cast<const scalar*>(problem.image) + b * problem.image_channels * plane;
  for (int64_t k = 0; k < problem.image_channels; ++k) {
    const scalar* __restrict row = image + k * plane + y * width;
    for (int64_t x = 0; x < width; ++x) {
      image_bad |= static_cast<int32_t>(not_finite(static_cast<acc>(row[x])));
    }
  }
  return (probs_bad ? kProbsOutOfRange : 0) | (image_bad ? kImageNotFinite : 0);
}

template <typename scalar, Kind kind>
BOXLOSS_CPU_CLONES void forward_rows_impl(const Problem& problem, int64_t row_begin, int64_t row_end, double* row_sums,
                       int32_t* row_status_out) {
  using acc = acc_t<scalar>;
  const int64_t height = problem.height;
  const int64_t width = problem.width;
  const int64_t plane = problem.plane();
  const int32_t pairs_per_pixel = problem.neighbourhood / 2;
  std::vector<acc> buffer(static_cast<size_t>(width) * (pairs_per_pixel + 2));
  acc* row_acc = buffer.data();
  acc* scratch = row_acc + width;
  acc* weights = scratch + width;

  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t b = r / height;
    const int64_t y = r % height;
    row_status_out[r] = row_status<scalar>(problem, b, y);
    for (int64_t x = 0; x < width; ++x) row_acc[x] = acc(0);
    const scalar* probs = static_cast<const scalar*>(problem.probs) + b * problem.num_channels * plane;
    for (int32_t o = 0; o < pairs_per_pixel; ++o) {
      const Offset offset = neighbour_offset(o, problem.dilation);
      const int64_t y2 = y + offset.dy;
      if (y2 < 0 || y2 >= height) continue;
      int64_t x_begin, x_end;
      paired_x_range(width, offset.dx, &x_begin, &x_end);
      if (x_begin >= x_end) continue;
      pair_weights_row<scalar>(problem, b, y, offset, x_begin, x_end, weights, scratch);
      for (int64_t s = 0; s < problem.num_selected; ++s) {
        const int64_t c = problem.channel_at(s);
        const scalar* __restrict xp = probs + c * plane + y * width;
        const scalar* __restrict xq = probs + c * plane + y2 * width + offset.dx;
        for (int64_t x = x_begin; x < x_end; ++x) {
          row_acc[x] += weights[x] *
                        Term<kind>::value(static_cast<acc>(xp[x]), static_cast<acc>(xq[x]));
        }
      }
    }
    double sum = 0.0;
    for (int64_t x = 0; x < width; ++x) sum += static_cast<double>(row_acc[x]);
    row_sums[r] = sum;
  }
}

template <typename scalar, Kind kind>
BOXLOSS_CPU_CLONES void backward_rows_impl(const Problem& problem, const acc_t<scalar>* image_scale, int64_t row_begin,
                        int64_t row_end, scalar* grad) {
  using acc = acc_t<scalar>;
  const int64_t height = problem.height;
  const int64_t width = problem.width;
  const int64_t plane = problem.plane();
  const int32_t num_offsets = problem.neighbourhood;
  std::vector<acc> buffer(static_cast<size_t>(width) * (num_offsets + 2));
  acc* scratch = buffer.data();
  acc* grad_row = scratch + width;
  acc* weights = grad_row + width;  // num_offsets rows of width

  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t b = r / height;
    const int64_t y = r % height;
    // Colour weights of every pair p belongs to, computed once per row and
    // reused by all channels.  Offsets whose neighbour row is outside the
    // image keep an all-zero row and are skipped below.
    for (int32_t j = 0; j < num_offsets; ++j) {
      const Offset offset = neighbour_offset(backward_offset_index(j, num_offsets), problem.dilation);
      const int64_t y2 = y + offset.dy;
      acc* w = weights + j * width;
      int64_t x_begin, x_end;
      paired_x_range(width, offset.dx, &x_begin, &x_end);
      if (y2 < 0 || y2 >= height || x_begin >= x_end) {
        for (int64_t x = 0; x < width; ++x) w[x] = acc(0);
        continue;
      }
      pair_weights_row<scalar>(problem, b, y, offset, x_begin, x_end, w, scratch);
    }
    const acc scale = image_scale[b];
    const scalar* probs = static_cast<const scalar*>(problem.probs) + b * problem.num_channels * plane;
    scalar* grad_image = grad + b * problem.num_channels * plane;
    for (int64_t s = 0; s < problem.num_selected; ++s) {
      const int64_t c = problem.channel_at(s);
      const scalar* __restrict xp = probs + c * plane + y * width;
      for (int64_t x = 0; x < width; ++x) grad_row[x] = acc(0);
      for (int32_t j = 0; j < num_offsets; ++j) {
        const Offset offset = neighbour_offset(backward_offset_index(j, num_offsets), problem.dilation);
        const int64_t y2 = y + offset.dy;
        int64_t x_begin, x_end;
        paired_x_range(width, offset.dx, &x_begin, &x_end);
        if (y2 < 0 || y2 >= height || x_begin >= x_end) continue;
        const acc* __restrict w = weights + j * width;
        const scalar* __restrict xq = probs + c * plane + y2 * width + offset.dx;
        for (int64_t x = x_begin; x < x_end; ++x) {
          grad_row[x] += w[x] * Term<kind>::grad_first(static_cast<acc>(xp[x]), static_cast<acc>(xq[x]));
        }
      }
      scalar* __restrict out = grad_image + c * plane + y * width;
      for (int64_t x = 0; x < width; ++x) out[x] = static_cast<scalar>(grad_row[x] * scale);
    }
  }
}

}  // namespace

template <typename scalar>
void forward_rows(const Problem& problem, int64_t row_begin, int64_t row_end, double* row_sums,
                  int32_t* row_status_out) {
  if (problem.kind == Kind::L1) {
    forward_rows_impl<scalar, Kind::L1>(problem, row_begin, row_end, row_sums, row_status_out);
  } else {
    forward_rows_impl<scalar, Kind::Potts>(problem, row_begin, row_end, row_sums, row_status_out);
  }
}

template <typename scalar>
void backward_rows(const Problem& problem, const acc_t<scalar>* image_scale, int64_t row_begin,
                   int64_t row_end, scalar* grad) {
  if (problem.kind == Kind::L1) {
    backward_rows_impl<scalar, Kind::L1>(problem, image_scale, row_begin, row_end, grad);
  } else {
    backward_rows_impl<scalar, Kind::Potts>(problem, image_scale, row_begin, row_end, grad);
  }
}

template void forward_rows<float>(const Problem&, int64_t, int64_t, double*, int32_t*);
template void forward_rows<double>(const Problem&, int64_t, int64_t, double*, int32_t*);
template void backward_rows<float>(const Problem&, const float*, int64_t, int64_t, float*);
template void backward_rows<double>(const Problem&, const double*, int64_t, int64_t, double*);

}  // namespace cpu
}  // namespace sparse_crf
}  // namespace boxloss
