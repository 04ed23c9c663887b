// CPU kernel of group_norm_act: y = act(group_norm(x + temb[:, :, None, None]) * w + b), computing
// in float (double for double inputs) whatever the storage dtype; NCHW and channels_last.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <utility>
#include <vector>

#include "fastddpm/checks.h"
#include "fastddpm/elementwise.h"
#include "huge_pages.h"
#include "isa.h"
#include "row_moments.h"
#include "simd.h"

namespace fastddpm {
namespace {

// The portable row loops: any storage dtype, computing in acc_t. Float rows on AVX2 or AVX-512
// CPUs run the hand-vectorized ones of group_norm_simd.inc instead.
template <typename scalar_t, typename acc_t>
RowMoments row_moments_loop(const scalar_t* x, int64_t n) {
  RowMoments m;
  if (n == 0) return m;
  const acc_t p = static_cast<acc_t>(x[0]);
  acc_t s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t d = static_cast<acc_t>(x[i]) - p;
    s1 += d;
    s2 += d * d;
  }
  m.pivot = static_cast<double>(p);
  m.s1 = static_cast<double>(s1);
  m.s2 = static_cast<double>(s2);
  return m;
}

// y[i] = act(x[i] * scale + shift).
template <bool kSilu, typename scalar_t, typename acc_t>
void affine_row_loop(const scalar_t* x, scalar_t* y, int64_t n, acc_t scale, acc_t shift) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]) * scale + shift;
    y[i] = static_cast<scalar_t>(kSilu ? silu(v) : v);
  }
}

// y[c] = act(x[c] * scale[c] + shift[c]) along one channels_last row.
template <bool kSilu, typename scalar_t, typename acc_t>
void affine_channels_loop(const scalar_t* x, scalar_t* y, int64_t n, const acc_t* scale, const acc_t* shift) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    const acc_t v = static_cast<acc_t>(x[c]) * scale[c] + shift[c];
    y[c] = static_cast<scalar_t>(kSilu ? silu(v) : v);
  }
}

// Per-channel sums over the rows of a [rows, C] block (one channels_last sample): acc[c] = sum x.
template <typename scalar_t, typename acc_t>
void column_sums_loop(const scalar_t* x, int64_t rows, int64_t C, acc_t* acc) {
  std::fill(acc, acc + C, acc_t(0));
  for (int64_t s = 0; s < rows; ++s) {
    const scalar_t* row = x + s * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) acc[c] += static_cast<acc_t>(row[c]);
  }
}

// acc[c] = sum over rows of (x + shift[c])^2.
template <typename scalar_t, typename acc_t>
void column_sq_dev_loop(const scalar_t* x, int64_t rows, int64_t C, const acc_t* shift, acc_t* acc) {
  std::fill(acc, acc + C, acc_t(0));
  for (int64_t s = 0; s < rows; ++s) {
    const scalar_t* row = x + s * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const acc_t d = static_cast<acc_t>(row[c]) + shift[c];
      acc[c] += d * d;
    }
  }
}

// The column loops are cloned per ISA: at the SSE2 baseline they are compute-bound.
FDDPM_ISA_CLONES void column_sums_f32(const float* x, int64_t rows, int64_t C, float* acc) {
  column_sums_loop<float, float>(x, rows, C, acc);
}
FDDPM_ISA_CLONES void column_sq_dev_f32(const float* x, int64_t rows, int64_t C, const float* shift, float* acc) {
  column_sq_dev_loop<float, float>(x, rows, C, shift, acc);
}

// The storage dtype the hand-vectorized rows take (their uses sit inside FASTDDPM_HAVE_SIMD).
template <typename scalar_t>
constexpr bool kSimdRows = std::is_same_v<scalar_t, float>;
// 16-bit rows computing in float run the float rows on a converted copy (a conversion loop costs
// far less than the portable loop's scalar exp and division).
template <typename scalar_t, typename acc_t>
constexpr bool kConvertedRows = !std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>;

// A row of n storage values as float, in one of a thread's conversion buffers (slot 0 or 1).
template <typename scalar_t>
const float* float_row(const scalar_t* x, int64_t n, int slot) {
  thread_local std::vector<float> buffers[2];
  std::vector<float>& b = buffers[slot];
  if (static_cast<int64_t>(b.size()) < n) b.resize(n);
  for (int64_t i = 0; i < n; ++i) b[i] = static_cast<float>(x[i]);
  return b.data();
}

template <typename scalar_t>
void store_float_row(const float* v, scalar_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<scalar_t>(v[i]);
}

template <typename scalar_t, typename acc_t>
RowMoments row_moments(const scalar_t* x, int64_t n) {
#ifdef FASTDDPM_HAVE_SIMD
  if constexpr (kSimdRows<scalar_t>) {
    if (n > 0 && cpu_has_avx512()) return avx512::row_moments(x, n);
    if (n > 0 && cpu_has_avx2()) return avx2::row_moments(x, n);
  }
  if constexpr (kConvertedRows<scalar_t, acc_t>) {
    if (n > 0 && cpu_has_avx2()) return row_moments<float, float>(float_row(x, n, 0), n);
  }
#endif
  return row_moments_loop<scalar_t, acc_t>(x, n);
}

// y = act(x * scale + shift) over one NCHW row; with next (another row of n values), also
// *m = row_moments(next, n), gathered in the same loop where the row kernels are SIMD.
template <typename scalar_t, typename acc_t>
void normalize_row(const scalar_t* x, scalar_t* y, int64_t n, acc_t scale, acc_t shift, bool silu_act,
                   const scalar_t* next, RowMoments* m) {
#ifdef FASTDDPM_HAVE_SIMD
  if constexpr (kSimdRows<scalar_t>) {
    if (n > 0 && cpu_has_avx512()) return avx512::affine_row(x, y, n, scale, shift, silu_act, next, m);
    if (n > 0 && cpu_has_avx2()) return avx2::affine_row(x, y, n, scale, shift, silu_act, next, m);
  }
  if constexpr (kConvertedRows<scalar_t, acc_t>) {
    if (n > 0 && cpu_has_avx2()) {
      thread_local std::vector<float> yb;
      if (static_cast<int64_t>(yb.size()) < n) yb.resize(n);
      normalize_row<float, float>(float_row(x, n, 0), yb.data(), n, scale, shift, silu_act,
                                  next ? float_row(next, n, 1) : nullptr, m);
      return store_float_row(yb.data(), y, n);
    }
  }
#endif
  if (silu_act) affine_row_loop<true, scalar_t, acc_t>(x, y, n, scale, shift);
  else affine_row_loop<false, scalar_t, acc_t>(x, y, n, scale, shift);
  if (next) *m = row_moments_loop<scalar_t, acc_t>(next, n);
}

template <typename scalar_t, typename acc_t>
void normalize_channels(const scalar_t* x, scalar_t* y, int64_t n, const acc_t* scale, const acc_t* shift,
                        bool silu_act) {
#ifdef FASTDDPM_HAVE_SIMD
  if constexpr (kSimdRows<scalar_t>) {
    if (cpu_has_avx512()) return avx512::affine_channels(x, y, n, scale, shift, silu_act);
    if (cpu_has_avx2()) return avx2::affine_channels(x, y, n, scale, shift, silu_act);
  }
  if constexpr (kConvertedRows<scalar_t, acc_t>) {
    if (cpu_has_avx2()) {
      thread_local std::vector<float> yb;
      if (static_cast<int64_t>(yb.size()) < n) yb.resize(n);
      normalize_channels<float, float>(float_row(x, n, 0), yb.data(), n, scale, shift, silu_act);
      return store_float_row(yb.data(), y, n);
    }
  }
#endif
  if (silu_act) affine_channels_loop<true, scalar_t, acc_t>(x, y, n, scale, shift);
  else affine_channels_loop<false, scalar_t, acc_t>(x, y, n, scale, shift);
}

template <typename scalar_t, typename acc_t>
void column_sums(const scalar_t* x, int64_t rows, int64_t C, acc_t* acc) {
  if constexpr (std::is_same_v<scalar_t, float>) column_sums_f32(x, rows, C, acc);
  else column_sums_loop<scalar_t, acc_t>(x, rows, C, acc);
}

template <typename scalar_t, typename acc_t>
void column_sq_dev(const scalar_t* x, int64_t rows, int64_t C, const acc_t* shift, acc_t* acc) {
  if constexpr (std::is_same_v<scalar_t, float>) column_sq_dev_f32(x, rows, C, shift, acc);
  else column_sq_dev_loop<scalar_t, acc_t>(x, rows, C, shift, acc);
}

struct GroupNormArgs {
  int64_t N, C, G, D, HW;
  double eps;
  bool silu;
};

// NCHW: each thread takes a run of (sample, group) pairs; group ng is D contiguous rows of HW
// values, row j at (ng D + j) HW. One read of the data from memory: a group's statistics are its
// rows' moments, and those of group ng + 1 are gathered in the same loop that writes group ng
// (its rows are still in cache from that read), so the reads of the next group overlap this
// group's SiLU arithmetic and writes. Only a thread's first group has a pass of its own.
template <typename scalar_t, typename acc_t>
void group_norm_nchw(const scalar_t* xp, scalar_t* yp, const acc_t* wp, const acc_t* bp, const acc_t* tp,
                     acc_t* mp, acc_t* rp, const GroupNormArgs& a) {
  const auto row = [&](int64_t ng, int64_t j) { return (ng * a.D + j) * a.HW; };
  at::parallel_for(0, a.N * a.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<RowMoments> moments(a.D), next(a.D);
    for (int64_t j = 0; j < a.D; ++j) moments[j] = row_moments<scalar_t, acc_t>(xp + row(begin, j), a.HW);
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t c0 = (ng % a.G) * a.D;
      const acc_t* tg = tp ? tp + (ng / a.G) * a.C + c0 : nullptr;  // the group's D temb values
      double mu, inv;
      group_mean_rstd(moments.data(), tg, a.D, a.HW, a.eps, mu, inv);
      mp[ng] = static_cast<acc_t>(mu);
      rp[ng] = static_cast<acc_t>(inv);
      for (int64_t j = 0; j < a.D; ++j) {
        const double w = wp ? double(wp[c0 + j]) : 1.0;
        const acc_t scale = static_cast<acc_t>(inv * w);
        const acc_t shift = static_cast<acc_t>(((tg ? tg[j] : 0.0) - mu) * inv * w + (bp ? double(bp[c0 + j]) : 0.0));
        normalize_row<scalar_t, acc_t>(xp + row(ng, j), yp + row(ng, j), a.HW, scale, shift, a.silu,
                                       ng + 1 < end ? xp + row(ng + 1, j) : nullptr, &next[j]);
      }
      std::swap(moments, next);
    }
  });
}

// NHWC (channels_last): one task per sample; each spatial position is a contiguous row of C
// values, so per-channel sums accumulate across rows with vectorized loops over channels.
template <typename scalar_t, typename acc_t>
void group_norm_nhwc(const scalar_t* xp, scalar_t* yp, const acc_t* wp, const acc_t* bp, const acc_t* tp,
                     acc_t* mp, acc_t* rp, const GroupNormArgs& a) {
  at::parallel_for(0, a.N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(a.C), shift(a.C), scale(a.C);
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* xb = xp + n * a.C * a.HW;
      const acc_t* tn = tp ? tp + n * a.C : nullptr;
      column_sums<scalar_t, acc_t>(xb, a.HW, a.C, acc.data());
      const double count = static_cast<double>(a.D * a.HW);
      std::vector<double> mu(a.G, 0.0), inv(a.G, 0.0);
      for (int64_t c = 0; c < a.C; ++c) mu[c / a.D] += double(acc[c]) + (tn ? double(tn[c]) * a.HW : 0.0);
      for (int64_t g = 0; g < a.G; ++g) mu[g] /= count;
      for (int64_t c = 0; c < a.C; ++c) shift[c] = static_cast<acc_t>((tn ? tn[c] : 0.0) - mu[c / a.D]);
      column_sq_dev<scalar_t, acc_t>(xb, a.HW, a.C, shift.data(), acc.data());
      for (int64_t c = 0; c < a.C; ++c) inv[c / a.D] += double(acc[c]);
      for (int64_t g = 0; g < a.G; ++g) {
        inv[g] = 1.0 / std::sqrt(inv[g] / count + a.eps);
        mp[n * a.G + g] = static_cast<acc_t>(mu[g]);
        rp[n * a.G + g] = static_cast<acc_t>(inv[g]);
      }
      for (int64_t c = 0; c < a.C; ++c) {
        const double w = wp ? double(wp[c]) : 1.0, i = inv[c / a.D];
        scale[c] = static_cast<acc_t>(i * w);
        shift[c] = static_cast<acc_t>(double(shift[c]) * i * w + (bp ? double(bp[c]) : 0.0));
      }
      for (int64_t s = 0; s < a.HW; ++s)
        normalize_channels<scalar_t, acc_t>(xb + s * a.C, yp + n * a.C * a.HW + s * a.C, a.C, scale.data(),
                                            shift.data(), a.silu);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_cpu(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    int64_t groups, double eps, const c10::optional<at::Tensor>& temb, bool silu_act) {
  check_group_norm_args(x_in, weight, bias, groups, eps, temb);
  const int64_t N = x_in.size(0), C = x_in.size(1);
  const int64_t HW = (N > 0 && C > 0) ? x_in.numel() / (N * C) : 0;
  const bool nhwc = x_in.dim() == 4 && !x_in.is_contiguous() &&
                    x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor x = nhwc ? x_in : x_in.contiguous();
  at::Tensor y = empty_output_like(x);  // x is contiguous or channels_last here
  const auto stat_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::empty({N, groups}, x.options().dtype(stat_type));
  at::Tensor rstd = at::empty({N, groups}, x.options().dtype(stat_type));
  const GroupNormArgs args{N, C, groups, C / groups, HW, eps, silu_act};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_act_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto as_acc = [](const c10::optional<at::Tensor>& v) {
      return v ? v->contiguous().to(at::CppTypeToScalarType<acc_t>::value) : at::Tensor();
    };
    const at::Tensor w = as_acc(weight), b = as_acc(bias), te = as_acc(temb);
    const acc_t* wp = weight ? w.data_ptr<acc_t>() : nullptr;
    const acc_t* bp = bias ? b.data_ptr<acc_t>() : nullptr;
    const acc_t* tp = temb ? te.data_ptr<acc_t>() : nullptr;
    (nhwc ? group_norm_nhwc<scalar_t, acc_t> : group_norm_nchw<scalar_t, acc_t>)(
        x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), wp, bp, tp, mean.data_ptr<acc_t>(),
        rstd.data_ptr<acc_t>(), args);
  });
  return {y, mean, rstd};
}

TORCH_LIBRARY_IMPL(fastddpm, CPU, m) { m.impl("group_norm_act", &group_norm_act_cpu); }

}  // namespace fastddpm
