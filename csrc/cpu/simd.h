// Hand-vectorized CPU kernels for AVX2 + FMA (8 floats a vector) and AVX-512 (16): the vector
// primitives of each instruction set, and the kernels written once over them, compiled once per
// ISA inside that ISA's target region (namespaces fastddpm::avx2 and fastddpm::avx512):
//
//   philox_simd.inc   in-kernel noise: philox_normals(first, offset, seed, out) for kBlocks
//                     Philox blocks, normal4()'s bits (ctest and the pytest oracle tests check it)
//   group_norm_simd.inc  group_norm_act's passes: row_moments, and the apply rows affine_row
//                     (SiLU or none; optionally gathering another row's moments) and affine_channels
//
// Callers pick one with cpu_has_avx512() / cpu_has_avx2() (the extension itself targets
// baseline x86-64).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
// GCC 12's intrinsics start some results from an undefined vector, which -Wall reports as
// uninitialized at every inlined call: a false positive, silenced for this header.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <cstdint>

#include "isa.h"
#include "row_moments.h"

#define FASTDDPM_HAVE_SIMD 1
#define FDDPM_SIMD static inline __attribute__((always_inline))

namespace fastddpm {

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {

// Masks are float vectors of all-ones / all-zeros lanes, as the AVX2 compares return them.
struct V {
  using I = __m256i;
  using F = __m256;
  using M = __m256;
  static constexpr int kLanes = 8;

  FDDPM_SIMD F set1(float v) { return _mm256_set1_ps(v); }
  FDDPM_SIMD I set1i(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }
  FDDPM_SIMD I load_i(const uint32_t* p) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(p)); }
  FDDPM_SIMD F loadu(const float* p) { return _mm256_loadu_ps(p); }
  FDDPM_SIMD void storeu(float* p, F v) { _mm256_storeu_ps(p, v); }
  FDDPM_SIMD I mul_epu32(I a, I b) { return _mm256_mul_epu32(a, b); }
  FDDPM_SIMD I srli64_32(I a) { return _mm256_srli_epi64(a, 32); }
  FDDPM_SIMD I slli64_32(I a) { return _mm256_slli_epi64(a, 32); }
  FDDPM_SIMD I blend_odd(I even_from, I odd_from) { return _mm256_blend_epi32(even_from, odd_from, 0xAA); }
  FDDPM_SIMD I xor3(I a, I b, I c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
  template <int n>
  FDDPM_SIMD I srli32(I a) { return _mm256_srli_epi32(a, n); }
  template <int n>
  FDDPM_SIMD I slli32(I a) { return _mm256_slli_epi32(a, n); }
  FDDPM_SIMD I and_(I a, I b) { return _mm256_and_si256(a, b); }
  FDDPM_SIMD I or_(I a, I b) { return _mm256_or_si256(a, b); }
  FDDPM_SIMD I add_i(I a, I b) { return _mm256_add_epi32(a, b); }
  FDDPM_SIMD I add_where(M m, I a, I b) { return _mm256_add_epi32(a, _mm256_and_si256(_mm256_castps_si256(m), b)); }
  FDDPM_SIMD I sub_i(I a, I b) { return _mm256_sub_epi32(a, b); }
  FDDPM_SIMD I as_int(F a) { return _mm256_castps_si256(a); }
  FDDPM_SIMD F as_float(I a) { return _mm256_castsi256_ps(a); }
  FDDPM_SIMD F cvt(I a) { return _mm256_cvtepi32_ps(a); }
  FDDPM_SIMD I cvtt(F a) { return _mm256_cvttps_epi32(a); }
  FDDPM_SIMD F add(F a, F b) { return _mm256_add_ps(a, b); }
  FDDPM_SIMD F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  FDDPM_SIMD F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  FDDPM_SIMD F sqrt(F a) { return _mm256_sqrt_ps(a); }
  FDDPM_SIMD F min(F a, F b) { return _mm256_min_ps(a, b); }
  FDDPM_SIMD F max(F a, F b) { return _mm256_max_ps(a, b); }
  FDDPM_SIMD F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  FDDPM_SIMD I cvt_nearest(F a) { return _mm256_cvtps_epi32(a); }  // MXCSR's rounding: to nearest
  // a / b: the division itself (on AVX2 a SiLU row with it measured faster than with a reciprocal
  // and a Newton step, and it is exact; measurements: docs/performance.md#measurements-behind-the-code)
  FDDPM_SIMD F quotient(F a, F b) { return _mm256_div_ps(a, b); }
  FDDPM_SIMD M less(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  // lanes where (a & b) == 0
  FDDPM_SIMD M none_of(I a, I b) {
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(a, b), _mm256_setzero_si256()));
  }
  // m ? if_true : if_false, lane by lane (add_where: m ? a + b : a)
  FDDPM_SIMD F select(M m, F if_false, F if_true) { return _mm256_blendv_ps(if_false, if_true, m); }
  FDDPM_SIMD F xor_sign(F a, I sign_bits) { return _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(a), sign_bits)); }

  // out[4 k + j] = zj[k]: the 4 x 8 lanes transposed into element order.
  FDDPM_SIMD void store_interleaved4(F z0, F z1, F z2, F z3, float* out) {
    const F a = _mm256_unpacklo_ps(z0, z1), b = _mm256_unpackhi_ps(z0, z1);  // blocks 0 1 | 4 5 , 2 3 | 6 7
    const F c = _mm256_unpacklo_ps(z2, z3), d = _mm256_unpackhi_ps(z2, z3);
    const F e = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(a), _mm256_castps_pd(c)));  // 0 | 4
    const F f = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(a), _mm256_castps_pd(c)));  // 1 | 5
    const F g = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(b), _mm256_castps_pd(d)));  // 2 | 6
    const F h = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(b), _mm256_castps_pd(d)));  // 3 | 7
    _mm256_storeu_ps(out, _mm256_permute2f128_ps(e, f, 0x20));
    _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(g, h, 0x20));
    _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(e, f, 0x31));
    _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(g, h, 0x31));
  }
};

#include "philox_simd.inc"
#include "group_norm_simd.inc"

}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512 {

struct V {
  using I = __m512i;
  using F = __m512;
  using M = __mmask16;
  static constexpr int kLanes = 16;

  FDDPM_SIMD F set1(float v) { return _mm512_set1_ps(v); }
  FDDPM_SIMD I set1i(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }
  FDDPM_SIMD I load_i(const uint32_t* p) { return _mm512_load_si512(p); }
  FDDPM_SIMD F loadu(const float* p) { return _mm512_loadu_ps(p); }
  FDDPM_SIMD void storeu(float* p, F v) { _mm512_storeu_ps(p, v); }
  FDDPM_SIMD I mul_epu32(I a, I b) { return _mm512_mul_epu32(a, b); }
  FDDPM_SIMD I srli64_32(I a) { return _mm512_srli_epi64(a, 32); }
  FDDPM_SIMD I slli64_32(I a) { return _mm512_slli_epi64(a, 32); }
  FDDPM_SIMD I blend_odd(I even_from, I odd_from) { return _mm512_mask_blend_epi32(0xAAAA, even_from, odd_from); }
  FDDPM_SIMD I xor3(I a, I b, I c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
  template <int n>
  FDDPM_SIMD I srli32(I a) { return _mm512_srli_epi32(a, n); }
  template <int n>
  FDDPM_SIMD I slli32(I a) { return _mm512_slli_epi32(a, n); }
  FDDPM_SIMD I and_(I a, I b) { return _mm512_and_si512(a, b); }
  FDDPM_SIMD I or_(I a, I b) { return _mm512_or_si512(a, b); }
  FDDPM_SIMD I add_i(I a, I b) { return _mm512_add_epi32(a, b); }
  FDDPM_SIMD I add_where(M m, I a, I b) { return _mm512_mask_add_epi32(a, m, a, b); }
  FDDPM_SIMD I sub_i(I a, I b) { return _mm512_sub_epi32(a, b); }
  FDDPM_SIMD I as_int(F a) { return _mm512_castps_si512(a); }
  FDDPM_SIMD F as_float(I a) { return _mm512_castsi512_ps(a); }
  FDDPM_SIMD F cvt(I a) { return _mm512_cvtepi32_ps(a); }
  FDDPM_SIMD I cvtt(F a) { return _mm512_cvttps_epi32(a); }
  FDDPM_SIMD F add(F a, F b) { return _mm512_add_ps(a, b); }
  FDDPM_SIMD F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  FDDPM_SIMD F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  FDDPM_SIMD F sqrt(F a) { return _mm512_sqrt_ps(a); }
  FDDPM_SIMD F min(F a, F b) { return _mm512_min_ps(a, b); }
  FDDPM_SIMD F max(F a, F b) { return _mm512_max_ps(a, b); }
  FDDPM_SIMD F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  FDDPM_SIMD I cvt_nearest(F a) { return _mm512_cvtps_epi32(a); }  // MXCSR's rounding: to nearest
  // a / b as a 14-bit reciprocal and one Newton step (relative error ~1e-7): a 16-lane division
  // is slow on Intel cores (the AVX-512 SiLU row in docs/performance.md#measurements-behind-the-code
  // was measured in this form)
  FDDPM_SIMD F quotient(F a, F b) {
    const F r = _mm512_rcp14_ps(b);
    return _mm512_mul_ps(a, _mm512_mul_ps(r, _mm512_fnmadd_ps(b, r, _mm512_set1_ps(2.0f))));
  }
  FDDPM_SIMD M less(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  FDDPM_SIMD M none_of(I a, I b) { return _mm512_testn_epi32_mask(a, b); }
  FDDPM_SIMD F select(M m, F if_false, F if_true) { return _mm512_mask_blend_ps(m, if_false, if_true); }
  FDDPM_SIMD F xor_sign(F a, I sign_bits) { return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), sign_bits)); }

  // out[4 k + j] = zj[k]: the 4 x 16 lanes transposed into element order.
  FDDPM_SIMD void store_interleaved4(F z0, F z1, F z2, F z3, float* out) {
    const F a = _mm512_unpacklo_ps(z0, z1), b = _mm512_unpackhi_ps(z0, z1);
    const F c = _mm512_unpacklo_ps(z2, z3), d = _mm512_unpackhi_ps(z2, z3);
    const F e = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(c)));  // 0 4 8 12
    const F f = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(c)));  // 1 5 9 13
    const F g = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(b), _mm512_castps_pd(d)));  // 2 6 10 14
    const F h = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(b), _mm512_castps_pd(d)));  // 3 7 11 15
    const F t0 = _mm512_shuffle_f32x4(e, f, 0x44), t1 = _mm512_shuffle_f32x4(g, h, 0x44);  // 0 4 1 5, 2 6 3 7
    const F t2 = _mm512_shuffle_f32x4(e, f, 0xEE), t3 = _mm512_shuffle_f32x4(g, h, 0xEE);  // 8 12 9 13, ...
    _mm512_storeu_ps(out, _mm512_shuffle_f32x4(t0, t1, 0x88));
    _mm512_storeu_ps(out + 16, _mm512_shuffle_f32x4(t0, t1, 0xDD));
    _mm512_storeu_ps(out + 32, _mm512_shuffle_f32x4(t2, t3, 0x88));
    _mm512_storeu_ps(out + 48, _mm512_shuffle_f32x4(t2, t3, 0xDD));
  }
};

#include "philox_simd.inc"
#include "group_norm_simd.inc"

}  // namespace avx512
#pragma GCC pop_options

}  // namespace fastddpm

#undef FDDPM_SIMD
#pragma GCC diagnostic pop
#endif
