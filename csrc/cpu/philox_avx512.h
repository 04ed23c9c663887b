// AVX-512 in-kernel noise: Philox4x32-10 on 16 blocks at once (one block a lane) and Box-Muller
// on 16 pairs at once, the same float operations in the same order as normal4() in
// fastddpm/elementwise.h (mul and add kept separate, no FMA), so the bits equal the portable
// path's, the CUDA kernels' and the Python oracle's. The compiler's own vectorization of the
// portable loop widens every 32x32->64 multiply and repacks it; here the multiplies use
// vpmuludq on the even and odd lanes directly.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
// GCC 12's intrinsics start some results from an undefined vector, which -Wall reports as
// uninitialized at every inlined call: a false positive, silenced for this header.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <cstdint>

#define FASTDDPM_HAVE_AVX512_PHILOX 1

namespace fastddpm {
namespace philox512 {

#define FDDPM_AVX512 __attribute__((target("avx512f"), always_inline)) inline

// hi and lo 32 bits of m * b in every lane.
FDDPM_AVX512 void mulhilo16(__m512i m, __m512i b, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(b, m);                        // lanes 0, 2, ...: 64-bit products
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(b, 32), m);  // lanes 1, 3, ...
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

FDDPM_AVX512 __m512 add(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
FDDPM_AVX512 __m512 mul(__m512 a, __m512 b) { return _mm512_mul_ps(a, b); }
FDDPM_AVX512 __m512 cst(float v) { return _mm512_set1_ps(v); }

// uniform_open0: (float(u >> 8) + 1) 2^-24.
FDDPM_AVX512 __m512 uniform16(__m512i u) {
  return mul(add(_mm512_cvtepi32_ps(_mm512_srli_epi32(u, 8)), cst(1.0f)), cst(5.9604644775390625e-08f));
}

// noise_log, lane by lane.
FDDPM_AVX512 __m512 log16(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512 m = _mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(bits, _mm512_set1_epi32(0x007fffff)),
                                                       _mm512_set1_epi32(0x3f000000)));
  const __mmask16 small = _mm512_cmp_ps_mask(m, cst(0.70710678118654752f), _CMP_LT_OQ);
  const __m512 e = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(bits, 23), _mm512_set1_epi32(126)));
  const __m512 fe = _mm512_sub_ps(e, _mm512_maskz_mov_ps(small, cst(1.0f)));
  const __m512 t = _mm512_sub_ps(mul(m, _mm512_mask_blend_ps(small, cst(1.0f), cst(2.0f))), cst(1.0f));
  const __m512 z = mul(t, t);
  __m512 y = cst(7.0376836292e-2f);
  y = add(mul(y, t), cst(-1.1514610310e-1f));
  y = add(mul(y, t), cst(1.1676998740e-1f));
  y = add(mul(y, t), cst(-1.2420140846e-1f));
  y = add(mul(y, t), cst(1.4249322787e-1f));
  y = add(mul(y, t), cst(-1.6668057665e-1f));
  y = add(mul(y, t), cst(2.0000714765e-1f));
  y = add(mul(y, t), cst(-2.4999993993e-1f));
  y = add(mul(y, t), cst(3.3333331174e-1f));
  y = mul(mul(y, t), z);
  y = add(y, mul(cst(-2.12194440e-4f), fe));
  y = add(y, mul(cst(-0.5f), z));
  return add(add(t, y), mul(cst(0.693359375f), fe));
}

// noise_sincos_2pi, lane by lane.
FDDPM_AVX512 void sincos2pi16(__m512 u, __m512& s, __m512& c) {
  const __m512 v = mul(cst(4.0f), u);
  const __m512i q = _mm512_cvttps_epi32(add(v, cst(0.5f)));
  const __m512 x = mul(_mm512_sub_ps(v, _mm512_cvtepi32_ps(q)), cst(1.57079632679489662f));
  const __m512 z = mul(x, x);
  __m512 sp = cst(-1.9515295891e-4f);
  sp = add(mul(sp, z), cst(8.3321608736e-3f));
  sp = add(mul(sp, z), cst(-1.6666654611e-1f));
  sp = add(mul(mul(sp, z), x), x);
  __m512 cp = cst(2.443315711809948e-5f);
  cp = add(mul(cp, z), cst(-1.388731625493765e-3f));
  cp = add(mul(cp, z), cst(4.166664568298827e-2f));
  cp = add(_mm512_sub_ps(mul(mul(cp, z), z), mul(cst(0.5f), z)), cst(1.0f));
  const __m512i one = _mm512_set1_epi32(1), two = _mm512_set1_epi32(2);
  const __mmask16 odd = _mm512_test_epi32_mask(q, one);
  const __mmask16 s_neg = _mm512_test_epi32_mask(q, two);
  const __mmask16 c_neg = _mm512_test_epi32_mask(_mm512_add_epi32(q, one), two);
  s = mul(_mm512_mask_blend_ps(odd, sp, cp), _mm512_mask_blend_ps(s_neg, cst(1.0f), cst(-1.0f)));
  c = mul(_mm512_mask_blend_ps(odd, cp, sp), _mm512_mask_blend_ps(c_neg, cst(1.0f), cst(-1.0f)));
}

// normal_pair, lane by lane.
FDDPM_AVX512 void normal_pair16(__m512i a, __m512i b, __m512& z0, __m512& z1) {
  const __m512 radius = _mm512_sqrt_ps(mul(cst(-2.0f), log16(uniform16(a))));
  __m512 s, c;
  sincos2pi16(uniform16(b), s, c);
  z0 = mul(radius, c);
  z1 = mul(radius, s);
}

#undef FDDPM_AVX512

}  // namespace philox512

// The 64 normals of Philox blocks [first, first + 16) of stream (seed, offset), in element order
// (out[4 k + j] = lane j of block first + k), as normal4() computes them.
__attribute__((target("avx512f"))) inline void philox_normals64_avx512(uint64_t first, uint64_t offset,
                                                                       uint64_t seed, float* out) {
  using namespace philox512;
  alignas(64) uint32_t lo32[16], hi32[16];
  for (int k = 0; k < 16; ++k) {
    lo32[k] = static_cast<uint32_t>(first + k);
    hi32[k] = static_cast<uint32_t>((first + k) >> 32);
  }
  __m512i c0 = _mm512_load_si512(lo32), c1 = _mm512_load_si512(hi32);
  __m512i c2 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
  __m512i c3 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    __m512i hi0, lo0, hi1, lo1;
    mulhilo16(m0, c0, hi0, lo0);
    mulhilo16(m1, c2, hi1, lo1);
    c0 = _mm512_ternarylogic_epi32(hi1, c1, _mm512_set1_epi32(static_cast<int>(k0)), 0x96);  // a ^ b ^ c
    c2 = _mm512_ternarylogic_epi32(hi0, c3, _mm512_set1_epi32(static_cast<int>(k1)), 0x96);
    c1 = lo1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  __m512 z0, z1, z2, z3;
  normal_pair16(c0, c1, z0, z1);
  normal_pair16(c2, c3, z2, z3);
  // 4 x 16 -> 16 x 4: lane k of z0..z3 becomes out[4 k .. 4 k + 3]
  const __m512 a = _mm512_unpacklo_ps(z0, z1), b = _mm512_unpackhi_ps(z0, z1);
  const __m512 c = _mm512_unpacklo_ps(z2, z3), d = _mm512_unpackhi_ps(z2, z3);
  const __m512 e = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(c)));  // 0 4 8 12
  const __m512 f = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(c)));  // 1 5 9 13
  const __m512 g = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(b), _mm512_castps_pd(d)));  // 2 6 10 14
  const __m512 h = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(b), _mm512_castps_pd(d)));  // 3 7 11 15
  const __m512 t0 = _mm512_shuffle_f32x4(e, f, 0x44), t1 = _mm512_shuffle_f32x4(g, h, 0x44);  // 0 4 1 5, 2 6 3 7
  const __m512 t2 = _mm512_shuffle_f32x4(e, f, 0xEE), t3 = _mm512_shuffle_f32x4(g, h, 0xEE);  // 8 12 9 13, ...
  _mm512_storeu_ps(out, _mm512_shuffle_f32x4(t0, t1, 0x88));
  _mm512_storeu_ps(out + 16, _mm512_shuffle_f32x4(t0, t1, 0xDD));
  _mm512_storeu_ps(out + 32, _mm512_shuffle_f32x4(t2, t3, 0x88));
  _mm512_storeu_ps(out + 48, _mm512_shuffle_f32x4(t2, t3, 0xDD));
}

}  // namespace fastddpm
#pragma GCC diagnostic pop
#endif
