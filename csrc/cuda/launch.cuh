// The host side of the generic kernels of elementwise.cuh: their launch geometry (at most one
// wave of blocks over the device's SMs), the workspace their reductions need, and launch_flat /
// launch_columns, which the launchers of residual.cu and bias_act_dropout.cu call.
#pragma once
#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "elementwise.cuh"

namespace rezero::cuda {

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
