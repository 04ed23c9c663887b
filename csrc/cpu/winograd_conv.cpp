// 3x3, stride-1, pad-1 convolution by Winograd's minimal filtering F(m x m, 3x3) (Lavin & Gray 2016)
// on the CPU, channels_last, for output tiles of m = 2 (F(2x2, 3x3)) or m = 4 (F(4x4, 3x3)). With
// a = m + 2, each m x m output tile takes a*a multiplies per (c, k) pair instead of 9 m^2 (16 vs 36
// for m = 2, 36 vs 144 for m = 4): the input tile d (a x a) becomes V = B^T d B, the weights g
// (3x3) become U = G g G^T (done once, in Python: fastddpm/ops/winograd.py), the a*a positions are
// a*a GEMMs M[p] = V[p] U[p] over channels, and the output is Y = A^T M A.
// Work goes in blocks of tiles sized so a block's V and M stay in cache between the transforms
// (parallel over the block's tiles) and the GEMMs (one at::bmm: MKL / oneDNN, parallel over
// positions). One tile walk serves both tile sizes and both dtypes (float32; bfloat16, where the
// transforms run in float32 and V, U, M are bfloat16 so the GEMMs run on AMX); a tile size is a
// struct of its 1-D transforms. The arithmetic differs from a direct convolution only by rounding,
// which the larger transform constants of F(4x4) amplify (tests/test_winograd.py bounds it;
// F(4x4) in bfloat16 is rejected as too inaccurate, see fastddpm/ops/winograd.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <vector>

#include "isa.h"

namespace fastddpm {
namespace {

// Bytes of V (and of M) per block: chosen by a sweep over 0.25-8 MiB, where 2 MiB was fastest
// for F(2x2) (measurements: docs/performance.md#measurements-behind-the-code); for F(4x4), 2-8 MiB
// measured alike and 1 MiB slower.
constexpr int64_t kBlockBytes = 2048 * 1024;
// But at least this many tiles per block: each block's GEMMs stream all of U (a*a*C*K values), so
// wide convolutions (F(4x4) at 512 channels: 28 tiles by kBlockBytes) need taller GEMMs to
// amortize it; 64 was faster than 8 and than 128 in a sweep over 384-768 input channels.
constexpr int64_t kMinTiles = 64;

// Element loads and stores: the transforms compute in float32 whatever the storage type.
inline float load(float v) { return v; }
inline float load(c10::BFloat16 v) { return std::bit_cast<float>(static_cast<uint32_t>(v.x) << 16); }
inline void store(float* p, float v) { *p = v; }
inline void store(c10::BFloat16* p, float v) {  // round to nearest even, NaN kept NaN (branch-free: vectorizes)
  const uint32_t u = std::bit_cast<uint32_t>(v);
  const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  p->x = static_cast<uint16_t>(v != v ? 0x7fc0u : r);
}

// A tile size is its 1-D transforms, each applied to n channels at once (rows d[0..a) of n
// values in, rows o[..] out), so each is one vectorized loop over channels: B^T (a -> a points)
// and A^T (a -> m points, plus `add`: zeros, or the bias in the last pass).

// F(2x2, 3x3): additions only.
struct F2 {
  static constexpr int m = 2, a = 4;
  template <class I, class O>
  static inline void bt(const I* const* d, O* const* o, int64_t n) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
      const float d0 = load(d[0][c]), d1 = load(d[1][c]), d2 = load(d[2][c]), d3 = load(d[3][c]);
      store(o[0] + c, d0 - d2);
      store(o[1] + c, d1 + d2);
      store(o[2] + c, d2 - d1);
      store(o[3] + c, d1 - d3);
    }
  }
  template <class I, class O>
  static inline void at(const I* const* v, O* const* o, const float* add, int64_t n) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
      const float v0 = load(v[0][c]), v1 = load(v[1][c]), v2 = load(v[2][c]), v3 = load(v[3][c]);
      store(o[0] + c, v0 + v1 + v2 + add[c]);
      store(o[1] + c, v1 - v2 - v3 + add[c]);
    }
  }
};

// F(4x4, 3x3) on the points 0, 1, -1, 2, -2, inf.
struct F4 {
  static constexpr int m = 4, a = 6;
  template <class I, class O>
  static inline void bt(const I* const* d, O* const* o, int64_t n) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
      const float d0 = load(d[0][c]), d1 = load(d[1][c]), d2 = load(d[2][c]), d3 = load(d[3][c]),
                  d4 = load(d[4][c]), d5 = load(d[5][c]);
      store(o[0] + c, 4.0f * d0 - 5.0f * d2 + d4);
      store(o[1] + c, d3 + d4 - 4.0f * (d1 + d2));
      store(o[2] + c, d4 - d3 + 4.0f * (d1 - d2));
      store(o[3] + c, d4 - d2 + 2.0f * (d3 - d1));
      store(o[4] + c, d4 - d2 + 2.0f * (d1 - d3));
      store(o[5] + c, 4.0f * d1 - 5.0f * d3 + d5);
    }
  }
  template <class I, class O>
  static inline void at(const I* const* v, O* const* o, const float* add, int64_t n) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
      const float v0 = load(v[0][c]), v1 = load(v[1][c]), v2 = load(v[2][c]), v3 = load(v[3][c]),
                  v4 = load(v[4][c]), v5 = load(v[5][c]);
      const float s12 = v1 + v2, d12 = v1 - v2, s34 = v3 + v4, d34 = v3 - v4;
      store(o[0] + c, v0 + s12 + s34 + add[c]);
      store(o[1] + c, d12 + 2.0f * d34 + add[c]);
      store(o[2] + c, s12 + 4.0f * s34 + add[c]);
      store(o[3] + c, d12 + 8.0f * d34 + v5 + add[c]);
    }
  }
};

// Channels per pass of the 2-D transforms: the a x a intermediate (float32) of one chunk stays in L1.
constexpr int64_t kChunk = 64;

// V[p][i][c] = (B^T d B)[p] for the tiles [t0, t0 + nt); d is the tile's a x a window of x (zeros
// past the edges). Per chunk of channels: B^T d (the columns) into `tmp`, then (B^T d) B (the rows) into V.
template <class Tile, class T>
FDDPM_ISA_CLONES void input_transform(const T* x, T* V, const T* zeros, float* tmp, int64_t t0, int64_t nt,
                                      int64_t TB, int64_t C, int64_t H, int64_t W, int64_t th, int64_t tw) {
  constexpr int a = Tile::a, m = Tile::m;
  const int64_t ps = TB * C;  // stride between positions p
  for (int64_t i = 0; i < nt; ++i) {
    const int64_t t = t0 + i, n = t / (th * tw), ty = (t % (th * tw)) / tw, tx = t % tw;
    const T* d[a * a];
    for (int r = 0; r < a; ++r)
      for (int s = 0; s < a; ++s) {
        const int64_t yy = m * ty - 1 + r, xx = m * tx - 1 + s;
        d[a * r + s] = (yy >= 0 && yy < H && xx >= 0 && xx < W) ? x + ((n * H + yy) * W + xx) * C : zeros;
      }
    for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
      const int64_t nc = std::min(kChunk, C - c0);
      for (int s = 0; s < a; ++s) {
        const T* in[a];
        float* out[a];
        for (int r = 0; r < a; ++r) in[r] = d[a * r + s] + c0, out[r] = tmp + (a * r + s) * kChunk;
        Tile::bt(in, out, nc);
      }
      for (int r = 0; r < a; ++r) {
        const float* in[a];
        T* out[a];
        for (int s = 0; s < a; ++s) in[s] = tmp + (a * r + s) * kChunk, out[s] = V + (a * r + s) * ps + i * C + c0;
        Tile::bt(in, out, nc);
      }
    }
  }
}

// y = A^T M A + bias for the tiles [t0, t0 + nt), per chunk of channels like input_transform. A
// tile whose m x m outputs are all inside the image is written in place; an edge tile (H or W
// not a multiple of m) goes through `edge` and keeps its inside pixels.
template <class Tile, class T>
FDDPM_ISA_CLONES void output_transform(const T* M, const float* bias, const float* zeros, T* y, T* edge, float* tmp,
                                       int64_t t0, int64_t nt, int64_t TB, int64_t K, int64_t H, int64_t W,
                                       int64_t th, int64_t tw) {
  constexpr int a = Tile::a, m = Tile::m;
  const int64_t ps = TB * K;
  for (int64_t i = 0; i < nt; ++i) {
    const int64_t t = t0 + i, n = t / (th * tw), ty = (t % (th * tw)) / tw, tx = t % tw;
    const bool full = m * ty + m <= H && m * tx + m <= W;
    T* o[m * m];
    for (int r = 0; r < m; ++r)
      for (int s = 0; s < m; ++s)
        o[m * r + s] = full ? y + ((n * H + m * ty + r) * W + m * tx + s) * K : edge + (m * r + s) * K;
    for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
      const int64_t nk = std::min(kChunk, K - k0);
      for (int s = 0; s < a; ++s) {
        const T* in[a];
        float* out[m];
        for (int r = 0; r < a; ++r) in[r] = M + (a * r + s) * ps + i * K + k0;
        for (int r = 0; r < m; ++r) out[r] = tmp + (a * r + s) * kChunk;
        Tile::at(in, out, zeros, nk);
      }
      for (int r = 0; r < m; ++r) {
        const float* in[a];
        T* out[m];
        for (int s = 0; s < a; ++s) in[s] = tmp + (a * r + s) * kChunk;
        for (int s = 0; s < m; ++s) out[s] = o[m * r + s] + k0;
        Tile::at(in, out, bias + k0, nk);
      }
    }
    if (!full)
      for (int r = 0; r < m; ++r)
        for (int s = 0; s < m; ++s) {
          const int64_t yy = m * ty + r, xx = m * tx + s;
          if (yy < H && xx < W) std::copy(o[m * r + s], o[m * r + s] + K, y + ((n * H + yy) * W + xx) * K);
        }
  }
}

// The tile walk: blocks of TB tiles through input transform, a*a GEMMs, output transform.
template <class Tile, class T>
void winograd_blocks(const at::Tensor& x, const at::Tensor& u, const at::Tensor& b, at::Tensor& y) {
  constexpr int a = Tile::a, m = Tile::m;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = u.size(2);
  const int64_t th = (H + m - 1) / m, tw = (W + m - 1) / m, T_ = N * th * tw;
  const int64_t TB =
      std::clamp<int64_t>(kBlockBytes / (a * a * std::max(C, K) * int64_t(sizeof(T))) / 8 * 8, kMinTiles, 1024);
  const T* xp = x.data_ptr<T>();
  const float* bp = b.data_ptr<float>();
  T* yp = y.data_ptr<T>();
  at::Tensor V = at::empty({a * a, TB, C}, x.options()), M = at::empty({a * a, TB, K}, x.options());
  const at::Tensor zeros = at::zeros({C}, x.options());
  for (int64_t t0 = 0; t0 < T_; t0 += TB) {
    const int64_t nt = std::min(TB, T_ - t0);
    at::parallel_for(0, nt, 8, [&](int64_t i0, int64_t i1) {
      std::vector<float> tmp(a * a * kChunk);
      input_transform<Tile, T>(xp, V.data_ptr<T>() + i0 * C, zeros.data_ptr<T>(), tmp.data(), t0 + i0, i1 - i0, TB,
                               C, H, W, th, tw);
    });
    at::Tensor Mv = M.narrow(1, 0, nt);
    at::bmm_out(Mv, V.narrow(1, 0, nt), u);
    at::parallel_for(0, nt, 8, [&](int64_t i0, int64_t i1) {
      std::vector<T> edge(m * m * K);
      std::vector<float> tmp(a * a * kChunk), no_bias(kChunk, 0.0f);
      output_transform<Tile, T>(M.data_ptr<T>() + i0 * K, bp, no_bias.data(), yp, edge.data(), tmp.data(), t0 + i0,
                                i1 - i0, TB, K, H, W, th, tw);
    });
  }
}

}  // namespace

// x: [N, C, H, W] float32 or bfloat16 (read as channels_last); U: [a*a, C, K] transformed weights
// of x's dtype, a*a = 16 for F(2x2, 3x3) and 36 for F(4x4, 3x3) (float32 only); bias: [K] float32
// or x's dtype. Returns [N, K, H, W] of x's dtype in channels_last.
at::Tensor winograd_conv3x3_cpu(const at::Tensor& x_in, const at::Tensor& U, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x_in.dim() == 4, "x: expected [N, C, H, W], got ", x_in.sizes());
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16, "x: expected a float32 or bfloat16 tensor, got ",
                    dtype);
  TORCH_CHECK_VALUE(U.scalar_type() == dtype, "U: expected a ", dtype, " tensor like x, got ", U.scalar_type());
  TORCH_CHECK_VALUE(U.dim() == 3 && (U.size(0) == 16 || U.size(0) == 36) && U.size(1) == x_in.size(1),
                    "U: expected [16 or 36, C=", x_in.size(1),
                    ", K] (fastddpm.ops.winograd.transform_weight), got ", U.sizes());
  TORCH_CHECK_VALUE(U.size(0) == 16 || dtype == at::kFloat,
                    "U: F(4x4, 3x3) (36 positions) runs in float32 only: in bfloat16 its error is about 10x "
                    "a direct bfloat16 convolution's");
  const int64_t N = x_in.size(0), H = x_in.size(2), W = x_in.size(3), K = U.size(2);
  TORCH_CHECK_VALUE(!bias || (bias->dim() == 1 && bias->size(0) == K &&
                              (bias->scalar_type() == at::kFloat || bias->scalar_type() == dtype)),
                    "bias: expected float32 or ", dtype, " [", K, "], got ", bias->scalar_type(), " ",
                    bias->sizes());
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor u = U.contiguous();
  const at::Tensor b = bias ? bias->to(at::kFloat).contiguous()
                            : at::zeros({K}, x.options().dtype(at::kFloat));  // no bias: add zeros
  at::Tensor y = at::empty({N, K, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  if (U.size(0) == 36)
    winograd_blocks<F4, float>(x, u, b, y);
  else if (dtype == at::kFloat)
    winograd_blocks<F2, float>(x, u, b, y);
  else
    winograd_blocks<F2, c10::BFloat16>(x, u, b, y);
  return y;
}

TORCH_LIBRARY_FRAGMENT(fastddpm, m) {
  m.def("winograd_conv3x3(Tensor x, Tensor U, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastddpm, CPU, m) { m.impl("winograd_conv3x3", &winograd_conv3x3_cpu); }

}  // namespace fastddpm
