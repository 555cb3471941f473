// The machinery shared by the CUDA kernels: math types, 128-bit vector access, the in-kernel
// Philox dropout rule of ../philox.h, and two generic kernels that every op instantiates with a
// small elementwise policy (residual.cu, bias_act_dropout.cu):
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
// (or its single element), m the dropout scale of element i (1/(1-p) kept, 0 dropped; only
// meaningful when kDropout); it returns the output at i and sets contrib, i's term of the sum.
//
// Determinism: the launch geometry depends only on (n, C, dtype, dropout on or off, SM count of
// the device), every partial is written by one block, and both reduction stages add in a fixed
// order, so the gradients of alpha / bias are bitwise reproducible on a given device.  No
// atomics.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "../philox.h"
#include "launchers.h"

namespace rezero::cuda {

constexpr int kThreads = 256;        // threads per block, every kernel here
constexpr int kMinBlocksPerSM = 4;   // __launch_bounds__ guarantee; the grid is one wave of these

// The blocks per SM a kernel's __launch_bounds__ asks for, which caps its registers at
// 65536 / (kThreads * blocks): 4 blocks leave 64 registers, enough for most instantiations.
// float64 maths (two registers a value; erf and exp in double) and the column kernel's 16-bit
// dropout path (8 elements, up to three Philox calls per chunk) spill at 64: float64 gets the
// policy's kFloat64Blocks (2: 128 registers; gelu's derivative, 1), the 16-bit column dropout
// path 2.  The launch geometry uses the same number; tests/test_cuda_compile.py fails on any
// spill.
template <class T, class Op, bool kDropout, bool kColumns>
constexpr int min_blocks_per_sm() {
  if (std::is_same_v<T, double>) return Op::kFloat64Blocks;
  if (kColumns && kDropout && sizeof(T) == 2) return 2;
  return kMinBlocksPerSM;
}

// ---------------------------------------------------------------- types and conversions

template <class T> struct MathOf { using type = float; };
template <> struct MathOf<double> { using type = double; };
template <class T> using math_t = typename MathOf<T>::type;

__device__ __forceinline__ float to_math(float v) { return v; }
__device__ __forceinline__ double to_math(double v) { return v; }
__device__ __forceinline__ float to_math(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_math(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T> __device__ __forceinline__ T from_math(math_t<T> v);
template <> __device__ __forceinline__ float from_math<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_math<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_math<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_math<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Elements per thread per step: one 128-bit vector, but at least 4 (one Philox call's worth),
// so double takes two vectors.
template <class T> constexpr int kChunk = 16 / sizeof(T) < 4 ? 4 : static_cast<int>(16 / sizeof(T));

template <class T, int N> struct alignas(16) Pack { T v[N]; };

// out[j] = p[j] for j < valid (0 beyond).  vector: p is 16-byte aligned and valid == N.
template <int N, class T>
__device__ __forceinline__ void load_chunk(const T* __restrict__ p, math_t<T> (&out)[N],
                                           int valid, bool vector) {
  static_assert(N * sizeof(T) % 16 == 0, "a chunk is whole 128-bit vectors");
  if (vector) {
    const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = to_math(pk.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = j < valid ? to_math(p[j]) : math_t<T>(0);
  }
}

template <int N, class T>
__device__ __forceinline__ void store_chunk(T* __restrict__ p, const math_t<T> (&in)[N],
                                            int valid, bool vector) {
  if (vector) {
    Pack<T, N> pk;
#pragma unroll
    for (int j = 0; j < N; ++j) pk.v[j] = from_math<T>(in[j]);
    *reinterpret_cast<Pack<T, N>*>(p) = pk;
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (j < valid) p[j] = from_math<T>(in[j]);
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ---------------------------------------------------------------- dropout

// What the kernels get from the host: the seed stays in device memory.
struct DropoutArgs {
  const int64_t* seed;   // [key, counter_base]; read only when dropout is on
  uint32_t threshold;    // keep iff the Philox word < threshold
  double scale;          // 1 / (1 - p)
};

inline DropoutArgs make_dropout_args(const DropoutParams& p) {
  DropoutArgs d{p.seed, 0xFFFFFFFFu, 1.0};
  if (p.p > 0.0) {
    d.threshold = rezero::dropout_threshold(p.p);
    d.scale = 1.0 / (1.0 - p.p);
  }
  return d;
}

// The generator state a thread needs, read from the seed once per thread.
struct PhiloxKey {
  uint32_t key[2];
  uint32_t base_lo, base_hi;
  uint32_t threshold;
};

__device__ __forceinline__ PhiloxKey load_philox_key(const DropoutArgs& d) {
  const uint64_t key = static_cast<uint64_t>(d.seed[0]);
  const uint64_t base = static_cast<uint64_t>(d.seed[1]);
  PhiloxKey k;
  k.key[0] = static_cast<uint32_t>(key);
  k.key[1] = static_cast<uint32_t>(key >> 32);
  k.base_lo = static_cast<uint32_t>(base);
  k.base_hi = static_cast<uint32_t>(base >> 32);
  k.threshold = d.threshold;
  return k;
}

// Bit j (j < N) of the result: is element i0 + j kept?  One Philox4x32-10 call per group of
// four elements (group g = element / 4 is the counter, word element % 4 decides), exactly the
// rule of rezero::dropout_keep.  kAligned4: i0 % 4 == 0 is known, so N / 4 calls suffice.
template <int N, bool kAligned4>
__host__ __device__ __forceinline__ uint32_t keep_bits(uint64_t i0, const PhiloxKey& k) {
  static_assert(N % 4 == 0 && N <= 16, "chunks are whole Philox groups");
  constexpr int kGroups = kAligned4 ? N / 4 : N / 4 + 1;
  const uint64_t g0 = i0 >> 2;
  const int off = kAligned4 ? 0 : static_cast<int>(i0 & 3);
  uint32_t bits = 0;
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
    if (kAligned4 || g < N / 4 || off != 0) {
      const uint64_t c = g0 + g;
      uint32_t ctr[4] = {static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32), k.base_lo,
                         k.base_hi};
      rezero::philox4x32_10(ctr, k.key);
#pragma unroll
      for (int w = 0; w < 4; ++w)
        bits |= static_cast<uint32_t>(ctr[w] < k.threshold) << (4 * g + w);
    }
  }
  return bits >> off;
}

// ---------------------------------------------------------------- reductions

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

// ---------------------------------------------------------------- the generic kernels

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
  const M c_scalar = kPerChannel ? M(0) : vec[0];
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
    cv[j] = j < valid ? vec[c0 + j] : M(0);
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

// ---------------------------------------------------------------- host side

// Multiprocessor count of `device`, cached (1 if the query fails: the launcher's
// cudaGetLastError then reports the failure).
inline int sm_count(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];
  if (device >= 0 && device < kMaxDevices) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int count = 0;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      count <= 0)
    return 1;
  if (device >= 0 && device < kMaxDevices) cache[device].store(count, std::memory_order_relaxed);
  return count;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks of flat_kernel: enough for every chunk, at most one wave of `min_blocks` per SM (the
// kernel's min_blocks_per_sm; the default, the largest, bounds the workspace).
inline int flat_blocks(int64_t n, int chunk, int device, int min_blocks = kMinBlocksPerSM) {
  const int64_t need = ceil_div(ceil_div(n, chunk), kThreads);
  const int64_t cap = static_cast<int64_t>(sm_count(device)) * min_blocks;
  return static_cast<int>(need < cap ? need : cap);
}

struct ColumnPlan {
  dim3 grid, block;
  int64_t partial_rows() const { return grid.y; }
};

// column_kernel's geometry for (rows, C): TX a power of two covering C's chunks (up to a warp),
// as many row-blocks as fill one wave of `min_blocks` per SM (fewer blocks, fewer partial rows:
// the default bounds the workspace).
inline ColumnPlan column_plan(int64_t rows, int64_t C, int chunk, int device,
                              int min_blocks = kMinBlocksPerSM) {
  const int64_t col_chunks = ceil_div(C, chunk);
  int tx = 1;
  while (tx < 32 && tx < col_chunks) tx *= 2;
  const int ty = kThreads / tx;
  const int64_t gx = ceil_div(col_chunks, tx);
  const int64_t cap = static_cast<int64_t>(sm_count(device)) * min_blocks;
  int64_t gy = ceil_div(rows, ty);
  const int64_t fill = cap / gx > 1 ? cap / gx : 1;
  if (gy > fill) gy = fill;
  if (gy > 65535) gy = 65535;
  if (gy < 1) gy = 1;
  ColumnPlan plan;
  plan.grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), 1);
  plan.block = dim3(tx, ty, 1);
  return plan;
}

// f(std::integral_constant<bool, b>{})
template <class F>
inline cudaError_t with_bool(bool b, F&& f) {
  return b ? f(std::true_type{}) : f(std::false_type{});
}

// f(T{}) for the C++ type of dt.
template <class F>
inline cudaError_t with_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat64: return f(double{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    case DType::kFloat16: return f(__half{});
  }
  return cudaErrorInvalidValue;
}

inline size_t math_size(DType dt) { return dt == DType::kFloat64 ? sizeof(double) : sizeof(float); }

// kChunk of dt's C++ type.
inline int chunk_of(DType dt) {
  switch (dt) {
    case DType::kFloat32: return kChunk<float>;
    case DType::kFloat64: return kChunk<double>;
    case DType::kBFloat16: return kChunk<__nv_bfloat16>;
    case DType::kFloat16: return kChunk<__half>;
  }
  return 4;
}

inline int current_device() {
  int device = 0;
  cudaGetDevice(&device);  // a failure is reported by the launcher's cudaGetLastError
  return device;
}

// out = Op over n elements; with kReduce, *reduce_out = sum of contrib (workspace: one M per
// block of flat_blocks).  The per-channel vector has C elements (kPerChannel) or 1.
template <class T, class Op, bool kPerChannel, bool kReduce>
cudaError_t launch_flat(T* out, const T* u, const T* v, const math_t<T>* vec, int64_t n,
                        int64_t C, math_t<T>* workspace, math_t<T>* reduce_out,
                        const DropoutParams& dropout, cudaStream_t stream) {
  using M = math_t<T>;
  const int min_blocks = dropout.p > 0.0 ? min_blocks_per_sm<T, Op, true, false>()
                                         : min_blocks_per_sm<T, Op, false, false>();
  const int blocks = flat_blocks(n, kChunk<T>, current_device(), min_blocks);
  const DropoutArgs d = make_dropout_args(dropout);
  const bool vec_ok = aligned16(out) && aligned16(u) && (!Op::kTwoInputs || aligned16(v));
  with_bool(vec_ok, [&](auto kv) {
    return with_bool(dropout.p > 0.0, [&](auto kd) {
      flat_kernel<T, Op, decltype(kv)::value, kPerChannel, decltype(kd)::value, kReduce>
          <<<blocks, kThreads, 0, stream>>>(out, workspace, u, v, vec, n, C, d);
      return cudaSuccess;
    });
  });
  if constexpr (kReduce)
    sum_partials_kernel<M><<<1, kThreads, 0, stream>>>(workspace, blocks, 1, reduce_out);
  return cudaGetLastError();
}

// out = Op over (n / C, C); reduce_out[c] = column sums of contrib (workspace: plan rows x C).
template <class T, class Op>
cudaError_t launch_columns(T* out, const T* u, const T* v, const math_t<T>* vec, int64_t n,
                           int64_t C, math_t<T>* workspace, math_t<T>* reduce_out,
                           const DropoutParams& dropout, cudaStream_t stream) {
  using M = math_t<T>;
  constexpr int N = kChunk<T>;
  const int64_t rows = n / C;
  const int min_blocks = dropout.p > 0.0 ? min_blocks_per_sm<T, Op, true, true>()
                                         : min_blocks_per_sm<T, Op, false, true>();
  const ColumnPlan plan = column_plan(rows, C, N, current_device(), min_blocks);
  const DropoutArgs d = make_dropout_args(dropout);
  const bool vec_ok = C % N == 0 && aligned16(out) && aligned16(u) &&
                      (!Op::kTwoInputs || aligned16(v));
  with_bool(vec_ok, [&](auto kv) {
    return with_bool(dropout.p > 0.0, [&](auto kd) {
      column_kernel<T, Op, decltype(kv)::value, decltype(kd)::value>
          <<<plan.grid, plan.block, 0, stream>>>(out, workspace, u, v, vec, rows, C, d);
      return cudaSuccess;
    });
  });
  const int64_t warps_per_block = kThreads / 32;
  sum_partials_kernel<M><<<static_cast<unsigned>(ceil_div(C, warps_per_block)), kThreads, 0,
                           stream>>>(workspace, plan.partial_rows(), C, reduce_out);
  return cudaGetLastError();
}

// Workspace bytes of launch_flat<..., kReduce = true> and of launch_columns.
inline size_t flat_workspace_bytes(DType dt, int64_t n, int device) {
  return static_cast<size_t>(flat_blocks(n, chunk_of(dt), device)) * math_size(dt);
}

inline size_t column_workspace_bytes(DType dt, int64_t n, int64_t C, int device) {
  const ColumnPlan plan = column_plan(n / C, C, chunk_of(dt), device);
  return static_cast<size_t>(plan.partial_rows()) * static_cast<size_t>(C) * math_size(dt);
}

}  // namespace rezero::cuda
