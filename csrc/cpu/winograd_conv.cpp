// 3x3, stride-1, pad-1 convolution by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray 2016)
// on the CPU, float32, channels_last. Each 2x2 output tile takes 16 multiplies per (c, k) pair
// instead of 36: the input tile d (4x4) becomes V = B^T d B, the weights g (3x3) become
// U = G g G^T (done once, in Python: fastddpm/models/winograd.py), the 16 positions are 16 GEMMs
// M[p] = V[p] U[p] over channels, and the output is Y = A^T M A. The transforms are additions only.
// Work goes in blocks of tiles sized so a block's V and M (2 MiB each) stay in cache between the
// transforms (parallel over the block's tiles) and the GEMMs (one at::bmm: MKL, parallel over
// positions). The arithmetic differs from a direct convolution only by rounding (the transforms'
// sums): measured 2x the direct convolution's error against float64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "isa.h"

namespace fastddpm {
namespace {

// Bytes of V (and of M) per block: chosen by a sweep over 0.25-8 MiB, where 2 MiB was fastest
// (measurements: docs/performance.md#measurements-behind-the-code).
constexpr int64_t kBlockBytes = 2048 * 1024;

// The 4-point transforms of F(2x2, 3x3): B^T v (input) and A^T v (output), additions only.
inline void bt4(float d0, float d1, float d2, float d3, float& o0, float& o1, float& o2, float& o3) {
  o0 = d0 - d2;
  o1 = d1 + d2;
  o2 = d2 - d1;
  o3 = d1 - d3;
}
inline void at4(float m0, float m1, float m2, float m3, float& o0, float& o1) {
  o0 = m0 + m1 + m2;
  o1 = m1 - m2 - m3;
}

// V[p][i][c] = (B^T d B)[p] for the tiles [t0, t0 + nt); d is the tile's 4x4 window of x (zeros
// past the edges). Straight-line code per channel, so the channel loop vectorizes.
FDDPM_ISA_CLONES void input_transform(const float* x, float* V, const float* zeros, int64_t t0, int64_t nt,
                                      int64_t TB, int64_t C, int64_t H, int64_t W, int64_t th, int64_t tw) {
  const int64_t ps = TB * C;  // stride between positions p
  for (int64_t i = 0; i < nt; ++i) {
    const int64_t t = t0 + i, n = t / (th * tw), ty = (t % (th * tw)) / tw, tx = t % tw;
    const float* d[16];
    for (int r = 0; r < 4; ++r)
      for (int s = 0; s < 4; ++s) {
        const int64_t yy = 2 * ty - 1 + r, xx = 2 * tx - 1 + s;
        d[4 * r + s] = (yy >= 0 && yy < H && xx >= 0 && xx < W) ? x + ((n * H + yy) * W + xx) * C : zeros;
      }
    float* v = V + i * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      float b00, b10, b20, b30, b01, b11, b21, b31, b02, b12, b22, b32, b03, b13, b23, b33;
      bt4(d[0][c], d[4][c], d[8][c], d[12][c], b00, b10, b20, b30);  // rows of each column
      bt4(d[1][c], d[5][c], d[9][c], d[13][c], b01, b11, b21, b31);
      bt4(d[2][c], d[6][c], d[10][c], d[14][c], b02, b12, b22, b32);
      bt4(d[3][c], d[7][c], d[11][c], d[15][c], b03, b13, b23, b33);
      bt4(b00, b01, b02, b03, v[0 * ps + c], v[1 * ps + c], v[2 * ps + c], v[3 * ps + c]);  // then columns
      bt4(b10, b11, b12, b13, v[4 * ps + c], v[5 * ps + c], v[6 * ps + c], v[7 * ps + c]);
      bt4(b20, b21, b22, b23, v[8 * ps + c], v[9 * ps + c], v[10 * ps + c], v[11 * ps + c]);
      bt4(b30, b31, b32, b33, v[12 * ps + c], v[13 * ps + c], v[14 * ps + c], v[15 * ps + c]);
    }
  }
}

// y = A^T M A + bias for the tiles [t0, t0 + nt). A tile whose 2x2 outputs are all inside the
// image is written in place; an edge tile (odd H or W) goes through `edge` and keeps its inside pixels.
FDDPM_ISA_CLONES void output_transform(const float* M, const float* bias, float* y, float* edge, int64_t t0,
                                       int64_t nt, int64_t TB, int64_t K, int64_t H, int64_t W, int64_t th,
                                       int64_t tw) {
  const int64_t ps = TB * K;
  for (int64_t i = 0; i < nt; ++i) {
    const int64_t t = t0 + i, n = t / (th * tw), ty = (t % (th * tw)) / tw, tx = t % tw;
    const bool full = 2 * ty + 1 < H && 2 * tx + 1 < W;
    float* o[4];
    for (int a = 0; a < 2; ++a)
      for (int b = 0; b < 2; ++b)
        o[2 * a + b] = full ? y + ((n * H + 2 * ty + a) * W + 2 * tx + b) * K : edge + (2 * a + b) * K;
    const float* m = M + i * K;
    float* __restrict__ o0 = o[0];
    float* __restrict__ o1 = o[1];
    float* __restrict__ o2 = o[2];
    float* __restrict__ o3 = o[3];
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) {
      float u00, u10, u01, u11, u02, u12, u03, u13;
      at4(m[0 * ps + k], m[4 * ps + k], m[8 * ps + k], m[12 * ps + k], u00, u10);  // rows of each column
      at4(m[1 * ps + k], m[5 * ps + k], m[9 * ps + k], m[13 * ps + k], u01, u11);
      at4(m[2 * ps + k], m[6 * ps + k], m[10 * ps + k], m[14 * ps + k], u02, u12);
      at4(m[3 * ps + k], m[7 * ps + k], m[11 * ps + k], m[15 * ps + k], u03, u13);
      float y00, y01, y10, y11;
      at4(u00, u01, u02, u03, y00, y01);  // then columns
      at4(u10, u11, u12, u13, y10, y11);
      o0[k] = y00 + bias[k];
      o1[k] = y01 + bias[k];
      o2[k] = y10 + bias[k];
      o3[k] = y11 + bias[k];
    }
    if (!full)
      for (int a = 0; a < 2; ++a)
        for (int b = 0; b < 2; ++b) {
          const int64_t yy = 2 * ty + a, xx = 2 * tx + b;
          if (yy < H && xx < W) std::copy(o[2 * a + b], o[2 * a + b] + K, y + ((n * H + yy) * W + xx) * K);
        }
  }
}

}  // namespace

// x: [N, C, H, W] float32 (read as channels_last); U: [16, C, K] transformed weights; bias: [K].
// Returns [N, K, H, W] in channels_last.
at::Tensor winograd_conv3x3_cpu(const at::Tensor& x_in, const at::Tensor& U, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x_in.dim() == 4, "x: expected [N, C, H, W], got ", x_in.sizes());
  TORCH_CHECK_VALUE(x_in.scalar_type() == at::kFloat, "x: expected a float32 tensor, got ", x_in.scalar_type());
  TORCH_CHECK_VALUE(U.scalar_type() == at::kFloat, "U: expected a float32 tensor, got ", U.scalar_type());
  TORCH_CHECK_VALUE(U.dim() == 3 && U.size(0) == 16 && U.size(1) == x_in.size(1), "U: expected [16, C=",
                    x_in.size(1), ", K] (fastddpm.ops.winograd.transform_weight), got ", U.sizes());
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3), K = U.size(2);
  TORCH_CHECK_VALUE(!bias || (bias->dim() == 1 && bias->size(0) == K && bias->scalar_type() == at::kFloat),
                    "bias: expected float32 [", K, "], got ", bias->scalar_type(), " ", bias->sizes());
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor u = U.contiguous();
  const at::Tensor b = bias ? bias->contiguous() : at::zeros({K}, x.options());  // no bias: add zeros
  at::Tensor y = at::empty({N, K, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t th = (H + 1) / 2, tw = (W + 1) / 2, T = N * th * tw;
  if (T == 0 || K == 0) return y;
  const int64_t TB = std::clamp<int64_t>(kBlockBytes / (16 * std::max(C, K) * 4) / 8 * 8, 8, 1024);
  const float* xp = x.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::Tensor V = at::empty({16, TB, C}, x.options()), M = at::empty({16, TB, K}, x.options());
  const at::Tensor zeros = at::zeros({C}, x.options());
  for (int64_t t0 = 0; t0 < T; t0 += TB) {
    const int64_t nt = std::min(TB, T - t0);
    at::parallel_for(0, nt, 8, [&](int64_t i0, int64_t i1) {
      input_transform(xp, V.data_ptr<float>() + i0 * C, zeros.data_ptr<float>(), t0 + i0, i1 - i0, TB, C, H, W,
                      th, tw);
    });
    at::Tensor Mv = M.narrow(1, 0, nt);
    at::bmm_out(Mv, V.narrow(1, 0, nt), u);
    at::parallel_for(0, nt, 8, [&](int64_t i0, int64_t i1) {
      std::vector<float> edge(4 * K);
      output_transform(M.data_ptr<float>() + i0 * K, bp, yp, edge.data(), t0 + i0, i1 - i0, TB, K, H, W, th, tw);
    });
  }
  return y;
}

TORCH_LIBRARY_FRAGMENT(fastddpm, m) {
  m.def("winograd_conv3x3(Tensor x, Tensor U, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastddpm, CPU, m) { m.impl("winograd_conv3x3", &winograd_conv3x3_cpu); }

}  // namespace fastddpm
