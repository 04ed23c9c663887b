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

FDDPM_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof u);
  return u;
#endif
}

FDDPM_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// exp for float without branches or library calls (Cephes expf polynomial, a few ulp), so loops
// that apply it vectorize on the CPU; the GPU runs the same arithmetic.
FDDPM_HD float branchless_exp(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float v = x * 1.44269504088896341f + 0.5f;
  int n = static_cast<int>(v);
  n -= (v < static_cast<float>(n)) ? 1 : 0;  // floor
  const float fn = static_cast<float>(n);
  const float r = (x - fn * 0.693359375f) - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.0f;
  return y * bits_float(static_cast<uint32_t>(n + 127) << 23);
}

FDDPM_HD float silu(float v) { return v / (1.0f + branchless_exp(-v)); }
FDDPM_HD double silu(double v) { return v / (1.0 + exp(-v)); }

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

// Branch-free float log for x in (0, 1] (Cephes logf: a few ulp), so the CPU loop vectorizes and
// every device computes the same bits. Mirrored in fastddpm/ops/philox.py.
FDDPM_HD float noise_log(float x) {
  const uint32_t bits = float_bits(x);
  const float m = bits_float((bits & 0x007fffffu) | 0x3f000000u);  // x = m 2^e, m in [0.5, 1)
  const bool small = m < 0.70710678118654752f;
  // float selects only (no integer ternary), so the loop if-converts and vectorizes
  const float fe = static_cast<float>(static_cast<int>(bits >> 23) - 126) - (small ? 1.0f : 0.0f);
  const float t = m * (small ? 2.0f : 1.0f) - 1.0f;  // (m + m) - 1 or m - 1, exactly
  const float z = t * t;
  float y = 7.0376836292e-2f;
  y = y * t - 1.1514610310e-1f;
  y = y * t + 1.1676998740e-1f;
  y = y * t - 1.2420140846e-1f;
  y = y * t + 1.4249322787e-1f;
  y = y * t - 1.6668057665e-1f;
  y = y * t + 2.0000714765e-1f;
  y = y * t - 2.4999993993e-1f;
  y = y * t + 3.3333331174e-1f;
  y = y * t * z;
  y = y + -2.12194440e-4f * fe;
  y = y + -0.5f * z;
  return (t + y) + 0.693359375f * fe;
}

// sin and cos of 2 pi u for u in (0, 1]: quadrant reduction, then Cephes polynomials on [-pi/4, pi/4].
FDDPM_HD void noise_sincos_2pi(float u, float& s, float& c) {
  const float v = 4.0f * u;
  const int q = static_cast<int>(v + 0.5f);  // nearest quadrant, v > 0
  const float x = (v - static_cast<float>(q)) * 1.57079632679489662f;
  const float z = x * x;
  float sp = -1.9515295891e-4f;
  sp = sp * z + 8.3321608736e-3f;
  sp = sp * z - 1.6666654611e-1f;
  sp = sp * z * x + x;
  float cp = 2.443315711809948e-5f;
  cp = cp * z - 1.388731625493765e-3f;
  cp = cp * z + 4.166664568298827e-2f;
  cp = cp * z * z - 0.5f * z + 1.0f;
  // quadrant k: sin = (sp, cp, -sp, -cp)[k], cos = (cp, -sp, -cp, sp)[k]; selects, no branches
  const bool odd = (q & 1) != 0;
  const float s_sign = (q & 2) ? -1.0f : 1.0f;
  const float c_sign = ((q + 1) & 2) ? -1.0f : 1.0f;
  s = (odd ? cp : sp) * s_sign;
  c = (odd ? sp : cp) * c_sign;
}

// Box-Muller: two standard normals from two uniform bit patterns (a -> radius, b -> angle).
FDDPM_HD void normal_pair(uint32_t a, uint32_t b, float& z0, float& z1) {
  const float radius = sqrtf(-2.0f * noise_log(uniform_open0(a)));
  float s, c;
  noise_sincos_2pi(uniform_open0(b), s, c);
  z0 = radius * c;
  z1 = radius * s;
}

// Four standard normals from one Philox block: pairs (lane 0, lane 1) and (lane 2, lane 3).
FDDPM_HD void normal4(uint64_t block, uint64_t offset, uint64_t seed, float out[4]) {
  const U32x4 r = philox4x32_10(block, offset, seed);
  normal_pair(r.v[0], r.v[1], out[0], out[1]);
  normal_pair(r.v[2], r.v[3], out[2], out[3]);
}

}  // namespace fastddpm
