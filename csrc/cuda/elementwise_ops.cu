// CUDA kernels of the two elementwise ops, ddpm_step and q_sample, launched on the current stream.
// The per-element math and the Philox generator are the inline functions the CPU kernels use
// (elementwise.h). In-kernel noise reads (seed, offset) from device memory, so a CUDA graph replay
// draws fresh noise once the caller advances the offset on the device.
//
// Two launch shapes serve both ops (an op is a small struct: per-sample parameters, then apply):
// * rows: grid (chunks, B); each thread moves 4 consecutive values with one aligned vector access,
//   and reads its sample's timestep and coefficients once (no per-element index division). Used
//   when a sample's size is a multiple of 4, B <= 65535 and every pointer is 4-value aligned.
// * flat: a grid-stride loop over 4-value Philox blocks, per-element sample lookup (any shape).
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

// out = step(x, m, z) with the coefficient row of the sample's schedule index.
template <typename scalar_t>
struct StepOp {
  using acc_t = at::opmath_type<scalar_t>;
  struct Params {
    acc_t c[kStepColumns];
  };
  const scalar_t* __restrict__ x;
  const scalar_t* __restrict__ m;
  const scalar_t* __restrict__ z;  // null when drawn
  scalar_t* __restrict__ out;
  const float* __restrict__ coeffs;
  bool clip;
  float r;

  __device__ Params params(int64_t ts) const {
    Params p;
#pragma unroll
    for (int k = 0; k < kStepColumns; ++k) p.c[k] = coeffs[ts * kStepColumns + k];
    return p;
  }
  __device__ bool noisy(const Params& p) const { return p.c[kS] != acc_t(0); }
  __device__ acc_t value(acc_t xi, acc_t mi, acc_t zi, const Params& p) const {
    return ddpm_step_elem<acc_t>(xi, mi, zi, p.c, clip, static_cast<acc_t>(r));
  }
  __device__ void apply1(int64_t i, bool draw, float noise, const Params& p) const {
    out[i] = static_cast<scalar_t>(value(x[i], m[i], draw ? static_cast<acc_t>(noise) : acc_t(z[i]), p));
  }
  __device__ void apply4(int64_t i, bool draw, const float noise[4], const Params& p) const {
    const Vec4<scalar_t> xv = *reinterpret_cast<const Vec4<scalar_t>*>(x + i);
    const Vec4<scalar_t> mv = *reinterpret_cast<const Vec4<scalar_t>*>(m + i);
    Vec4<scalar_t> zv;
    if (!draw) zv = *reinterpret_cast<const Vec4<scalar_t>*>(z + i);
    Vec4<scalar_t> ov;
#pragma unroll
    for (int j = 0; j < 4; ++j)
      ov.v[j] = static_cast<scalar_t>(value(xv.v[j], mv.v[j], draw ? static_cast<acc_t>(noise[j]) : acc_t(zv.v[j]), p));
    *reinterpret_cast<Vec4<scalar_t>*>(out + i) = ov;
  }
};

// out = sqrt(abar) x0 + sqrt(1 - abar) z; a drawn z is written out too.
template <typename scalar_t>
struct NoisingOp {
  using acc_t = at::opmath_type<scalar_t>;
  struct Params {
    acc_t a, s;
  };
  const scalar_t* __restrict__ x0;
  scalar_t* __restrict__ z;
  scalar_t* __restrict__ out;
  const float* __restrict__ table;

  __device__ Params params(int64_t ts) const { return {table[2 * ts], table[2 * ts + 1]}; }
  __device__ bool noisy(const Params&) const { return true; }
  __device__ void apply1(int64_t i, bool draw, float noise, const Params& p) const {
    const acc_t zi = draw ? static_cast<acc_t>(noise) : static_cast<acc_t>(z[i]);
    if (draw) z[i] = static_cast<scalar_t>(zi);
    out[i] = static_cast<scalar_t>(q_sample_elem<acc_t>(x0[i], zi, p.a, p.s));
  }
  __device__ void apply4(int64_t i, bool draw, const float noise[4], const Params& p) const {
    const Vec4<scalar_t> xv = *reinterpret_cast<const Vec4<scalar_t>*>(x0 + i);
    Vec4<scalar_t> zv, ov;
    if (!draw) zv = *reinterpret_cast<const Vec4<scalar_t>*>(z + i);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const acc_t zj = draw ? static_cast<acc_t>(noise[j]) : static_cast<acc_t>(zv.v[j]);
      if (draw) zv.v[j] = static_cast<scalar_t>(zj);
      ov.v[j] = static_cast<scalar_t>(q_sample_elem<acc_t>(xv.v[j], zj, p.a, p.s));
    }
    if (draw) *reinterpret_cast<Vec4<scalar_t>*>(z + i) = zv;
    *reinterpret_cast<Vec4<scalar_t>*>(out + i) = ov;
  }
};

// t[n] clamped into [0, T): on the GPU t is trusted, not checked (reading it on the host would
// cost a sync), and an out-of-range value gives unspecified values, never a read outside the table
// or a device assert that would end the process's CUDA context (see fastddpm/ops/__init__.py).
__device__ __forceinline__ int64_t clamped_timestep(const int64_t* t, int64_t n, int64_t T) {
  const int64_t ts = t[n];
  return ts < 0 ? int64_t(0) : (ts < T ? ts : T - 1);
}

// Sample blockIdx.y, its 4-value blocks [0, per4) strided over blockIdx.x; with has_base, the Philox
// blocks of the draw start at rng[2] / 4 (see read_rng_state in checks.h).
template <bool kDraw, class Op>
__global__ void rows_kernel(Op op, const int64_t* __restrict__ t, int64_t T, const int64_t* __restrict__ rng,
                            bool has_base, int64_t per4) {
  const int64_t n = blockIdx.y;
  const auto p = op.params(clamped_timestep(t, n, T));
  const bool make_noise = kDraw && op.noisy(p);
  const uint64_t seed = kDraw ? static_cast<uint64_t>(rng[0]) : 0;
  const uint64_t offset = kDraw ? static_cast<uint64_t>(rng[1]) : 0;
  const int64_t base4 = kDraw && has_base ? rng[2] / 4 : 0;
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < per4; j += (int64_t)gridDim.x * blockDim.x) {
    const int64_t blk = n * per4 + j;
    float noise[4] = {0.f, 0.f, 0.f, 0.f};
    if (make_noise) normal4(static_cast<uint64_t>(base4 + blk), offset, seed, noise);
    op.apply4(blk * 4, kDraw, noise, p);
  }
}

// Any shape: element i's sample is i / per_sample.
template <bool kDraw, class Op>
__global__ void flat_kernel(Op op, const int64_t* __restrict__ t, int64_t T, const int64_t* __restrict__ rng,
                            bool has_base, int64_t numel, int64_t per_sample) {
  const int64_t blocks4 = (numel + 3) / 4;
  const uint64_t seed = kDraw ? static_cast<uint64_t>(rng[0]) : 0;
  const uint64_t offset = kDraw ? static_cast<uint64_t>(rng[1]) : 0;
  const int64_t base4 = kDraw && has_base ? rng[2] / 4 : 0;
  for (int64_t blk = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; blk < blocks4;
       blk += (int64_t)gridDim.x * blockDim.x) {
    float noise[4] = {0.f, 0.f, 0.f, 0.f};
    if (kDraw) normal4(static_cast<uint64_t>(base4 + blk), offset, seed, noise);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t i = blk * 4 + j;
      if (i >= numel) break;
      op.apply1(i, kDraw, noise[j], op.params(clamped_timestep(t, i / per_sample, T)));
    }
  }
}

// Launch `op` over numel values of B samples; `vec_ok`: every tensor it touches is 4-value aligned.
template <class Op>
void launch_elementwise(const Op& op, bool draw, const at::Tensor& t, int64_t T, const int64_t* rng,
                        bool has_base, int64_t numel, int64_t B, bool vec_ok) {
  if (numel == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t per = numel / B;
  const int64_t* tp = t.data_ptr<int64_t>();
  if (vec_ok && per % 4 == 0 && B <= 65535) {
    const dim3 grid(static_cast<unsigned>(blocks_for(per / 4, 65535)), static_cast<unsigned>(B));
    if (draw) rows_kernel<true><<<grid, kThreads, 0, stream>>>(op, tp, T, rng, has_base, per / 4);
    else rows_kernel<false><<<grid, kThreads, 0, stream>>>(op, tp, T, rng, has_base, per / 4);
  } else {
    const int grid = blocks_for((numel + 3) / 4);
    if (draw) flat_kernel<true><<<grid, kThreads, 0, stream>>>(op, tp, T, rng, has_base, numel, per);
    else flat_kernel<false><<<grid, kThreads, 0, stream>>>(op, tp, T, rng, has_base, numel, per);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool all_aligned(std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts)
    if (t->defined() && !aligned_for_vec4(*t)) return false;
  return true;
}

}  // namespace

// Writes the step into `out`, laid out densely like dense_like(x_in).
void ddpm_step_into_cuda(at::Tensor& out, const at::Tensor& x_in, const at::Tensor& m_in, const at::Tensor& t,
                         const at::Tensor& coeffs, const c10::optional<at::Tensor>& noise_in,
                         const c10::optional<at::Tensor>& rng_state, c10::optional<double> clip) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const StepInputs in = prepare_step(x_in, m_in, t, coeffs, noise_in, rng_state, clip);
  const at::Tensor &x = in.x, &m = in.m, &z = in.noise;
  const at::Tensor tc = t.contiguous();
  const int64_t* rng = in.draw ? rng_state->data_ptr<int64_t>() : nullptr;
  const bool vec_ok = all_aligned({&x, &m, &z, &out});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ddpm_step_cuda", [&] {
    const StepOp<scalar_t> op{x.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(),
                              in.draw ? nullptr : z.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                              coeffs.data_ptr<float>(), clip.has_value(), static_cast<float>(clip.value_or(0.0))};
    launch_elementwise(op, in.draw, tc, coeffs.size(0), rng, in.draw && rng_state->numel() == 3, x.numel(),
                       x.size(0), vec_ok);
  });
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
  const at::Tensor tc = t.contiguous();
  const int64_t* rng = draw ? rng_state->data_ptr<int64_t>() : nullptr;
  const bool vec_ok = all_aligned({&x0, &z, &out});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "q_sample_cuda", [&] {
    const NoisingOp<scalar_t> op{x0.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                 table.data_ptr<float>()};
    launch_elementwise(op, draw, tc, table.size(0), rng, draw && rng_state->numel() == 3, x0.numel(),
                       x0.size(0), vec_ok);
  });
  return {out, draw ? z : at::empty({0}, x0.options())};
}

TORCH_LIBRARY_IMPL(fastddpm, CUDA, m) {
  m.impl("q_sample", &q_sample_cuda);
  m.impl("ddpm_step", &ddpm_step_cuda);
  m.impl("ddpm_step_out", &ddpm_step_out_cuda);
}

}  // namespace fastddpm
