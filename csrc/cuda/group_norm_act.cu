// CUDA group_norm_act: act(GroupNorm(x + temb) * w + b), statistics in float.
// * one pass (a group of <= kOnePassMax values): one block per (sample, group) holds the group in
//   registers: mean, then squared deviations, then the write; 1 read + 1 write.
// * split reduction (larger groups): grid (groups, chunks). A stats kernel writes each chunk's
//   (count, mean, M2); the apply kernel merges a group's chunks with Chan's formula and writes its
//   chunk; 2 reads + 1 write, and enough blocks to fill the GPU at batch 1.
// Element k of a group: NCHW: channel c0 + k / HW at offset c0*HW + k (the group is contiguous);
// NHWC: position k / D, channel c0 + k % D, so neighbouring threads read neighbouring channels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "fastddpm/checks.h"
#include "fastddpm/elementwise.h"
#include "launch.cuh"

namespace fastddpm {
namespace {

constexpr int kValuesPerThread = 16;
constexpr int kMaxThreads = 512;
constexpr int kOnePassMax = kValuesPerThread * kMaxThreads;

template <typename scalar_t>
struct GroupNormArgs {
  const scalar_t* __restrict__ x;
  scalar_t* __restrict__ y;
  const float* __restrict__ w;     // [C] or null
  const float* __restrict__ b;     // [C] or null
  const float* __restrict__ temb;  // [N, C] or null
  float* __restrict__ mean_out;    // [N, G]
  float* __restrict__ rstd_out;    // [N, G]
  uint32_t C, HW, G, D, count;     // count = D * HW values per group
  bool nhwc, silu;
  float eps;

  // Offset of value k of group (n, g) and its channel.
  __device__ int64_t at(uint32_t n, uint32_t c0, uint32_t k, uint32_t& c) const {
    const int64_t base = static_cast<int64_t>(n) * C * HW;
    if (nhwc) {
      const uint32_t s = k / D;
      c = c0 + (k - s * D);
      return base + static_cast<int64_t>(s) * C + c;
    }
    c = c0 + k / HW;
    return base + static_cast<int64_t>(c0) * HW + k;
  }
  __device__ float load(uint32_t n, uint32_t c0, uint32_t k) const {
    uint32_t c;
    const float v = static_cast<float>(x[at(n, c0, k, c)]);
    return temb ? v + temb[static_cast<int64_t>(n) * C + c] : v;
  }
  // Write value k of the group, v = x + temb, normalized with (mu, inv).
  __device__ void store(uint32_t n, uint32_t c0, uint32_t k, float v, float mu, float inv) const {
    uint32_t c;
    const int64_t off = at(n, c0, k, c);
    float o = (v - mu) * inv * (w ? w[c] : 1.f) + (b ? b[c] : 0.f);
    if (silu) o = fastddpm::silu(o);
    y[off] = static_cast<scalar_t>(o);
  }
};

// Values [k0, k0 + n) of a group into registers (thread i holds k0 + i + j * blockDim.x); returns
// the block's sum of them.
template <typename scalar_t>
__device__ float load_chunk(const GroupNormArgs<scalar_t>& a, uint32_t n, uint32_t c0, uint32_t k0, uint32_t len,
                            float (&v)[kValuesPerThread], float* shared) {
  float part = 0.f;
#pragma unroll
  for (int j = 0; j < kValuesPerThread; ++j) {
    const uint32_t k = threadIdx.x + j * blockDim.x;
    v[j] = k < len ? a.load(n, c0, k0 + k) : 0.f;
    part += v[j];
  }
  return block_sum(part, shared);
}

__device__ float sum_sq_dev(const float (&v)[kValuesPerThread], uint32_t len, float mu, float* shared) {
  float part = 0.f;
#pragma unroll
  for (int j = 0; j < kValuesPerThread; ++j) {
    const uint32_t k = threadIdx.x + j * blockDim.x;
    const float d = v[j] - mu;
    part += k < len ? d * d : 0.f;
  }
  return block_sum(part, shared);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads) group_norm_one_pass(GroupNormArgs<scalar_t> a) {
  __shared__ float shared[32];
  const uint32_t ng = blockIdx.x, n = ng / a.G, c0 = (ng % a.G) * a.D;
  float v[kValuesPerThread];
  const float mu = load_chunk(a, n, c0, 0, a.count, v, shared) / a.count;
  const float inv = rsqrtf(sum_sq_dev(v, a.count, mu, shared) / a.count + a.eps);
  if (threadIdx.x == 0) {
    a.mean_out[ng] = mu;
    a.rstd_out[ng] = inv;
  }
#pragma unroll
  for (int j = 0; j < kValuesPerThread; ++j) {
    const uint32_t k = threadIdx.x + j * blockDim.x;
    if (k < a.count) a.store(n, c0, k, v[j], mu, inv);
  }
}

// Chunk blockIdx.y of group blockIdx.x: (count, mean, M2) into partials.
template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads) group_norm_chunk_stats(GroupNormArgs<scalar_t> a, uint32_t chunk,
                                                                      float* __restrict__ partials) {
  __shared__ float shared[32];
  const uint32_t ng = blockIdx.x, n = ng / a.G, c0 = (ng % a.G) * a.D;
  const uint32_t k0 = blockIdx.y * chunk, len = min(chunk, a.count - k0);
  float v[kValuesPerThread];
  const float mean = load_chunk(a, n, c0, k0, len, v, shared) / len;
  const float m2 = sum_sq_dev(v, len, mean, shared);
  if (threadIdx.x == 0) {
    float* p = partials + 3 * (static_cast<int64_t>(ng) * gridDim.y + blockIdx.y);
    p[0] = static_cast<float>(len);
    p[1] = mean;
    p[2] = m2;
  }
}

// Merge group blockIdx.x's chunk statistics (Chan et al.), then normalize chunk blockIdx.y.
template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads) group_norm_chunk_apply(GroupNormArgs<scalar_t> a, uint32_t chunk,
                                                                      const float* __restrict__ partials) {
  __shared__ float stats[2];
  const uint32_t ng = blockIdx.x, n = ng / a.G, c0 = (ng % a.G) * a.D;
  if (threadIdx.x == 0) {
    const float* p = partials + 3 * static_cast<int64_t>(ng) * gridDim.y;
    float cnt = p[0], mean = p[1], m2 = p[2];
    for (uint32_t i = 1; i < gridDim.y; ++i) {
      const float nb = p[3 * i], delta = p[3 * i + 1] - mean, tot = cnt + nb;
      mean += delta * (nb / tot);
      m2 += p[3 * i + 2] + delta * delta * (cnt * nb / tot);
      cnt = tot;
    }
    stats[0] = mean;
    stats[1] = rsqrtf(m2 / cnt + a.eps);
    if (blockIdx.y == 0) {
      a.mean_out[ng] = stats[0];
      a.rstd_out[ng] = stats[1];
    }
  }
  __syncthreads();
  const float mu = stats[0], inv = stats[1];
  const uint32_t k0 = blockIdx.y * chunk, end = min(k0 + chunk, a.count);
  for (uint32_t k = k0 + threadIdx.x; k < end; k += blockDim.x) a.store(n, c0, k, a.load(n, c0, k), mu, inv);
}

int threads_for(uint32_t values) {
  const uint32_t per = (values + kValuesPerThread - 1) / kValuesPerThread;
  return static_cast<int>(std::min<uint32_t>(kMaxThreads, std::max<uint32_t>(64, (per + 31) / 32 * 32)));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_cuda(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    int64_t groups, double eps, const c10::optional<at::Tensor>& temb, bool silu_act) {
  check_group_norm_args(x_in, weight, bias, groups, eps, temb);
  TORCH_CHECK_VALUE(x_in.scalar_type() != at::kDouble,
                    "x: float64 is not supported on CUDA; use float32, float16 or bfloat16");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t N = x_in.size(0), C = x_in.size(1), G = groups;
  const int64_t HW = x_in.numel() / std::max<int64_t>(N * C, 1);
  TORCH_CHECK_VALUE(C * HW < (int64_t(1) << 31), "x: a sample of ", C * HW, " values is too large for the CUDA kernel");
  const bool nhwc = x_in.dim() == 4 && !x_in.is_contiguous() &&
                    x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor x = nhwc ? x_in : x_in.contiguous();
  at::Tensor y = at::empty_like(x, nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  at::Tensor mean = at::empty({N, G}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({N, G}, x.options().dtype(at::kFloat));
  const auto f32 = [](const c10::optional<at::Tensor>& v) {
    return v ? v->to(at::kFloat).contiguous() : at::Tensor();
  };
  const at::Tensor w = f32(weight), b = f32(bias), te = f32(temb);
  if (N * G == 0) return {y, mean, rstd};
  const uint32_t D = static_cast<uint32_t>(C / G), count = D * static_cast<uint32_t>(HW);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_act_cuda", [&] {
    const GroupNormArgs<scalar_t> a{x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                    weight ? w.data_ptr<float>() : nullptr, bias ? b.data_ptr<float>() : nullptr,
                                    temb ? te.data_ptr<float>() : nullptr, mean.data_ptr<float>(),
                                    rstd.data_ptr<float>(), static_cast<uint32_t>(C), static_cast<uint32_t>(HW),
                                    static_cast<uint32_t>(G), D, count, nhwc, silu_act, static_cast<float>(eps)};
    if (count <= kOnePassMax) {
      group_norm_one_pass<scalar_t><<<static_cast<unsigned>(N * G), threads_for(count), 0, stream>>>(a);
    } else {
      // chunks: enough blocks for ~4 per SM, each chunk fits the registers, none under 2048 values
      const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
      const int64_t need = (count + kOnePassMax - 1) / kOnePassMax;
      const int64_t want = std::min<int64_t>((4 * sms + N * G - 1) / (N * G), (count + 2047) / 2048);
      const int64_t chunks = std::min<int64_t>(std::max(need, want), 65535);
      const uint32_t chunk = static_cast<uint32_t>((count + chunks - 1) / chunks);
      const dim3 grid(static_cast<unsigned>(N * G), static_cast<unsigned>((count + chunk - 1) / chunk));
      at::Tensor partials = at::empty({N * G * grid.y * 3}, x.options().dtype(at::kFloat));
      group_norm_chunk_stats<scalar_t><<<grid, threads_for(chunk), 0, stream>>>(a, chunk, partials.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      group_norm_chunk_apply<scalar_t><<<grid, threads_for(chunk), 0, stream>>>(a, chunk, partials.data_ptr<float>());
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, mean, rstd};
}

TORCH_LIBRARY_IMPL(fastddpm, CUDA, m) { m.impl("group_norm_act", &group_norm_act_cuda); }

}  // namespace fastddpm
