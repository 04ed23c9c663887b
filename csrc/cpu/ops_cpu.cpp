// CPU kernels of the three fused ops: OpenMP-parallel (at::parallel_for) loops over contiguous
// memory, computing in float (double for double inputs) whatever the storage dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

#include "fastddpm/checks.h"
#include "fastddpm/elementwise.h"
#include "huge_pages.h"
#include "isa.h"
#include "simd.h"

namespace fastddpm {
namespace {

constexpr int64_t kGrain = 1 << 15;

// Elements [begin, end) of a [B, ...] tensor, split at sample boundaries: f(b, lo, hi).
template <typename F>
void for_each_sample_segment(int64_t begin, int64_t end, int64_t per_sample, const F& f) {
  for (int64_t i = begin; i < end;) {
    const int64_t b = i / per_sample;
    const int64_t hi = std::min(end, (b + 1) * per_sample);
    f(b, i, hi);
    i = hi;
  }
}

constexpr int64_t kChunk = 256;  // Philox blocks per batch: 4 KiB of normals, stays in L1

// Normals of Philox blocks [first, first + count), count <= kChunk, into out[4 * count]: the same
// normal4() arithmetic, split into flat structure-of-arrays loops so the compiler vectorizes each
// (needs -fno-trapping-math); cloned per ISA and picked at load time.
FDDPM_ISA_CLONES void philox_blocks_portable(int64_t first, int64_t count, uint64_t seed, uint64_t offset,
                                             float* out) {
  uint32_t r[4][kChunk];
  for (int64_t k = 0; k < count; ++k) {
    const U32x4 v = philox4x32_10(static_cast<uint64_t>(first + k), offset, seed);
    r[0][k] = v.v[0];
    r[1][k] = v.v[1];
    r[2][k] = v.v[2];
    r[3][k] = v.v[3];
  }
  float z[4][kChunk];
  for (int j = 0; j < 2; ++j)
    for (int64_t k = 0; k < count; ++k) normal_pair(r[2 * j][k], r[2 * j + 1][k], z[2 * j][k], z[2 * j + 1][k]);
  for (int64_t k = 0; k < count; ++k)
    for (int j = 0; j < 4; ++j) out[4 * k + j] = z[j][k];
}

// The SIMD generator for the running CPU takes whole groups of its width, the portable loop the rest.
void philox_blocks(int64_t first, int64_t count, uint64_t seed, uint64_t offset, float* out) {
  int64_t k = 0;
#ifdef FASTDDPM_HAVE_SIMD
  if (cpu_has_avx512()) {
    for (; k + avx512::kBlocks <= count; k += avx512::kBlocks) avx512::philox_normals(first + k, offset, seed, out + 4 * k);
  } else if (cpu_has_avx2()) {
    for (; k + avx2::kBlocks <= count; k += avx2::kBlocks) avx2::philox_normals(first + k, offset, seed, out + 4 * k);
  }
#endif
  if (k < count) philox_blocks_portable(first + k, count - k, seed, offset, out + 4 * k);
}

// Fill z[0 .. hi - lo) with the normals of global elements [lo, hi) of stream (seed, offset).
template <typename T>
void philox_normals(int64_t lo, int64_t hi, uint64_t seed, uint64_t offset, T* z) {
  float buf[4 * kChunk];
  for (int64_t blk = lo / 4, last = (hi + 3) / 4; blk < last; blk += kChunk) {
    const int64_t count = std::min(kChunk, last - blk);
    philox_blocks(blk, count, seed, offset, buf);
    const int64_t start = std::max(lo, blk * 4), stop = std::min(hi, (blk + count) * 4);
    for (int64_t i = start; i < stop; ++i) z[i - lo] = static_cast<T>(buf[i - blk * 4]);
  }
}

// One sample's contiguous run of a ddpm_step: out = step(x, m, z) with that sample's coefficients.
template <typename scalar_t, typename z_t, typename acc_t>
void step_row(const scalar_t* __restrict__ x, const scalar_t* __restrict__ m, const z_t* __restrict__ z,
              scalar_t* __restrict__ out, int64_t n, const acc_t* c, bool clip, acc_t r) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i)
    out[i] = static_cast<scalar_t>(ddpm_step_elem<acc_t>(static_cast<acc_t>(x[i]), static_cast<acc_t>(m[i]),
                                                         static_cast<acc_t>(z[i]), c, clip, r));
}

FDDPM_ISA_CLONES void step_row_f32(const float* __restrict__ x, const float* __restrict__ m,
                                   const float* __restrict__ z, float* __restrict__ out, int64_t n,
                                   const float* c, bool clip, float r) {
  step_row<float, float, float>(x, m, z, out, n, c, clip, r);
}

// One sample's contiguous run of a q_sample: out = a x0 + s z.
template <typename scalar_t, typename acc_t>
void noising_row(const scalar_t* __restrict__ x0, const scalar_t* __restrict__ z, scalar_t* __restrict__ out,
                 int64_t n, acc_t a, acc_t s) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i)
    out[i] = static_cast<scalar_t>(q_sample_elem<acc_t>(static_cast<acc_t>(x0[i]), static_cast<acc_t>(z[i]), a, s));
}

FDDPM_ISA_CLONES void noising_row_f32(const float* __restrict__ x0, const float* __restrict__ z,
                                      float* __restrict__ out, int64_t n, float a, float s) {
  noising_row<float, float>(x0, z, out, n, a, s);
}

template <typename scalar_t, typename z_t, typename acc_t>
void dispatch_step_row(const scalar_t* x, const scalar_t* m, const z_t* z, scalar_t* out, int64_t n,
                       const acc_t* c, bool clip, acc_t r) {
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<z_t, float>) {
    step_row_f32(x, m, z, out, n, c, clip, r);
  } else {
    step_row<scalar_t, z_t, acc_t>(x, m, z, out, n, c, clip, r);
  }
}

template <typename scalar_t, typename acc_t>
void dispatch_noising_row(const scalar_t* x0, const scalar_t* z, scalar_t* out, int64_t n, acc_t a, acc_t s) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    noising_row_f32(x0, z, out, n, a, s);
  } else {
    noising_row<scalar_t, acc_t>(x0, z, out, n, a, s);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> q_sample_cpu(const at::Tensor& x0_in, const at::Tensor& t,
                                                const at::Tensor& table,
                                                const c10::optional<at::Tensor>& noise_in,
                                                const c10::optional<at::Tensor>& rng_state) {
  check_timesteps(t, x0_in, table, "table", 2);
  check_noise_source(x0_in, noise_in, rng_state);
  const at::Tensor x0 = dense_like(x0_in, x0_in);
  const bool draw = !noise_in.has_value();
  const at::Tensor noise = draw ? empty_output_like(x0) : dense_like(*noise_in, x0);
  at::Tensor out = empty_output_like(x0);
  const int64_t numel = x0.numel(), per = numel / std::max<int64_t>(x0.size(0), 1);
  const at::Tensor t_dense = t.contiguous();  // a strided [B] view must not be read as dense
  const int64_t* tp = t_dense.data_ptr<int64_t>();
  const float* tab = table.data_ptr<float>();
  const auto [seed, offset] = read_rng_state(rng_state);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "q_sample_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x0.data_ptr<scalar_t>();
    scalar_t* np = noise.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
      for_each_sample_segment(begin, end, per, [&](int64_t b, int64_t lo, int64_t hi) {
        const acc_t a = tab[2 * tp[b]], s = tab[2 * tp[b] + 1];
        // in L1-sized pieces, so the noise just drawn is read back from cache
        constexpr int64_t kSub = 4096;
        for (int64_t sub = lo; sub < hi; sub += kSub) {
          const int64_t n = std::min(kSub, hi - sub);
          if (draw) philox_normals(sub, sub + n, seed, offset, np + sub);
          dispatch_noising_row<scalar_t, acc_t>(xp + sub, np + sub, op + sub, n, a, s);
        }
      });
    });
  });
  return {out, draw ? noise : at::empty({0}, x0.options())};
}

// Writes the step into `out`, which must be laid out densely like dense_like(x_in).
void ddpm_step_into(at::Tensor& out, const at::Tensor& x_in, const at::Tensor& m_in, const at::Tensor& t,
                    const at::Tensor& coeffs, const c10::optional<at::Tensor>& noise_in,
                    const c10::optional<at::Tensor>& rng_state, c10::optional<double> clip) {
  const StepInputs in = prepare_step(x_in, m_in, t, coeffs, noise_in, rng_state, clip);
  const at::Tensor &x = in.x, &m = in.m, &noise = in.noise;
  const bool draw = in.draw;
  const int64_t numel = x.numel(), per = numel / std::max<int64_t>(x.size(0), 1);
  const at::Tensor t_dense = t.contiguous();  // a strided [B] view must not be read as dense
  const int64_t* tp = t_dense.data_ptr<int64_t>();
  const float* tab = coeffs.data_ptr<float>();
  const auto [seed, offset] = read_rng_state(rng_state);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ddpm_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* mp = m.data_ptr<scalar_t>();
    const scalar_t* zp = draw ? nullptr : noise.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t r = static_cast<acc_t>(clip.value_or(0.0));
    at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
      constexpr int64_t kSub = 4096;  // drawn noise goes through an L1/L2-sized buffer
      std::vector<acc_t> zbuf(draw ? kSub : 0);
      for_each_sample_segment(begin, end, per, [&](int64_t b, int64_t lo, int64_t hi) {
        acc_t c[kStepColumns];
        for (int k = 0; k < kStepColumns; ++k) c[k] = tab[kStepColumns * tp[b] + k];
        if (!draw) {
          dispatch_step_row<scalar_t, scalar_t, acc_t>(xp + lo, mp + lo, zp + lo, op + lo, hi - lo, c,
                                                       clip.has_value(), r);
          return;
        }
        for (int64_t sub = lo; sub < hi; sub += kSub) {
          const int64_t n = std::min(kSub, hi - sub);
          if (c[kS] != acc_t(0)) philox_normals(sub, sub + n, seed, offset, zbuf.data());
          else std::fill(zbuf.begin(), zbuf.begin() + n, acc_t(0));
          dispatch_step_row<scalar_t, acc_t, acc_t>(xp + sub, mp + sub, zbuf.data(), op + sub, n, c,
                                                    clip.has_value(), r);
        }
      });
    });
  });
}

at::Tensor ddpm_step_cpu(const at::Tensor& x, const at::Tensor& m, const at::Tensor& t, const at::Tensor& coeffs,
                         const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& rng_state,
                         c10::optional<double> clip) {
  at::Tensor out = empty_output_like(dense_like(x, x));
  ddpm_step_into(out, x, m, t, coeffs, noise, rng_state, clip);
  return out;
}

void ddpm_step_out_cpu(const at::Tensor& x, const at::Tensor& m, const at::Tensor& t, const at::Tensor& coeffs,
                       const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& rng_state,
                       c10::optional<double> clip, at::Tensor out) {
  check_step_out(out, x);
  ddpm_step_into(out, x, m, t, coeffs, noise, rng_state, clip);
}

namespace {

// Row loops of group_norm_act. Each is a template (any storage dtype, computing in acc_t); the
// float instantiations are cloned per ISA (FDDPM_ISA_CLONES): at the SSE2 baseline these loops
// are compute-bound, SiLU's exp by an order of magnitude.
template <typename scalar_t, typename acc_t>
acc_t row_sum_loop(const scalar_t* x, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += static_cast<acc_t>(x[i]);
  return s;
}

// Sum of (x[i] + shift)^2 over a row.
template <typename scalar_t, typename acc_t>
acc_t row_sq_dev_loop(const scalar_t* x, int64_t n, acc_t shift) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t d = static_cast<acc_t>(x[i]) + shift;
    s += d * d;
  }
  return s;
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

FDDPM_ISA_CLONES float row_sum_f32(const float* x, int64_t n) { return row_sum_loop<float, float>(x, n); }
FDDPM_ISA_CLONES float row_sq_dev_f32(const float* x, int64_t n, float shift) {
  return row_sq_dev_loop<float, float>(x, n, shift);
}
// float rows: the hand-vectorized SiLU of the running CPU's ISA, else the compiler's loops
void affine_row_f32(const float* x, float* y, int64_t n, float scale, float shift, bool silu_act) {
#ifdef FASTDDPM_HAVE_SIMD
  if (cpu_has_avx512()) return avx512::affine_row(x, y, n, scale, shift, silu_act);
  if (cpu_has_avx2()) return avx2::affine_row(x, y, n, scale, shift, silu_act);
#endif
  if (silu_act) affine_row_loop<true, float, float>(x, y, n, scale, shift);
  else affine_row_loop<false, float, float>(x, y, n, scale, shift);
}
void affine_channels_f32(const float* x, float* y, int64_t n, const float* scale, const float* shift,
                         bool silu_act) {
#ifdef FASTDDPM_HAVE_SIMD
  if (cpu_has_avx512()) return avx512::affine_channels(x, y, n, scale, shift, silu_act);
  if (cpu_has_avx2()) return avx2::affine_channels(x, y, n, scale, shift, silu_act);
#endif
  if (silu_act) affine_channels_loop<true, float, float>(x, y, n, scale, shift);
  else affine_channels_loop<false, float, float>(x, y, n, scale, shift);
}

template <typename scalar_t, typename acc_t>
acc_t row_sum(const scalar_t* x, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) return row_sum_f32(x, n);
  else return row_sum_loop<scalar_t, acc_t>(x, n);
}

template <typename scalar_t, typename acc_t>
acc_t row_sq_dev(const scalar_t* x, int64_t n, acc_t shift) {
  if constexpr (std::is_same_v<scalar_t, float>) return row_sq_dev_f32(x, n, shift);
  else return row_sq_dev_loop<scalar_t, acc_t>(x, n, shift);
}

template <typename scalar_t, typename acc_t>
void normalize_row(const scalar_t* x, scalar_t* y, int64_t n, acc_t scale, acc_t shift, bool silu_act) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    affine_row_f32(x, y, n, scale, shift, silu_act);
  } else if (silu_act) {
    affine_row_loop<true, scalar_t, acc_t>(x, y, n, scale, shift);
  } else {
    affine_row_loop<false, scalar_t, acc_t>(x, y, n, scale, shift);
  }
}

template <typename scalar_t, typename acc_t>
void normalize_channels(const scalar_t* x, scalar_t* y, int64_t n, const acc_t* scale, const acc_t* shift,
                        bool silu_act) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    affine_channels_f32(x, y, n, scale, shift, silu_act);
  } else if (silu_act) {
    affine_channels_loop<true, scalar_t, acc_t>(x, y, n, scale, shift);
  } else {
    affine_channels_loop<false, scalar_t, acc_t>(x, y, n, scale, shift);
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

FDDPM_ISA_CLONES void column_sums_f32(const float* x, int64_t rows, int64_t C, float* acc) {
  column_sums_loop<float, float>(x, rows, C, acc);
}
FDDPM_ISA_CLONES void column_sq_dev_f32(const float* x, int64_t rows, int64_t C, const float* shift, float* acc) {
  column_sq_dev_loop<float, float>(x, rows, C, shift, acc);
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

// Ask for [p, p + bytes) to be brought into L2 ahead of use.
inline void prefetch_l2(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 2);
}

// NCHW: one task per (sample, group); each channel is a contiguous row of HW values. Row sums
// are vectorized in acc_t and accumulated across rows in double; mean first, then the squared
// deviations (two passes: no cancellation), then the write. A group is one contiguous block, so
// while a row is written (compute-bound: SiLU) the matching row of the next group is prefetched,
// overlapping the next group's memory reads with this group's arithmetic.
template <typename scalar_t, typename acc_t>
void group_norm_nchw(const scalar_t* xp, scalar_t* yp, const acc_t* wp, const acc_t* bp, const acc_t* tp,
                     acc_t* mp, acc_t* rp, const GroupNormArgs& a) {
  at::parallel_for(0, a.N * a.G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / a.G, c0 = (ng % a.G) * a.D;
      const scalar_t* xb = xp + n * a.C * a.HW;
      const acc_t* tn = tp ? tp + n * a.C : nullptr;
      double sum = 0;
      for (int64_t c = c0; c < c0 + a.D; ++c)
        sum += static_cast<double>(row_sum<scalar_t, acc_t>(xb + c * a.HW, a.HW)) + (tn ? double(tn[c]) * a.HW : 0.0);
      const double count = static_cast<double>(a.D * a.HW), mu = sum / count;
      double sq = 0;
      for (int64_t c = c0; c < c0 + a.D; ++c)
        sq += row_sq_dev<scalar_t, acc_t>(xb + c * a.HW, a.HW, static_cast<acc_t>((tn ? tn[c] : 0.0) - mu));
      const double inv = 1.0 / std::sqrt(sq / count + a.eps);
      mp[ng] = static_cast<acc_t>(mu);
      rp[ng] = static_cast<acc_t>(inv);
      for (int64_t c = c0; c < c0 + a.D; ++c) {
        const double w = wp ? double(wp[c]) : 1.0;
        const acc_t scale = static_cast<acc_t>(inv * w);
        const acc_t shift = static_cast<acc_t>(((tn ? tn[c] : 0.0) - mu) * inv * w + (bp ? double(bp[c]) : 0.0));
        if (ng + 1 < end) prefetch_l2(xb + (c + a.D) * a.HW, a.HW * static_cast<int64_t>(sizeof(scalar_t)));
        normalize_row<scalar_t, acc_t>(xb + c * a.HW, yp + n * a.C * a.HW + c * a.HW, a.HW, scale, shift, a.silu);
      }
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
  check_group_norm_args(x_in, weight, bias, groups, temb);
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

// The instruction set the hand-vectorized CPU kernels run with on this machine.
std::string cpu_simd_isa() {
#ifdef FASTDDPM_HAVE_SIMD
  if (cpu_has_avx512()) return "avx512";
  if (cpu_has_avx2()) return "avx2";
#endif
  return "portable";
}

TORCH_LIBRARY_FRAGMENT(fastddpm, m) { m.def("cpu_simd_isa() -> str", &cpu_simd_isa); }

TORCH_LIBRARY_IMPL(fastddpm, CPU, m) {
  m.impl("q_sample", &q_sample_cpu);
  m.impl("ddpm_step", &ddpm_step_cpu);
  m.impl("ddpm_step_out", &ddpm_step_out_cpu);
  m.impl("group_norm_act", &group_norm_act_cpu);
}

}  // namespace fastddpm
