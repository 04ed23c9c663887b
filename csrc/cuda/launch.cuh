// Launch helpers shared by the CUDA kernels: block sizes, grid sizing, 4-wide vector access and a
// block-wide sum.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

namespace fastddpm {

constexpr int kThreads = 256;

// Blocks for `work` items at one item per thread, capped (the kernels grid-stride past the cap).
inline int blocks_for(int64_t work, int64_t cap = 65535LL * 8) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, cap)));
}

// Four consecutive values moved as one aligned access (16 bytes for float, 8 for half/bfloat16).
template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

inline bool aligned_for_vec4(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % (4 * t.element_size()) == 0;
}

// Sum of v over the block; every thread gets the total. `shared` holds >= 32 values.
template <typename T>
__device__ T block_sum(T v, T* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    T total = threadIdx.x < (blockDim.x >> 5) ? shared[threadIdx.x] : T(0);
    for (int o = 16; o > 0; o >>= 1) total += __shfl_down_sync(0xffffffffu, total, o);
    if (threadIdx.x == 0) shared[0] = total;
  }
  __syncthreads();
  const T total = shared[0];
  __syncthreads();
  return total;
}

}  // namespace fastddpm
