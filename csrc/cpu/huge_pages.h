// Outputs of the CPU ops backed by transparent huge pages when they are large.
#pragma once

#include <ATen/ATen.h>

namespace fastddpm {

// An uninitialized tensor with x's sizes, strides (x must be dense) and dtype. Blocks of at least
// 8 MiB are 2 MiB-aligned and marked MADV_HUGEPAGE while c10's default CPU allocator is in use;
// otherwise (smaller blocks, or another CPU allocator installed, such as ops.cpu_memory_pool)
// the current CPU allocator serves it, as at::empty_like would.
at::Tensor empty_output_like(const at::Tensor& x);

}  // namespace fastddpm
