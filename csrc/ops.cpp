// The schemas of the three fused ops (one place) and the Python module stub that loads them.
// Implementations register per device in cpu/ and cuda/ (the CPU-only winograd_conv3x3 and
// cpu_memory_pool ops declare their own schemas beside their kernels); the Python side is
// fastddpm/ops/: native.py loads this library, fakes.py and autograd.py register the fake kernels
// and backward formulas.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import fastddpm._C` loads this library, which runs the TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastddpm, m) {
  // (x_t, noise); noise is empty when given as input. rng_state = int64 [seed, offset].
  m.def("q_sample(Tensor x0, Tensor t, Tensor table, Tensor? noise, Tensor? rng_state) -> (Tensor, Tensor)");
  m.def("ddpm_step(Tensor x, Tensor model_out, Tensor t, Tensor coeffs, Tensor? noise, "
        "Tensor? rng_state, float? clip) -> Tensor");
  // The same step written into a preallocated `out` (laid out like x): no allocation per step.
  m.def("ddpm_step_out(Tensor x, Tensor model_out, Tensor t, Tensor coeffs, Tensor? noise, "
        "Tensor? rng_state, float? clip, Tensor(a!) out) -> ()");
  // (y, mean, rstd); mean and rstd are [B, groups], saved for the backward.
  m.def("group_norm_act(Tensor x, Tensor? weight, Tensor? bias, int groups, float eps, Tensor? temb, "
        "bool silu) -> (Tensor, Tensor, Tensor)");
  // Its gradients (x, weight, bias, temb) from the saved mean and rstd; a gradient whose input is
  // None comes back as an empty tensor. CPU kernel only (CUDA keeps the formula of autograd.py).
  m.def("group_norm_act_backward(Tensor grad, Tensor x, Tensor? weight, Tensor? bias, Tensor? temb, "
        "Tensor mean, Tensor rstd, int groups, bool silu) -> (Tensor, Tensor, Tensor, Tensor)");
}
