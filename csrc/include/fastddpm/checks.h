// Argument checks shared by the CPU and CUDA implementations: every error names the argument,
// what was expected and what was received. They raise ValueError in Python (TORCH_CHECK_VALUE,
// a c10::ValueError), the class fastddpm.ops's own checks raise for the same argument.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <utility>

#include "fastddpm/elementwise.h"

namespace fastddpm {

// The dtypes the kernels are dispatched for (float8 types are floating point too, but not among them).
inline void check_floating(const at::Tensor& x, const char* name) {
  const auto st = x.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, name,
                    ": expected a floating-point tensor (float16, bfloat16, float32 or float64), got ", st);
}

inline void check_same_shape(const at::Tensor& y, const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(y.sizes() == x.sizes(), name, ": expected shape ", x.sizes(), ", got ", y.sizes());
  TORCH_CHECK_VALUE(y.device() == x.device(), name, ": expected device ", x.device(), ", got ", y.device());
  TORCH_CHECK_VALUE(y.scalar_type() == x.scalar_type(), name, ": expected dtype ", x.scalar_type(),
                    ", got ", y.scalar_type());
}

// t: int64 [B] on x's device with values in [0, T); table: float32 [T, cols] on x's device.
inline void check_timesteps(const at::Tensor& t, const at::Tensor& x, const at::Tensor& table,
                            const char* table_name, int64_t cols) {
  check_floating(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(0) >= 1, "x: expected a non-empty batch [B, ...], got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == x.size(0),
                    "t: expected an int64 tensor of shape [", x.size(0), "], got ", t.scalar_type(), " ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.device() == x.device(), "t: expected device ", x.device(), ", got ", t.device());
  TORCH_CHECK_VALUE(table.scalar_type() == at::kFloat && table.dim() == 2 && table.size(0) >= 1 &&
                        table.size(1) == cols && table.is_contiguous(),
                    table_name, ": expected a contiguous float32 [T, ", cols, "] table with T >= 1, got ",
                    table.scalar_type(), " ", table.sizes());
  TORCH_CHECK_VALUE(table.device() == x.device(), table_name, ": expected device ", x.device(), ", got ",
                    table.device());
  if (t.device().is_cpu()) {
    const int64_t T = table.size(0);
    const at::Tensor t_dense = t.contiguous();  // keep it alive while reading through the pointer
    const int64_t* tp = t_dense.data_ptr<int64_t>();
    for (int64_t i = 0; i < t.numel(); ++i)
      TORCH_CHECK_VALUE(tp[i] >= 0 && tp[i] < T, "t: expected timesteps in [0, ", T, "), got ", tp[i],
                        " at index ", i);
  }
}

// Either an explicit noise tensor like x, or an int64 [2] (seed, offset) rng_state on x's device.
inline void check_noise_source(const at::Tensor& x, const c10::optional<at::Tensor>& noise,
                               const c10::optional<at::Tensor>& rng_state) {
  if (noise.has_value()) {
    check_same_shape(*noise, x, "noise");
    return;
  }
  TORCH_CHECK_VALUE(rng_state.has_value(), "rng_state: required (int64 [seed, offset]) when noise is None");
  TORCH_CHECK_VALUE(rng_state->scalar_type() == at::kLong && (rng_state->numel() == 2 || rng_state->numel() == 3),
                    "rng_state: expected an int64 tensor [seed, offset] or [seed, offset, base], got ",
                    rng_state->scalar_type(), " ", rng_state->sizes());
  TORCH_CHECK_VALUE(rng_state->device() == x.device(), "rng_state: expected device ", x.device(), ", got ",
                    rng_state->device());
}

// The stream a kernel draws: element i of the tensor is number base + i of stream (seed, offset).
// base (0 when rng_state has 2 elements) is where a batch starts in a longer run's stream, so a
// sample's noise does not depend on the batch it is drawn in (per-image seeds; a multiple of 4,
// which fastddpm.ops.PhiloxState checks, so Philox blocks stay whole on the GPU).
struct RngStream {
  uint64_t seed, offset;
  int64_t base;
};

// The stream of a CPU rng_state, or (0, 0, 0) when there is none.
inline RngStream read_rng_state(const c10::optional<at::Tensor>& rng_state) {
  if (!rng_state.has_value() || !rng_state->device().is_cpu()) return {0, 0, 0};
  const at::Tensor s = rng_state->contiguous();
  const int64_t* p = s.data_ptr<int64_t>();
  return {static_cast<uint64_t>(p[0]), static_cast<uint64_t>(p[1]), s.numel() == 3 ? p[2] : 0};
}

inline void check_clip(c10::optional<double> clip) {
  TORCH_CHECK_VALUE(!clip.has_value() || *clip > 0, "clip: expected None or a positive float, got ", *clip);
}

// y laid out densely like ref (contiguous or channels_last), so both can be walked in one loop.
inline at::Tensor dense_like(const at::Tensor& y, const at::Tensor& ref) {
  if (ref.dim() == 4 && !ref.is_contiguous() && ref.is_contiguous(at::MemoryFormat::ChannelsLast))
    return y.contiguous(at::MemoryFormat::ChannelsLast);
  return y.contiguous();
}

// The checked, densely laid out inputs of a ddpm_step (shared by the CPU and CUDA entry points).
struct StepInputs {
  at::Tensor x, m, noise;  // noise is undefined when it is drawn in-kernel
  bool draw;
};

inline StepInputs prepare_step(const at::Tensor& x_in, const at::Tensor& m_in, const at::Tensor& t,
                               const at::Tensor& coeffs, const c10::optional<at::Tensor>& noise_in,
                               const c10::optional<at::Tensor>& rng_state, c10::optional<double> clip) {
  check_timesteps(t, x_in, coeffs, "coeffs", kStepColumns);
  check_same_shape(m_in, x_in, "model_out");
  check_noise_source(x_in, noise_in, rng_state);
  check_clip(clip);
  StepInputs in;
  in.x = dense_like(x_in, x_in);
  in.m = dense_like(m_in, in.x);
  in.draw = !noise_in.has_value();
  in.noise = in.draw ? at::Tensor() : dense_like(*noise_in, in.x);
  return in;
}

// `out` of ddpm_step_out: x's shape and dtype, in the dense layout the kernels write.
inline void check_step_out(const at::Tensor& out, const at::Tensor& x) {
  check_same_shape(out, x, "out");
  TORCH_CHECK_VALUE(out.strides() == dense_like(x, x).strides(),
                    "out: expected the dense layout of x (contiguous, or channels_last when x is), got strides ",
                    out.strides());
}

inline void check_group_norm_args(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                  const c10::optional<at::Tensor>& bias, int64_t groups, double eps,
                                  const c10::optional<at::Tensor>& temb) {
  check_floating(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 3, "x: expected [B, C, ...] with at least 3 dims, got shape ", x.sizes());
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(groups >= 1 && C % groups == 0, "groups: expected a positive divisor of C=", C, ", got ",
                    groups);
  TORCH_CHECK_VALUE(x.numel() == 0 || x.numel() / (x.size(0) * groups) > 1,
                    "groups: each group must hold more than one value; ", groups, " groups of x ", x.sizes(),
                    " hold ", x.numel() / (x.size(0) * groups));
  // eps <= 0 divides a constant group by zero (NaN out); a NaN or infinite eps is no epsilon either
  TORCH_CHECK_VALUE(eps > 0 && std::isfinite(eps), "eps: expected a finite float > 0, got ", eps);
  for (const auto& [p, name] : {std::make_pair(&weight, "weight"), std::make_pair(&bias, "bias")}) {
    if (!p->has_value()) continue;
    const at::Tensor& v = **p;
    check_floating(v, name);
    TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == C, name, ": expected shape [", C, "], got ", v.sizes());
    TORCH_CHECK_VALUE(v.device() == x.device(), name, ": expected device ", x.device(), ", got ", v.device());
  }
  if (temb.has_value()) {
    check_floating(*temb, "temb");
    TORCH_CHECK_VALUE(temb->dim() == 2 && temb->size(0) == x.size(0) && temb->size(1) == C,
                      "temb: expected shape [", x.size(0), ", ", C, "], got ", temb->sizes());
    TORCH_CHECK_VALUE(temb->device() == x.device(), "temb: expected device ", x.device(), ", got ",
                      temb->device());
  }
}

}  // namespace fastddpm
