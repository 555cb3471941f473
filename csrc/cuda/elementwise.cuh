// The two generic kernels that every op instantiates with a small elementwise policy
// (residual.cu, bias_act_dropout.cu); launch.cuh launches them:
//
//  * flat_kernel walks the n elements in chunks of kChunk (a multiple of 4, one or two 128-bit
//    vectors), grid-stride.  It serves the forward ops and the backward whose reduction is a
//    single scalar (per-block partial sums, added in block order by sum_partials_kernel).
//  * column_kernel walks (rows, C) in tiles: a thread owns kChunk adjacent columns and strides
//    over rows, accumulating its columns' sums in registers; the block adds its rows of threads
//    in shared memory in a fixed order and writes one partial row per blockIdx.y, which
//    sum_partials_kernel adds in a fixed order.  It serves the per-channel reductions
//    (grad_alpha per channel, grad_bias).
//
// A policy is a struct with
//   static constexpr bool kTwoInputs;      // whether the second data input v is read
//   static constexpr int kFloat64Blocks;   // blocks per SM it can afford in float64 (registers)
//   template <bool kDropout, class M>
//   static __device__ M apply(M u, M v, M c, M m, M& contrib);
// where u, v are the data inputs at element i, c the channel vector (alpha / bias) at i's column
// (or its single element; 0 when the vector pointer is nullptr: no bias), m the dropout scale of
// element i (1/(1-p) kept, 0 dropped; only meaningful when kDropout); it returns the output at i
// and sets contrib, i's term of the sum.
//
// Determinism: the launch geometry depends only on (n, C, dtype, dropout on or off, SM count of
// the device), every partial is written by one block, and both reduction stages add in a fixed
// order, so the gradients of alpha / bias are bitwise reproducible on a given device.  No
// atomics.
#pragma once
#include <cstdint>

#include "dropout.cuh"
#include "launch_bounds.cuh"
#include "reductions.cuh"
#include "types.cuh"
#include "vector_io.cuh"

namespace rezero::cuda {

// out[i] = Op(u[i], v[i], vec[col(i)] or vec[0], m[i]); with kReduce, partials[blockIdx.x] =
// this block's sum of contrib.  kVec: out, u, v are 16-byte aligned (full chunks use vectors).
template <class T, class Op, bool kVec, bool kPerChannel, bool kDropout, bool kReduce>
__global__ void __launch_bounds__(kThreads, (min_blocks_per_sm<T, Op, kDropout, false>()))
flat_kernel(T* __restrict__ out, math_t<T>* __restrict__ partials, const T* __restrict__ u,
            const T* __restrict__ v, const math_t<T>* __restrict__ vec, int64_t n, int64_t C,
            DropoutArgs d) {
  using M = math_t<T>;
  constexpr int N = kChunk<T>;
  const int64_t chunks = (n + N - 1) / N;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  PhiloxKey key{};
  if constexpr (kDropout) key = load_philox_key(d);
  const M scale = static_cast<M>(d.scale);
  const M c_scalar = kPerChannel || vec == nullptr ? M(0) : vec[0];  // nullptr: no vector
  // column of this thread's chunk start, advanced by (stride * N) mod C per step (no division
  // in the loop)
  int64_t col = 0, col_step = 0;
  if constexpr (kPerChannel) {
    col = (first * N) % C;
    col_step = (stride * N) % C;
  }
  M acc = M(0);
  for (int64_t k = first; k < chunks; k += stride) {
    const int64_t i0 = k * N;
    const int valid = n - i0 < N ? static_cast<int>(n - i0) : N;
    const bool vector = kVec && valid == N;
    M uu[N], vv[N];
    load_chunk<N>(u + i0, uu, valid, vector);
    if constexpr (Op::kTwoInputs) load_chunk<N>(v + i0, vv, valid, vector);
    uint32_t bits = 0;
    if constexpr (kDropout) bits = keep_bits<N, true>(static_cast<uint64_t>(i0), key);
    M o[N];
    int64_t c = col;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const M cv = kPerChannel ? vec[c] : c_scalar;
      const M m = ((bits >> j) & 1u) ? scale : M(0);
      M contrib = M(0);
      o[j] = Op::template apply<kDropout>(uu[j], Op::kTwoInputs ? vv[j] : M(0), cv, m, contrib);
      if (kReduce && j < valid) acc += contrib;
      if constexpr (kPerChannel) c = c + 1 == C ? 0 : c + 1;
    }
    store_chunk<N>(out + i0, o, valid, vector);
    if constexpr (kPerChannel) {
      col += col_step;
      if (col >= C) col -= C;
    }
  }
  if constexpr (kReduce) {
    const M total = block_sum(acc);
    if (threadIdx.x == 0) partials[blockIdx.x] = total;
  }
}

// Data (rows, C); block (TX, TY) with TX * TY == kThreads; thread x of block bx owns columns
// [(bx * TX + x) * N, + N) and rows y + TY * (by + gridDim.y * t).  Writes out[i] as
// flat_kernel does and partials[by * C + col] = the block's column sums of contrib.
// kVec: C % N == 0 and out, u, v 16-byte aligned (so every chunk is an aligned vector and
// starts at a multiple of 4 elements).
template <class T, class Op, bool kVec, bool kDropout>
__global__ void __launch_bounds__(kThreads, (min_blocks_per_sm<T, Op, kDropout, true>()))
column_kernel(T* __restrict__ out, math_t<T>* __restrict__ partials, const T* __restrict__ u,
              const T* __restrict__ v, const math_t<T>* __restrict__ vec, int64_t rows,
              int64_t C, DropoutArgs d) {
  using M = math_t<T>;
  constexpr int N = kChunk<T>;
  __shared__ M red[kThreads * N];
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * TX + tx) * N;
  const int valid = c0 >= C ? 0 : (C - c0 < N ? static_cast<int>(C - c0) : N);
  M cv[N], acc[N];
#pragma unroll
  for (int j = 0; j < N; ++j) {
    cv[j] = j < valid && vec != nullptr ? vec[c0 + j] : M(0);  // nullptr: no vector
    acc[j] = M(0);
  }
  if (valid > 0) {
    PhiloxKey key{};
    if constexpr (kDropout) key = load_philox_key(d);
    const M scale = static_cast<M>(d.scale);
    const int64_t row_stride = static_cast<int64_t>(gridDim.y) * TY;
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * TY + ty; r < rows; r += row_stride) {
      const int64_t i0 = r * C + c0;
      M uu[N], vv[N];
      load_chunk<N>(u + i0, uu, valid, kVec);
      if constexpr (Op::kTwoInputs) load_chunk<N>(v + i0, vv, valid, kVec);
      uint32_t bits = 0;
      if constexpr (kDropout) bits = keep_bits<N, kVec>(static_cast<uint64_t>(i0), key);
      M o[N];
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const M m = ((bits >> j) & 1u) ? scale : M(0);
        M contrib = M(0);
        o[j] = Op::template apply<kDropout>(uu[j], Op::kTwoInputs ? vv[j] : M(0), cv[j], m,
                                            contrib);
        if (j < valid) acc[j] += contrib;
      }
      store_chunk<N>(out + i0, o, valid, kVec);
    }
  }
  // add the TY threads of each column in row order: red[y][x * N + j]
  const int tid = ty * TX + tx;
#pragma unroll
  for (int j = 0; j < N; ++j) red[tid * N + j] = acc[j];
  __syncthreads();
  const int width = TX * N;
  for (int q = tid; q < width; q += kThreads) {
    M s = M(0);
    for (int y = 0; y < TY; ++y) s += red[y * width + q];
    const int64_t col = static_cast<int64_t>(blockIdx.x) * width + q;
    if (col < C) partials[static_cast<int64_t>(blockIdx.y) * C + col] = s;
  }
}

}  // namespace rezero::cuda
