// CPU kernels of the three fused ops: OpenMP-parallel (at::parallel_for) loops over contiguous
// memory, computing in float (double for double inputs) whatever the storage dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "fastddpm/checks.h"
#include "fastddpm/elementwise.h"

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
__attribute__((target_clones("avx512f", "avx2", "default")))
void philox_blocks(int64_t first, int64_t count, uint64_t seed, uint64_t offset, float* out) {
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

}  // namespace

std::tuple<at::Tensor, at::Tensor> q_sample_cpu(const at::Tensor& x0_in, const at::Tensor& t,
                                                const at::Tensor& table,
                                                const c10::optional<at::Tensor>& noise_in,
                                                const c10::optional<at::Tensor>& rng_state) {
  check_timesteps(t, x0_in, table, "table", 2);
  check_noise_source(x0_in, noise_in, rng_state);
  const at::Tensor x0 = dense_like(x0_in, x0_in);
  const bool draw = !noise_in.has_value();
  const at::Tensor noise = draw ? at::empty_like(x0) : dense_like(*noise_in, x0);
  at::Tensor out = at::empty_like(x0);
  const int64_t numel = x0.numel(), per = numel / std::max<int64_t>(x0.size(0), 1);
  const int64_t* tp = t.data_ptr<int64_t>();
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
        if (draw) philox_normals(lo, hi, seed, offset, np + lo);
        for (int64_t i = lo; i < hi; ++i)
          op[i] = static_cast<scalar_t>(q_sample_elem<acc_t>(xp[i], np[i], a, s));
      });
    });
  });
  return {out, draw ? noise : at::empty({0}, x0.options())};
}

at::Tensor ddpm_step_cpu(const at::Tensor& x_in, const at::Tensor& m_in, const at::Tensor& t,
                         const at::Tensor& coeffs, const c10::optional<at::Tensor>& noise_in,
                         const c10::optional<at::Tensor>& rng_state, c10::optional<double> clip) {
  check_timesteps(t, x_in, coeffs, "coeffs", kStepColumns);
  check_same_shape(m_in, x_in, "model_out");
  check_noise_source(x_in, noise_in, rng_state);
  check_clip(clip);
  const at::Tensor x = dense_like(x_in, x_in), m = dense_like(m_in, x);
  const bool draw = !noise_in.has_value();
  const at::Tensor noise = draw ? at::Tensor() : dense_like(*noise_in, x);
  at::Tensor out = at::empty_like(x);
  const int64_t numel = x.numel(), per = numel / std::max<int64_t>(x.size(0), 1);
  const int64_t* tp = t.data_ptr<int64_t>();
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
      std::vector<acc_t> zbuf;
      for_each_sample_segment(begin, end, per, [&](int64_t b, int64_t lo, int64_t hi) {
        acc_t c[kStepColumns];
        for (int k = 0; k < kStepColumns; ++k) c[k] = tab[kStepColumns * tp[b] + k];
        if (draw) {
          zbuf.resize(hi - lo);
          if (c[kS] != acc_t(0)) philox_normals(lo, hi, seed, offset, zbuf.data());
          else std::fill(zbuf.begin(), zbuf.end(), acc_t(0));
          for (int64_t i = lo; i < hi; ++i)
            op[i] = static_cast<scalar_t>(
                ddpm_step_elem<acc_t>(xp[i], mp[i], zbuf[i - lo], c, clip.has_value(), r));
        } else {
          for (int64_t i = lo; i < hi; ++i)
            op[i] = static_cast<scalar_t>(
                ddpm_step_elem<acc_t>(xp[i], mp[i], zp[i], c, clip.has_value(), r));
        }
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_cpu(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    int64_t groups, double eps, const c10::optional<at::Tensor>& temb, bool silu_act) {
  check_group_norm_args(x_in, weight, bias, groups, temb);
  const int64_t N = x_in.size(0), C = x_in.size(1), G = groups, D = C / G;
  const int64_t HW = (N > 0 && C > 0) ? x_in.numel() / (N * C) : 0;
  const bool nhwc = x_in.dim() == 4 && !x_in.is_contiguous() &&
                    x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor x = nhwc ? x_in : x_in.contiguous();
  at::Tensor y = at::empty_like(x, nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const auto stat_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::empty({N, G}, x.options().dtype(stat_type));
  at::Tensor rstd = at::empty({N, G}, x.options().dtype(stat_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_act_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const at::Tensor w = weight ? weight->contiguous().to(at::CppTypeToScalarType<acc_t>::value) : at::Tensor();
    const at::Tensor bb = bias ? bias->contiguous().to(at::CppTypeToScalarType<acc_t>::value) : at::Tensor();
    const at::Tensor tt = temb ? temb->contiguous().to(at::CppTypeToScalarType<acc_t>::value) : at::Tensor();
    const acc_t* wp = weight ? w.data_ptr<acc_t>() : nullptr;
    const acc_t* bp = bias ? bb.data_ptr<acc_t>() : nullptr;
    const acc_t* tp = temb ? tt.data_ptr<acc_t>() : nullptr;
    auto* mp = mean.data_ptr<acc_t>();
    auto* rp = rstd.data_ptr<acc_t>();
    // Element (n, c, s) sits at n*C*HW + c*cs + s*ss in either layout.
    const int64_t cs = nhwc ? 1 : HW, ss = nhwc ? C : 1;
    const double count = static_cast<double>(D * HW);
    at::parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ng = begin; ng < end; ++ng) {
        const int64_t n = ng / G, c0 = (ng % G) * D;
        const scalar_t* xb = xp + n * C * HW;
        const acc_t* tn = tp ? tp + n * C : nullptr;
        double sum = 0;  // two passes in double: exact enough for any group size
        for (int64_t c = c0; c < c0 + D; ++c) {
          const double tb = tn ? tn[c] : 0.0;
          double part = 0;
          for (int64_t s = 0; s < HW; ++s) part += static_cast<acc_t>(xb[c * cs + s * ss]);
          sum += part + tb * HW;
        }
        const double mu = sum / count;
        double sq = 0;
        for (int64_t c = c0; c < c0 + D; ++c) {
          const double shift = (tn ? tn[c] : 0.0) - mu;
          for (int64_t s = 0; s < HW; ++s) {
            const double d = static_cast<acc_t>(xb[c * cs + s * ss]) + shift;
            sq += d * d;
          }
        }
        const double inv = 1.0 / std::sqrt(sq / count + eps);
        mp[ng] = static_cast<acc_t>(mu);
        rp[ng] = static_cast<acc_t>(inv);
        scalar_t* yb = yp + n * C * HW;
        for (int64_t c = c0; c < c0 + D; ++c) {
          const acc_t scale = static_cast<acc_t>(inv) * (wp ? wp[c] : acc_t(1));
          const acc_t shift = (bp ? bp[c] : acc_t(0)) +
                              static_cast<acc_t>(((tn ? tn[c] : 0.0) - mu) * inv) * (wp ? wp[c] : acc_t(1));
          for (int64_t s = 0; s < HW; ++s) {
            acc_t v = static_cast<acc_t>(xb[c * cs + s * ss]) * scale + shift;
            if (silu_act) v = silu<acc_t>(v);
            yb[c * cs + s * ss] = static_cast<scalar_t>(v);
          }
        }
      }
    });
  });
  return {y, mean, rstd};
}

TORCH_LIBRARY_IMPL(fastddpm, CPU, m) {
  m.impl("q_sample", &q_sample_cpu);
  m.impl("ddpm_step", &ddpm_step_cpu);
  m.impl("group_norm_act", &group_norm_act_cpu);
}

}  // namespace fastddpm
