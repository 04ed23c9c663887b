// Hot arithmetic-heavy CPU loops are compiled for AVX-512, AVX2 and the baseline, and the best
// clone for the running CPU is picked at load time (the extension itself targets baseline x86-64).
#pragma once

#define FDDPM_ISA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
