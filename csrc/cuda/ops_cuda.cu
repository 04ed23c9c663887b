// CUDA kernels of the three fused ops, launched on the current stream. The per-element math and
// the Philox generator are the same inline functions the CPU kernels use (elementwise.h).
// In-kernel noise reads (seed, offset) from device memory, so a CUDA graph replay draws fresh noise
// once the caller advances the offset on the device.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cassert>

#include "fastddpm/checks.h"
#include "fastddpm/elementwise.h"

namespace fastddpm {
namespace {

constexpr int kThreads = 256;

inline int blocks_for(int64_t work) {
  const int64_t max_blocks = 65535LL * 8;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, max_blocks)));
}

// Grid-stride loop over Philox blocks of 4 consecutive elements: f(i, z, ts) for every element i,
// with z its in-kernel normal (when kDraw) and ts the timestep of its sample.
template <bool kDraw, typename F>
__device__ __forceinline__ void for_each_element(int64_t numel, int64_t per_sample, const int64_t* __restrict__ t,
                                                 int64_t T, const int64_t* __restrict__ rng, F&& f) {
  const int64_t blocks4 = (numel + 3) / 4;
  const uint64_t seed = kDraw ? static_cast<uint64_t>(rng[0]) : 0;
  const uint64_t offset = kDraw ? static_cast<uint64_t>(rng[1]) : 0;
  for (int64_t blk = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; blk < blocks4;
       blk += (int64_t)gridDim.x * blockDim.x) {
    float noise[4] = {0.f, 0.f, 0.f, 0.f};
    if (kDraw) normal4(static_cast<uint64_t>(blk), offset, seed, noise);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t i = blk * 4 + j;
      if (i >= numel) break;
      const int64_t ts = t[i / per_sample];
      CUDA_KERNEL_ASSERT(ts >= 0 && ts < T && "t out of [0, T)");
      f(i, noise[j], ts);
    }
  }
}

template <typename scalar_t, bool kDraw>
__global__ void ddpm_step_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ m,
                                 const scalar_t* __restrict__ z, scalar_t* __restrict__ out,
                                 const int64_t* __restrict__ t, const float* __restrict__ coeffs,
                                 const int64_t* __restrict__ rng, int64_t numel, int64_t per_sample,
                                 int64_t T, bool clip, float r) {
  using acc_t = at::opmath_type<scalar_t>;
  for_each_element<kDraw>(numel, per_sample, t, T, rng, [&](int64_t i, float noise, int64_t ts) {
    acc_t c[kStepColumns];
#pragma unroll
    for (int k = 0; k < kStepColumns; ++k) c[k] = coeffs[ts * kStepColumns + k];
    const acc_t zi = kDraw ? static_cast<acc_t>(noise) : static_cast<acc_t>(z[i]);
    out[i] = static_cast<scalar_t>(ddpm_step_elem<acc_t>(x[i], m[i], zi, c, clip, static_cast<acc_t>(r)));
  });
}

template <typename scalar_t, bool kDraw>
__global__ void q_sample_kernel(const scalar_t* __restrict__ x0, scalar_t* __restrict__ z,
                                scalar_t* __restrict__ out, const int64_t* __restrict__ t,
                                const float* __restrict__ table, const int64_t* __restrict__ rng,
                                int64_t numel, int64_t per_sample, int64_t T) {
  using acc_t = at::opmath_type<scalar_t>;
  for_each_element<kDraw>(numel, per_sample, t, T, rng, [&](int64_t i, float noise, int64_t ts) {
    const acc_t zi = kDraw ? static_cast<acc_t>(noise) : static_cast<acc_t>(z[i]);
    if (kDraw) z[i] = static_cast<scalar_t>(zi);
    out[i] = static_cast<scalar_t>(q_sample_elem<acc_t>(x0[i], zi, table[2 * ts], table[2 * ts + 1]));
  });
}

template <typename T>
__device__ T block_sum(T v, T* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  T total = T(0);
  if (threadIdx.x < 32) {
    total = threadIdx.x < (blockDim.x >> 5) ? shared[threadIdx.x] : T(0);
    for (int o = 16; o > 0; o >>= 1) total += __shfl_down_sync(0xffffffffu, total, o);
    if (threadIdx.x == 0) shared[0] = total;
  }
  __syncthreads();
  total = shared[0];
  __syncthreads();
  return total;
}

// One thread block per (sample, group); two passes for the statistics (mean, then squared
// deviations, accumulated in acc_t), a third to write. Element (n, c, s) is at
// n*C*HW + c*cs + s*ss for NCHW (cs = HW, ss = 1) and NHWC (cs = 1, ss = C).
template <typename scalar_t>
__global__ void group_norm_act_kernel(const scalar_t* __restrict__ x, const float* __restrict__ w,
                                      const float* __restrict__ b, const float* __restrict__ temb,
                                      scalar_t* __restrict__ y, float* __restrict__ mean_out,
                                      float* __restrict__ rstd_out, int64_t C, int64_t HW, int64_t G,
                                      int64_t cs, int64_t ss, double eps, bool silu_act) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t shared[32];
  const int64_t ng = blockIdx.x, n = ng / G, D = C / G, c0 = (ng % G) * D, count = D * HW;
  const scalar_t* xb = x + n * C * HW;
  const float* tn = temb ? temb + n * C : nullptr;
  acc_t part = 0;
  for (int64_t k = threadIdx.x; k < count; k += blockDim.x) {
    const int64_t c = c0 + k / HW, s = k % HW;
    part += static_cast<acc_t>(xb[c * cs + s * ss]) + (tn ? tn[c] : acc_t(0));
  }
  const acc_t mu = block_sum(part, shared) / static_cast<acc_t>(count);
  part = 0;
  for (int64_t k = threadIdx.x; k < count; k += blockDim.x) {
    const int64_t c = c0 + k / HW, s = k % HW;
    const acc_t d = static_cast<acc_t>(xb[c * cs + s * ss]) + (tn ? tn[c] : acc_t(0)) - mu;
    part += d * d;
  }
  const acc_t var = block_sum(part, shared) / static_cast<acc_t>(count);
  const acc_t inv = acc_t(1) / sqrt(var + static_cast<acc_t>(eps));
  if (threadIdx.x == 0) {
    mean_out[ng] = static_cast<float>(mu);
    rstd_out[ng] = static_cast<float>(inv);
  }
  scalar_t* yb = y + n * C * HW;
  for (int64_t k = threadIdx.x; k < count; k += blockDim.x) {
    const int64_t c = c0 + k / HW, s = k % HW;
    const acc_t wc = w ? w[c] : acc_t(1);
    acc_t v = (static_cast<acc_t>(xb[c * cs + s * ss]) + (tn ? tn[c] : acc_t(0)) - mu) * inv * wc +
              (b ? b[c] : acc_t(0));
    if (silu_act) v = silu(v);
    yb[c * cs + s * ss] = static_cast<scalar_t>(v);
  }
}

}  // namespace

// Writes the step into `out`, laid out densely like dense_like(x_in).
void ddpm_step_into_cuda(at::Tensor& out, const at::Tensor& x_in, const at::Tensor& m_in, const at::Tensor& t,
                         const at::Tensor& coeffs, const c10::optional<at::Tensor>& noise_in,
                         const c10::optional<at::Tensor>& rng_state, c10::optional<double> clip) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const StepInputs in = prepare_step(x_in, m_in, t, coeffs, noise_in, rng_state, clip);
  const at::Tensor &x = in.x, &m = in.m, &z = in.noise;
  const bool draw = in.draw;
  const int64_t numel = x.numel(), per = numel / x.size(0);
  const at::Tensor tc = t.contiguous();
  const int64_t* rng = draw ? rng_state->data_ptr<int64_t>() : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ddpm_step_cuda", [&] {
    const int grid = blocks_for((numel + 3) / 4);
    const float r = static_cast<float>(clip.value_or(0.0));
    if (draw)
      ddpm_step_kernel<scalar_t, true><<<grid, kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(), nullptr, out.data_ptr<scalar_t>(),
          tc.data_ptr<int64_t>(), coeffs.data_ptr<float>(), rng, numel, per, coeffs.size(0), clip.has_value(), r);
    else
      ddpm_step_kernel<scalar_t, false><<<grid, kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
          tc.data_ptr<int64_t>(), coeffs.data_ptr<float>(), nullptr, numel, per, coeffs.size(0), clip.has_value(), r);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor ddpm_step_cuda(const at::Tensor& x, const at::Tensor& m, const at::Tensor& t, const at::Tensor& coeffs,
                          const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& rng_state,
                          c10::optional<double> clip) {
  at::Tensor out = at::empty_like(dense_like(x, x));
  ddpm_step_into_cuda(out, x, m, t, coeffs, noise, rng_state, clip);
  return out;
}

void ddpm_step_out_cuda(const at::Tensor& x, const at::Tensor& m, const at::Tensor& t, const at::Tensor& coeffs,
                        const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& rng_state,
                        c10::optional<double> clip, at::Tensor out) {
  check_step_out(out, x);
  ddpm_step_into_cuda(out, x, m, t, coeffs, noise, rng_state, clip);
}

std::tuple<at::Tensor, at::Tensor> q_sample_cuda(const at::Tensor& x0_in, const at::Tensor& t,
                                                 const at::Tensor& table,
                                                 const c10::optional<at::Tensor>& noise_in,
                                                 const c10::optional<at::Tensor>& rng_state) {
  check_timesteps(t, x0_in, table, "table", 2);
  check_noise_source(x0_in, noise_in, rng_state);
  const c10::cuda::CUDAGuard guard(x0_in.device());
  const at::Tensor x0 = dense_like(x0_in, x0_in);
  const bool draw = !noise_in.has_value();
  at::Tensor z = draw ? at::empty_like(x0) : dense_like(*noise_in, x0);
  at::Tensor out = at::empty_like(x0);
  const int64_t numel = x0.numel(), per = numel / x0.size(0);
  const at::Tensor tc = t.contiguous();
  const int64_t* rng = draw ? rng_state->data_ptr<int64_t>() : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "q_sample_cuda", [&] {
    const int grid = blocks_for((numel + 3) / 4);
    if (draw)
      q_sample_kernel<scalar_t, true><<<grid, kThreads, 0, stream>>>(
          x0.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), tc.data_ptr<int64_t>(),
          table.data_ptr<float>(), rng, numel, per, table.size(0));
    else
      q_sample_kernel<scalar_t, false><<<grid, kThreads, 0, stream>>>(
          x0.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), tc.data_ptr<int64_t>(),
          table.data_ptr<float>(), nullptr, numel, per, table.size(0));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, draw ? z : at::empty({0}, x0.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_cuda(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    int64_t groups, double eps, const c10::optional<at::Tensor>& temb, bool silu_act) {
  check_group_norm_args(x_in, weight, bias, groups, temb);
  TORCH_CHECK(x_in.scalar_type() != at::kDouble, "x: float64 is not supported on CUDA; use float32, float16 or bfloat16");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t N = x_in.size(0), C = x_in.size(1), G = groups;
  const int64_t HW = x_in.numel() / std::max<int64_t>(N * C, 1);
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
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_act_cuda", [&] {
    group_norm_act_kernel<scalar_t><<<static_cast<unsigned>(N * G), 512, 0, stream>>>(
        x.data_ptr<scalar_t>(), weight ? w.data_ptr<float>() : nullptr, bias ? b.data_ptr<float>() : nullptr,
        temb ? te.data_ptr<float>() : nullptr, y.data_ptr<scalar_t>(), mean.data_ptr<float>(),
        rstd.data_ptr<float>(), C, HW, G, nhwc ? 1 : HW, nhwc ? C : 1, eps, silu_act);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, mean, rstd};
}

TORCH_LIBRARY_IMPL(fastddpm, CUDA, m) {
  m.impl("q_sample", &q_sample_cuda);
  m.impl("ddpm_step", &ddpm_step_cuda);
  m.impl("ddpm_step_out", &ddpm_step_out_cuda);
  m.impl("group_norm_act", &group_norm_act_cuda);
}

}  // namespace fastddpm
