// Per-element math shared by the CPU and CUDA kernels: the arithmetic CI tests on the CPU is the
// arithmetic the GPU runs. Kernels never compute schedule math; they only apply these formulas
// to per-sample scalars read from the tables built in fastddpm/schedule.py.
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define FDDPM_HD __host__ __device__ __forceinline__
#define FDDPM_UNROLL _Pragma("unroll")
#else
#define FDDPM_HD inline
#define FDDPM_UNROLL _Pragma("GCC unroll 10")
#endif

namespace fastddpm {

// Column order of the step-coefficient table (schedule.STEP_COLUMNS).
enum StepColumn { kP = 0, kQ = 1, kM1 = 2, kM2 = 3, kM3 = 4, kS = 5, kStepColumns = 6 };

// x0 = p x - q m (clipped to [-r, r] when clip), out = m1 x0 + m2 x + m3 m + s z.
// Evaluated left to right, like the reference's separate float32 ops (built with -ffp-contract=off).
template <typename T>
FDDPM_HD T ddpm_step_elem(T x, T m, T z, const T* c, bool clip, T r) {
  T x0 = c[kP] * x - c[kQ] * m;
  if (clip) x0 = x0 < -r ? -r : (x0 > r ? r : x0);
  return c[kM1] * x0 + c[kM2] * x + c[kM3] * m + c[kS] * z;
}

// x_t = sqrt(abar) x0 + sqrt(1 - abar) z.
template <typename T>
FDDPM_HD T q_sample_elem(T x0, T z, T sqrt_abar, T sqrt_one_minus_abar) {
  return sqrt_abar * x0 + sqrt_one_minus_abar * z;
}

template <typename T>
FDDPM_HD T silu(T v) { return v / (T(1) + exp(-v)); }

// ------------------------------------------------------------------------------------------
// Counter-based normal noise: Philox4x32-10 (Salmon et al. 2011) + Box-Muller.
// Element i of a call with (seed, offset) uses counter (i / 4, offset) and lane i % 4, so any
// element can be generated independently, in any order, on any device, with the same bits.

struct U32x4 { uint32_t v[4]; };

FDDPM_HD void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

FDDPM_HD U32x4 philox4x32_10(uint64_t counter, uint64_t offset, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = static_cast<uint32_t>(offset), c3 = static_cast<uint32_t>(offset >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
FDDPM_UNROLL
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(0xD2511F53u, c0, hi0, lo0);
    mulhilo(0xCD9E8D57u, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
    k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
  }
  return U32x4{{c0, c1, c2, c3}};
}

// A uint32 to a float in (0, 1]: never 0, so log() is finite.
FDDPM_HD float uniform_open0(uint32_t u) { return (static_cast<float>(u >> 8) + 1.0f) * 5.9604644775390625e-08f; }

// Four standard normals from one Philox block.
FDDPM_HD void normal4(uint64_t block, uint64_t offset, uint64_t seed, float out[4]) {
  const U32x4 r = philox4x32_10(block, offset, seed);
  const float two_pi = 6.283185307179586f;
FDDPM_UNROLL
  for (int j = 0; j < 2; ++j) {
    const float radius = sqrtf(-2.0f * logf(uniform_open0(r.v[2 * j])));
    const float angle = two_pi * uniform_open0(r.v[2 * j + 1]);
    out[2 * j] = radius * cosf(angle);
    out[2 * j + 1] = radius * sinf(angle);
  }
}

}  // namespace fastddpm
