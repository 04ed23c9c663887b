// Hot arithmetic-heavy CPU loops are compiled for AVX-512, AVX2 and the baseline, and the best
// clone for the running CPU is picked at load time (the extension itself targets baseline x86-64);
// hand-vectorized code picks its ISA with the queries below.
#pragma once

#define FDDPM_ISA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

namespace fastddpm {

// AVX2 and FMA together (every AVX2 CPU we know of has both; the kernels use both)
inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

inline bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

}  // namespace fastddpm
