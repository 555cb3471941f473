// Sums without atomics, deterministic: a fixed shuffle tree within a block, and per-block
// partial sums that a second kernel adds in a fixed order.
#pragma once
#include "launch_bounds.cuh"  // kThreads

namespace rezero::cuda {

// The sum of v over a 1-D block of kThreads threads, valid in thread 0.  Fixed shuffle tree,
// then the warp sums in warp order: deterministic.
template <class M>
__device__ __forceinline__ M block_sum(M v) {
  __shared__ M warp_sums[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = M(0);
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_sums[lane] : M(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;
}

// out[k] = sum over b < count of partials[b * len + k], for k < len: one warp per k, lane l
// adds b = l, l + 32, ... in order, then a fixed shuffle tree.
template <class M>
__global__ void __launch_bounds__(kThreads)
sum_partials_kernel(const M* __restrict__ partials, int64_t count, int64_t len,
                    M* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  if (k >= len) return;  // whole warps leave together
  M s = M(0);
  for (int64_t b = lane; b < count; b += 32) s += partials[b * len + k];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
  if (lane == 0) out[k] = s;
}

}  // namespace rezero::cuda
