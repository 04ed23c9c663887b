// Native unit tests of the per-element math shared by the CPU and CUDA kernels (run by ctest).
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "fastddpm/elementwise.h"
#include "../cpu/simd.h"

using namespace fastddpm;

static int failures = 0;
#define EXPECT(cond)                                                  \
  do {                                                                \
    if (!(cond)) {                                                    \
      std::fprintf(stderr, "%s:%d: FAILED %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                     \
    }                                                                 \
  } while (0)

static uint64_t pack(uint32_t lo, uint32_t hi) { return (static_cast<uint64_t>(hi) << 32) | lo; }

// Known-answer vectors of Random123's Philox4x32-10 (kat_vectors).
static void test_philox_known_answers() {
  struct Kat { uint32_t ctr[4], key[2], out[4]; } kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const Kat& k : kats) {
    const U32x4 r = philox4x32_10(pack(k.ctr[0], k.ctr[1]), pack(k.ctr[2], k.ctr[3]), pack(k.key[0], k.key[1]));
    for (int i = 0; i < 4; ++i) EXPECT(r.v[i] == k.out[i]);
  }
}

static void test_normals_are_finite_and_standard() {
  double sum = 0, sq = 0;
  const int blocks = 1 << 16;
  float z[4];
  for (int b = 0; b < blocks; ++b) {
    normal4(b, 3, 42, z);
    for (float v : z) {
      EXPECT(std::isfinite(v));
      sum += v;
      sq += static_cast<double>(v) * v;
    }
  }
  const double n = 4.0 * blocks, mean = sum / n, var = sq / n - mean * mean;
  EXPECT(std::fabs(mean) < 5 / std::sqrt(n));
  EXPECT(std::fabs(var - 1) < 5 * std::sqrt(2 / n));
  EXPECT(uniform_open0(0) > 0.0f && uniform_open0(0xffffffffu) == 1.0f);
}

static void test_step_and_noising_formulas() {
  const float c[kStepColumns] = {2.0f, 0.5f, 0.25f, 0.75f, 0.1f, 0.3f};
  // x0 = 2*1 - 0.5*4 = 0; out = 0.25*0 + 0.75*1 + 0.1*4 + 0.3*2
  EXPECT(std::fabs(ddpm_step_elem<float>(1.f, 4.f, 2.f, c, false, 0.f) - (0.75f + 0.4f + 0.6f)) < 1e-6f);
  // x0 = 2*3 - 0.5*0 = 6, clipped to 1: out = 0.25 + 0.75*3
  EXPECT(std::fabs(ddpm_step_elem<float>(3.f, 0.f, 0.f, c, true, 1.f) - (0.25f + 2.25f)) < 1e-6f);
  EXPECT(std::fabs(ddpm_step_elem<float>(-3.f, 0.f, 0.f, c, true, 1.f) - (-0.25f - 2.25f)) < 1e-6f);
  EXPECT(q_sample_elem<double>(2.0, 3.0, 0.6, 0.8) == 0.6 * 2.0 + 0.8 * 3.0);
  EXPECT(std::fabs(silu(1.0) - 1.0 / (1.0 + std::exp(-1.0))) < 1e-15);
  for (float x = -80.f; x < 80.f; x += 0.37f) {
    const double e = std::exp(static_cast<double>(x));
    EXPECT(std::fabs(branchless_exp(x) - e) <= 4e-7 * e);
    EXPECT(std::fabs(silu(x) - x / (1.0 + std::exp(-static_cast<double>(x)))) <= 1e-6 * (1.0 + std::fabs(x)));
  }
  EXPECT(silu(-200.f) == -0.f || std::fabs(silu(-200.f)) < 1e-30f);
  EXPECT(silu(200.f) == 200.f);
}

#ifdef FASTDDPM_HAVE_SIMD
// A SIMD generator (namespace avx2 or avx512) gives normal4()'s bits: whole calls, also where a
// call's blocks cross 2^32 (the counter's carry into its high word), and normal_pair on edge
// inputs (0, all ones, the log's sqrt(1/2) branch point, the quadrant boundaries) and on a
// million pseudo-random pairs.
template <int kLanes, int kBlocks, typename Normals, typename Pairs>
static void check_simd_generator(const char* name, Normals philox_normals, Pairs normal_pairs) {
  const uint64_t starts[] = {0, 16 * 977, (uint64_t(1) << 32) - 8, (uint64_t(1) << 32) - 3, (uint64_t(3) << 40) + 5};
  const uint64_t offsets[] = {0, 12345678901};
  int before = failures;
  for (uint64_t first : starts)
    for (uint64_t offset : offsets) {
      float fast[4 * kBlocks];
      philox_normals(first, offset, 0x243F6A8885A308D3ull, fast);
      for (int k = 0; k < kBlocks; ++k) {
        float z[4];
        normal4(first + k, offset, 0x243F6A8885A308D3ull, z);
        for (int j = 0; j < 4; ++j) EXPECT(float_bits(fast[4 * k + j]) == float_bits(z[j]));
      }
    }
  const uint32_t edges[] = {0u, 1u, 255u, 256u, 0xffffffffu, 0xfffffeffu, 0x80000000u, 0x7fffffffu,
                            0x3fffffffu, 0x40000000u, 0xbfffffffu, 0xc0000000u, 0x1fffffffu, 0x20000000u,
                            0xdfffffffu, 0xe0000000u, 0xb504f300u, 0xb504f400u, 0xb504f2ffu, 0x5a827980u};
  constexpr int kEdges = sizeof(edges) / sizeof(edges[0]);
  uint32_t state = 12345u;
  for (int round = 0; round < (1 << 20) / kLanes + kEdges * kEdges / kLanes + 1; ++round) {
    uint32_t a[kLanes], b[kLanes];
    for (int k = 0; k < kLanes; ++k) {
      const int e = round * kLanes + k;
      if (e < kEdges * kEdges) {
        a[k] = edges[e / kEdges];
        b[k] = edges[e % kEdges];
      } else {
        state = state * 1664525u + 1013904223u;
        a[k] = state;
        state = state * 1664525u + 1013904223u;
        b[k] = state;
      }
    }
    float z0[kLanes], z1[kLanes];
    normal_pairs(a, b, z0, z1);
    for (int k = 0; k < kLanes; ++k) {
      float r0, r1;
      normal_pair(a[k], b[k], r0, r1);
      EXPECT(float_bits(z0[k]) == float_bits(r0) && float_bits(z1[k]) == float_bits(r1));
    }
  }
  std::printf("test_elementwise: %s generator checked (%s)\n", name, failures == before ? "same bits" : "MISMATCH");
}
#endif

// A SIMD apply row (both shapes, SiLU or none, every tail length) against double precision.
template <typename Row, typename Channels>
static void check_simd_affine_rows(const char* name, Row affine_row, Channels affine_channels) {
  const int before = failures;
  float x[67], y[67], scale[67], shift[67];
  for (int n = 1; n <= 67; n += 3)
    for (int act = 0; act < 2; ++act) {
      for (int i = 0; i < n; ++i) {
        x[i] = -95.0f + 190.0f * static_cast<float>(i) / static_cast<float>(n);  // both saturations
        scale[i] = 0.5f + 0.01f * static_cast<float>(i);
        shift[i] = 0.25f - 0.02f * static_cast<float>(i);
      }
      const auto expect = [&](int i, double s, double b) {
        const double v = static_cast<double>(x[i]) * s + b, want = act ? v / (1.0 + std::exp(-v)) : v;
        EXPECT(std::fabs(y[i] - want) <= 1e-6 * (1.0 + std::fabs(want)));
      };
      affine_row(x, y, n, 0.75f, -0.5f, act == 1, nullptr, nullptr);
      for (int i = 0; i < n; ++i) expect(i, 0.75, -0.5);
      affine_channels(x, y, n, scale, shift, act == 1);
      for (int i = 0; i < n; ++i) expect(i, scale[i], shift[i]);
    }
  std::printf("test_elementwise: %s SiLU rows checked (%s)\n", name, failures == before ? "ok" : "WRONG");
}

// A SIMD row's moments, alone and gathered by an apply row, against double precision, for every
// tail length; the rows sit far from 0 (mean 1000, spread ~1), where sum x^2 - n mean^2 would cancel.
template <typename Moments, typename Row>
static void check_simd_row_moments(const char* name, Moments row_moments, Row affine_row) {
  const int before = failures;
  float x[67], next[67], y[67];
  uint32_t state = 12345u;
  for (int n = 1; n <= 67; ++n) {
    double s1 = 0, s2 = 0;
    for (int i = 0; i < n; ++i) {
      state = state * 1664525u + 1013904223u;
      next[i] = 1000.0f + static_cast<float>(state >> 8) * 5.9604645e-08f;  // 1000 + [0, 1)
      x[i] = static_cast<float>(i);
    }
    for (int i = 0; i < n; ++i) {
      const double d = static_cast<double>(next[i]) - next[0];
      s1 += d;
      s2 += d * d;
    }
    const auto expect = [&](const RowMoments& m) {
      EXPECT(m.pivot == next[0]);
      EXPECT(std::fabs(m.s1 - s1) <= 1e-5 * (1.0 + std::fabs(s1)));
      EXPECT(std::fabs(m.s2 - s2) <= 1e-5 * (1.0 + s2));
    };
    expect(row_moments(next, n));
    RowMoments gathered;
    affine_row(x, y, n, 2.0f, 1.0f, false, next, &gathered);
    expect(gathered);
    for (int i = 0; i < n; ++i) EXPECT(y[i] == 2.0f * x[i] + 1.0f);  // the row itself still written
  }
  std::printf("test_elementwise: %s row moments checked (%s)\n", name, failures == before ? "ok" : "WRONG");
}

static void test_simd_kernels() {
#ifdef FASTDDPM_HAVE_SIMD
  if (cpu_has_avx2()) {
    check_simd_generator<avx2::V::kLanes, avx2::kBlocks>("AVX2", avx2::philox_normals, avx2::normal_pairs);
    check_simd_affine_rows("AVX2", avx2::affine_row, avx2::affine_channels);
    check_simd_row_moments("AVX2", avx2::row_moments, avx2::affine_row);
  } else {
    std::printf("test_elementwise: no AVX2 + FMA on this CPU, its kernels not run\n");
  }
  if (cpu_has_avx512()) {
    check_simd_generator<avx512::V::kLanes, avx512::kBlocks>("AVX-512", avx512::philox_normals, avx512::normal_pairs);
    check_simd_affine_rows("AVX-512", avx512::affine_row, avx512::affine_channels);
    check_simd_row_moments("AVX-512", avx512::row_moments, avx512::affine_row);
  } else {
    std::printf("test_elementwise: no AVX-512 on this CPU, its kernels not run\n");
  }
#endif
}

int main() {
  test_simd_kernels();
  test_philox_known_answers();
  test_normals_are_finite_and_standard();
  test_step_and_noising_formulas();
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return EXIT_FAILURE;
  }
  std::printf("test_elementwise: all checks passed\n");
  return EXIT_SUCCESS;
}
