// CPU kernels of q_sample and ddpm_step (group_norm_act's: group_norm_cpu.cpp): OpenMP-parallel
// (at::parallel_for) loops over contiguous memory, computing in float (double for double inputs)
// whatever the storage dtype.
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
#include "prefetch.h"
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

// The SIMD generator for the running CPU takes whole groups of its width, the portable loop the
// rest; pf (if any) advances by the normals drawn.
void philox_blocks(int64_t first, int64_t count, uint64_t seed, uint64_t offset, float* out, Prefetcher* pf) {
  int64_t k = 0;
#ifdef FASTDDPM_HAVE_SIMD
  if (cpu_has_avx512()) {
    for (; k + avx512::kBlocks <= count; k += avx512::kBlocks) {
      avx512::philox_normals(first + k, offset, seed, out + 4 * k);
      if (pf) pf->advance(4 * avx512::kBlocks);
    }
  } else if (cpu_has_avx2()) {
    for (; k + avx2::kBlocks <= count; k += avx2::kBlocks) {
      avx2::philox_normals(first + k, offset, seed, out + 4 * k);
      if (pf) pf->advance(4 * avx2::kBlocks);
    }
  }
#endif
  if (k < count) philox_blocks_portable(first + k, count - k, seed, offset, out + 4 * k);
  if (pf) pf->advance(4 * (count - k));
}

// Fill z[0 .. hi - lo) with the normals of global elements [lo, hi) of stream (seed, offset),
// issuing pf's prefetches (if any) as the normals are drawn.
template <typename T>
void philox_normals(int64_t lo, int64_t hi, uint64_t seed, uint64_t offset, T* z, Prefetcher* pf = nullptr) {
  float buf[4 * kChunk];
  if (pf) pf->set_work(4 * ((hi + 3) / 4 - lo / 4));
  for (int64_t blk = lo / 4, last = (hi + 3) / 4; blk < last; blk += kChunk) {
    const int64_t count = std::min(kChunk, last - blk);
    philox_blocks(blk, count, seed, offset, buf, pf);
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
  const auto [seed, offset, base] = read_rng_state(rng_state);
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
          if (draw) {  // the piece's x0 and outputs requested while its noise is drawn
            Prefetcher pf(n * static_cast<int64_t>(sizeof(scalar_t)));
            pf.add(xp + sub, false);
            pf.add(np + sub, true);
            pf.add(op + sub, true);
            philox_normals(base + sub, base + sub + n, seed, offset, np + sub, &pf);
          }
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
  const auto [seed, offset, base] = read_rng_state(rng_state);
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
          if (c[kS] != acc_t(0)) {  // the piece's inputs and output requested while its noise is drawn
            Prefetcher pf(n * static_cast<int64_t>(sizeof(scalar_t)));
            pf.add(xp + sub, false);
            pf.add(mp + sub, false);
            pf.add(op + sub, true);
            philox_normals(base + sub, base + sub + n, seed, offset, zbuf.data(), &pf);
          } else std::fill(zbuf.begin(), zbuf.begin() + n, acc_t(0));
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
}

}  // namespace fastddpm
