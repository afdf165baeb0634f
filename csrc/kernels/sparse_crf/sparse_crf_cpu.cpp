// CPU core of the Sparse-CRF loss: row by row, each inner loop runs over x with
// unit stride and no branches so that the compiler vectorises it.  A row's
// colour weights are computed once into a small buffer (pair_weights of
// math.h, which the CUDA kernel runs for one pair) and reused by every
// channel; nothing of size [B, neighbours, H, W] ever exists.
#include "boxloss/sparse_crf/cpu.h"

#include <vector>

#include "boxloss/common/cpu_clones.h"

namespace boxloss {
namespace sparse_crf {
namespace cpu {
namespace {

// True when the `width` elements that start at column dx of row y2 lie inside
// the H x W plane, though x + dx may leave the row: then a loop over the whole
// row may read them unchecked (the neighbour row's first or last elements stand
// in for columns outside the row, with weight 0), and its trip count stays a
// multiple of the vector width instead of leaving a scalar remainder.
BOXLOSS_ALWAYS_INLINE bool shifted_row_in_plane(int64_t y2, int32_t dx, int64_t height) {
  return !(y2 == 0 && dx < 0) && !(y2 == height - 1 && dx > 0);
}

// Fills weight[x] = valid(p) valid(q) exp(-||I_p - I_q||^2 / (2 sigma^2)) for the
// pairs p = (y, x), q = (y + dy, x + dx) with x in [x_begin, x_end), and 0 for
// every other x of the row: pair_weights (math.h) over the row, with the
// channel sum of RGB (K = 3) and grey (K = 1) images unrolled and other K
// summed channel by channel in `scratch`.  With `whole_row` (see
// shifted_row_in_plane) the arithmetic runs over the whole row and the
// columns outside [x_begin, x_end) are zeroed afterwards.
template <typename scalar>
BOXLOSS_ALWAYS_INLINE void pair_weights_row(const Problem& problem, int64_t b, int64_t y, Offset offset,
                                            int64_t x_begin, int64_t x_end, bool whole_row,
                                            acc_t<scalar>* __restrict weight, acc_t<scalar>* __restrict scratch) {
  using acc = acc_t<scalar>;
  const int64_t width = problem.width;
  const int64_t plane = problem.plane();
  const int64_t y2 = y + offset.dy;
  const int64_t dx = offset.dx;
  const int64_t K = problem.image_channels;
  const acc scale = weight_exponent_scale<acc>(problem.sigma);
  const int64_t paired_begin = x_begin, paired_end = x_end;
  if (whole_row) {
    x_begin = 0;
    x_end = width;
  }
  const scalar* image = static_cast<const scalar*>(problem.image) + b * K * plane;
  const scalar* p = image + y * width + x_begin;
  const scalar* q = image + y2 * width + dx + x_begin;
  const uint8_t* vp = nullptr;
  const uint8_t* vq = nullptr;
  if (problem.valid != nullptr) {
    vp = problem.valid + b * plane + y * width + x_begin;
    vq = problem.valid + b * plane + y2 * width + dx + x_begin;
  }
  const int64_t count = x_end - x_begin;
  const auto to_acc = [](scalar v) { return static_cast<acc>(v); };
  if (K == 3) {
    pair_weights<3>(p, q, plane, K, vp, vq, count, scale, to_acc, scratch + x_begin, weight + x_begin);
  } else if (K == 1) {
    pair_weights<1>(p, q, plane, K, vp, vq, count, scale, to_acc, scratch + x_begin, weight + x_begin);
  } else {
    pair_weights<0>(p, q, plane, K, vp, vq, count, scale, to_acc, scratch + x_begin, weight + x_begin);
  }
  for (int64_t x = 0; x < paired_begin; ++x) weight[x] = acc(0);
  for (int64_t x = paired_end; x < width; ++x) weight[x] = acc(0);
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
      image_bad |= static_cast<int32_t>(!is_finite(static_cast<acc>(row[x])));
    }
  }
  return (probs_bad ? kProbsOutOfRange : 0) | (image_bad ? kImageNotFinite : 0);
}

// The neighbours of one image row under a fixed list of offsets: for each
// offset its colour-weight row and where its neighbour row starts (shifted by
// dx, so q of pixel x is at index x).  An offset whose neighbour row lies
// outside the image points at the row itself, with an all-zero weight row, so
// the unchecked interior loop reads valid memory and adds exactly 0.
template <typename acc, int N>
struct RowNeighbours {
  const acc* weight[N];
  int64_t row_shift[N];  // element offset from the pixel row to its neighbour row (dy * width + dx)
  int32_t dx[N];
  int64_t interior_begin;  // every neighbour's x + dx lies in [0, width) for x in the interior
  int64_t interior_end;

  // [lo, hi) is the intersection of the offsets' paired column ranges.  When
  // every neighbour row read stays in its plane (shifted_row_in_plane) the
  // unchecked loop covers the whole row, since weights are 0 where x + dx
  // leaves it; otherwise it covers [lo, hi), clamped to the row (offsets wider
  // than the row leave no interior).
  BOXLOSS_ALWAYS_INLINE void set_interior(int64_t lo, int64_t hi, bool whole_rows, int64_t width) {
    if (whole_rows) {
      interior_begin = 0;
      interior_end = width;
      return;
    }
    lo = lo < width ? lo : width;
    interior_begin = lo;
    interior_end = hi > lo ? hi : lo;
  }
};

// Sets up RowNeighbours for row y; offset j of the list is
// neighbour_offset(offset_index(j), dilation).  Weight rows are computed into
// `weights`, N rows of width, `row_stride` apart.
template <typename scalar, int N, typename OffsetIndex>
BOXLOSS_ALWAYS_INLINE void neighbours_of_row(const Problem& problem, int64_t b, int64_t y, OffsetIndex offset_index,
                                             acc_t<scalar>* weights, int64_t row_stride, acc_t<scalar>* scratch,
                                             RowNeighbours<acc_t<scalar>, N>* out) {
  using acc = acc_t<scalar>;
  const int64_t width = problem.width;
  int64_t lo = 0, hi = width;
  bool whole_rows = true;
#pragma GCC unroll 8
  for (int j = 0; j < N; ++j) {
    const Offset offset = neighbour_offset(offset_index(j), problem.dilation);
    const int64_t y2 = y + offset.dy;
    acc* w = weights + j * row_stride;
    out->weight[j] = w;
    out->dx[j] = offset.dx;
    int64_t x_begin, x_end;
    paired_x_range(width, offset.dx, &x_begin, &x_end);
    lo = x_begin > lo ? x_begin : lo;
    hi = x_end < hi ? x_end : hi;
    if (y2 < 0 || y2 >= problem.height || x_begin >= x_end) {
      for (int64_t x = 0; x < width; ++x) w[x] = acc(0);
      out->row_shift[j] = 0;
      out->dx[j] = 0;
      continue;
    }
    out->row_shift[j] = offset.dy * width + offset.dx;
    const bool whole_row = shifted_row_in_plane(y2, offset.dx, problem.height);
    whole_rows = whole_rows && whole_row;
    pair_weights_row<scalar>(problem, b, y, offset, x_begin, x_end, whole_row, w, scratch);
  }
  out->set_interior(lo, hi, whole_rows, width);
}

// sum_j w_j[x] f(x_p[x], x_q_j[x]) over the neighbours of pixel x, with the
// bounds of x + dx checked: the border columns outside the interior.
template <typename acc, int N, typename Scalar, typename F>
BOXLOSS_ALWAYS_INLINE acc border_sum(const RowNeighbours<acc, N>& nb, const Scalar* xp, int64_t x, int64_t width, F f) {
  acc v = acc(0);
  for (int j = 0; j < N; ++j) {
    const int64_t xq = x + nb.dx[j];
    if (xq < 0 || xq >= width) continue;
    v += nb.weight[j][x] * f(static_cast<acc>(xp[x]), static_cast<acc>(xp[x + nb.row_shift[j]]));
  }
  return v;
}

// Sum of a row in double, in eight interleaved partial sums: a fixed order
// (deterministic) that the compiler keeps in vector registers, where one
// running sum would be a chain of dependent scalar adds.
template <typename acc>
BOXLOSS_ALWAYS_INLINE double row_total(const acc* __restrict values, int64_t width) {
  double partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t x = 0;
  for (; x + 8 <= width; x += 8) {
#pragma GCC unroll 8
    for (int l = 0; l < 8; ++l) partial[l] += static_cast<double>(values[x + l]);
  }
  for (int l = 0; x < width; ++x, ++l) partial[l] += static_cast<double>(values[x]);
  return ((partial[0] + partial[1]) + (partial[2] + partial[3])) +
         ((partial[4] + partial[5]) + (partial[6] + partial[7]));
}

template <typename scalar, Kind kind, int NB>
BOXLOSS_CPU_CLONES void forward_rows_impl(const Problem& problem, int64_t row_begin, int64_t row_end, double* row_sums,
                                          int32_t* row_status_out) {
  using acc = acc_t<scalar>;
  constexpr int N = NB / 2;  // each unordered pair once
  const int64_t height = problem.height;
  const int64_t width = problem.width;
  const int64_t plane = problem.plane();
  std::vector<acc> buffer(static_cast<size_t>(width) * (N + 2));
  acc* row_acc = buffer.data();
  acc* scratch = row_acc + width;
  acc* weights = scratch + width;
  const auto value = [](acc a, acc b) { return Term<kind>::value(a, b); };

  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t b = r / height;
    const int64_t y = r % height;
    row_status_out[r] = row_status<scalar>(problem, b, y);
    RowNeighbours<acc, N> nb;
    neighbours_of_row<scalar, N>(problem, b, y, [](int j) { return j; }, weights, width, scratch, &nb);
    for (int64_t x = 0; x < width; ++x) row_acc[x] = acc(0);
    const scalar* probs = static_cast<const scalar*>(problem.probs) + b * problem.num_channels * plane;
    for (int64_t s = 0; s < problem.num_selected; ++s) {
      const scalar* __restrict xp = probs + problem.channel_at(s) * plane + y * width;
      const scalar* xq[N];
      const acc* w[N];
#pragma GCC unroll 8
      for (int j = 0; j < N; ++j) {
        xq[j] = xp + nb.row_shift[j];
        w[j] = nb.weight[j];
      }
      for (int64_t x = nb.interior_begin; x < nb.interior_end; ++x) {
        const acc a = static_cast<acc>(xp[x]);
        acc v = acc(0);
#pragma GCC unroll 8
        for (int j = 0; j < N; ++j) v += w[j][x] * value(a, static_cast<acc>(xq[j][x]));
        row_acc[x] += v;
      }
      for (int64_t x = 0; x < nb.interior_begin; ++x) row_acc[x] += border_sum(nb, xp, x, width, value);
      for (int64_t x = nb.interior_end; x < width; ++x) row_acc[x] += border_sum(nb, xp, x, width, value);
    }
    row_sums[r] = row_total(row_acc, width);
  }
}

// The backward pass needs, for row y, the weights of the pairs p = (y, x)
// belongs to in both directions.  The weight of the reversed offset -o at
// (y, x) is the weight of o at (y - dy, x - dx), so the forward-offset weight
// rows of the last `dilation + 1` image rows are kept in a ring and each pair's
// exp is computed once per task instead of once per end.  Ring rows carry
// kRingPad >= dilation zeros on each side, so the shifted reads of the
// reversed offsets see weight 0 beyond the row, and start on 64-byte
// boundaries.  Larger dilations compute both directions.
constexpr int32_t kMaxCachedDilation = 8;
constexpr int64_t kRingPad = 16;  // elements; >= kMaxCachedDilation and a multiple of 64 bytes of float

template <typename scalar, int NB>
class BackwardWeights {
 public:
  using acc = acc_t<scalar>;
  static constexpr int N = NB / 2;

  explicit BackwardWeights(const Problem& problem)
      : problem_(problem),
        width_(problem.width),
        dilation_(problem.dilation),
        cached_(problem.dilation <= kMaxCachedDilation),
        stride_((problem.width + 2 * kRingPad + kRingPad - 1) / kRingPad * kRingPad),
        scratch_(static_cast<size_t>(problem.width), acc(0)),
        zero_row_(static_cast<size_t>(problem.width), acc(0)) {
    if (cached_) {
      ring_.assign(static_cast<size_t>((dilation_ + 1) * N * stride_ + kRingPad), acc(0));
      // First element of the first row's padding on a 64-byte boundary.
      const auto address = reinterpret_cast<uintptr_t>(ring_.data());
      ring_base_ = ring_.data() + ((64 - address % 64) % 64) / sizeof(acc);
      ring_row_.assign(static_cast<size_t>(dilation_ + 1), -1);
    } else {
      direct_.assign(static_cast<size_t>(NB * width_), acc(0));
    }
  }

  // The NB neighbours of row y of image b, in backward_offset_index order.
  // Always inlined, like every helper here: only the target_clones callers are
  // compiled for AVX2/AVX-512, an outlined helper would run the baseline code.
  BOXLOSS_ALWAYS_INLINE void row(int64_t b, int64_t y, RowNeighbours<acc, NB>* nb) {
    if (!cached_) {
      neighbours_of_row<scalar, NB>(
          problem_, b, y, [](int j) { return backward_offset_index(j, NB); }, direct_.data(), width_, scratch_.data(),
          nb);
      return;
    }
    const acc* current = forward_rows(b, y);
    const acc* previous = y - dilation_ >= 0 ? forward_rows(b, y - dilation_) : nullptr;
    int64_t lo = 0, hi = width_;
    bool whole_rows = true;
    for (int j = 0; j < NB; ++j) {
      const Offset offset = neighbour_offset(backward_offset_index(j, NB), dilation_);
      int64_t x_begin, x_end;
      paired_x_range(width_, offset.dx, &x_begin, &x_end);
      lo = x_begin > lo ? x_begin : lo;
      hi = x_end < hi ? x_end : hi;
      const int64_t y2 = y + offset.dy;
      if (y2 < 0 || y2 >= problem_.height || x_begin >= x_end) {
        nb->weight[j] = zero_row_.data();
        nb->row_shift[j] = 0;
        nb->dx[j] = 0;
        continue;
      }
      nb->row_shift[j] = offset.dy * width_ + offset.dx;
      nb->dx[j] = offset.dx;
      whole_rows = whole_rows && shifted_row_in_plane(y2, offset.dx, problem_.height);
      if (j < N) {
        nb->weight[j] = current + j * stride_;
      } else {
        // w_{-o}(y, x) = w_o(y + dy, x + dx), (dy, dx) = -o being this offset.
        const acc* source = offset.dy == 0 ? current : previous;
        nb->weight[j] = source + (j - N) * stride_ + offset.dx;
      }
    }
    nb->set_interior(lo, hi, whole_rows, width_);
  }

 private:
  // Forward-offset weight rows of image row yy (N rows, stride_ apart).
  BOXLOSS_ALWAYS_INLINE const acc* forward_rows(int64_t b, int64_t yy) {
    const int64_t slot = yy % (dilation_ + 1);
    acc* rows = ring_base_ + slot * N * stride_ + kRingPad;
    const int64_t key = b * problem_.height + yy;
    if (ring_row_[slot] != key) {
      RowNeighbours<acc, N> unused;
      neighbours_of_row<scalar, N>(problem_, b, yy, [](int j) { return j; }, rows, stride_, scratch_.data(), &unused);
      ring_row_[slot] = key;
    }
    return rows;
  }

  const Problem& problem_;
  const int64_t width_;
  const int64_t dilation_;
  const bool cached_;
  const int64_t stride_;
  std::vector<acc> scratch_;
  std::vector<acc> zero_row_;
  std::vector<acc> ring_;
  acc* ring_base_ = nullptr;
  std::vector<int64_t> ring_row_;
  std::vector<acc> direct_;
};

template <typename scalar, Kind kind, int NB>
BOXLOSS_CPU_CLONES void backward_rows_impl(const Problem& problem, const acc_t<scalar>* image_scale, int64_t row_begin,
                                           int64_t row_end, scalar* grad) {
  using acc = acc_t<scalar>;
  const int64_t height = problem.height;
  const int64_t width = problem.width;
  const int64_t plane = problem.plane();
  BackwardWeights<scalar, NB> weights(problem);
  const auto derivative = [](acc a, acc b) { return Term<kind>::grad_first(a, b); };

  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t b = r / height;
    const int64_t y = r % height;
    // Every pair p belongs to, in both directions: colour weights shared by
    // all channels.
    RowNeighbours<acc, NB> nb;
    weights.row(b, y, &nb);
    const acc scale = image_scale[b];
    const scalar* probs = static_cast<const scalar*>(problem.probs) + b * problem.num_channels * plane;
    scalar* grad_image = grad + b * problem.num_channels * plane;
    for (int64_t s = 0; s < problem.num_selected; ++s) {
      const int64_t c = problem.channel_at(s);
      const scalar* __restrict xp = probs + c * plane + y * width;
      scalar* __restrict out = grad_image + c * plane + y * width;
      const scalar* xq[NB];
      const acc* w[NB];
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) {
        xq[j] = xp + nb.row_shift[j];
        w[j] = nb.weight[j];
      }
      // The output is a fresh tensor that overlaps no input or weight row;
      // without this GCC gives up on the 2 NB + 2 pointer alias checks and
      // leaves the loop scalar.
#pragma GCC ivdep
      for (int64_t x = nb.interior_begin; x < nb.interior_end; ++x) {
        const acc a = static_cast<acc>(xp[x]);
        acc g = acc(0);
#pragma GCC unroll 8
        for (int j = 0; j < NB; ++j) g += w[j][x] * derivative(a, static_cast<acc>(xq[j][x]));
        out[x] = static_cast<scalar>(g * scale);
      }
      for (int64_t x = 0; x < nb.interior_begin; ++x) {
        out[x] = static_cast<scalar>(border_sum(nb, xp, x, width, derivative) * scale);
      }
      for (int64_t x = nb.interior_end; x < width; ++x) {
        out[x] = static_cast<scalar>(border_sum(nb, xp, x, width, derivative) * scale);
      }
    }
  }
}

}  // namespace

template <typename scalar>
void forward_rows(const Problem& problem, int64_t row_begin, int64_t row_end, double* row_sums,
                  int32_t* row_status_out) {
  const bool eight = problem.neighbourhood == 8;
  if (problem.kind == Kind::L1) {
    (eight ? forward_rows_impl<scalar, Kind::L1, 8>
           : forward_rows_impl<scalar, Kind::L1, 4>)(problem, row_begin, row_end, row_sums, row_status_out);
  } else {
    (eight ? forward_rows_impl<scalar, Kind::Potts, 8>
           : forward_rows_impl<scalar, Kind::Potts, 4>)(problem, row_begin, row_end, row_sums, row_status_out);
  }
}

template <typename scalar>
void backward_rows(const Problem& problem, const acc_t<scalar>* image_scale, int64_t row_begin, int64_t row_end,
                   scalar* grad) {
  const bool eight = problem.neighbourhood == 8;
  if (problem.kind == Kind::L1) {
    (eight ? backward_rows_impl<scalar, Kind::L1, 8>
           : backward_rows_impl<scalar, Kind::L1, 4>)(problem, image_scale, row_begin, row_end, grad);
  } else {
    (eight ? backward_rows_impl<scalar, Kind::Potts, 8>
           : backward_rows_impl<scalar, Kind::Potts, 4>)(problem, image_scale, row_begin, row_end, grad);
  }
}

template void forward_rows<float>(const Problem&, int64_t, int64_t, double*, int32_t*);
template void forward_rows<double>(const Problem&, int64_t, int64_t, double*, int32_t*);
template void backward_rows<float>(const Problem&, const float*, int64_t, int64_t, float*);
template void backward_rows<double>(const Problem&, const double*, int64_t, int64_t, double*);

}  // namespace cpu
}  // namespace sparse_crf
}  // namespace boxloss
