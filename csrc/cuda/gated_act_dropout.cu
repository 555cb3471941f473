// The gated MLP epilogue on CUDA.  gate_up is (rows, 2H) holding [g | u]; y is (rows, H):
//   y[r, j] = act(g[r, j]) * u[r, j] * m(r * H + j)
// with m(i) the dropout scale of output element i (1 / (1 - p) kept, 0 dropped).  Its backward
// reads grad and gate_up (the activation is recomputed, nothing else is kept):
//   dm = grad[r, j] * m(r * H + j);  grad_g[r, j] = dm * u * act'(g),  grad_u[r, j] = dm * act(g)
// written into columns j and H + j of row r of grad_gate_up.  No reductions.  The activation
// formulas are in ../activations.h.
//
// Geometry: a thread owns N = kChunk adjacent output columns [c0, c0 + N) of one row (ceil(H / N)
// chunks per row, so a chunk never straddles rows and its g and u lie H apart in one row of
// gate_up), grid-stride over the rows * ceil(H / N) chunks with at most one wave of blocks.
// Adjacent threads take adjacent chunks, so every read and write is coalesced; with H % N == 0
// and aligned pointers each chunk of y, g, u (and grad) is whole aligned 128-bit vectors.  The
// chunk's dropout elements are r * H + c0 + [0, N).
#include "../activations.h"  // activate, activation, with_activation
#include "dropout.cuh"        // DropoutArgs, load_philox_key, keep_bits
#include "launch.cuh"         // flat_blocks, current_device, with_bool
#include "launch_bounds.cuh"  // kThreads, min_blocks_per_sm
#include "types.cuh"          // with_dtype, math_t
#include "vector_io.cuh"      // load_chunk, store_chunk, kChunk, aligned16

namespace rezero::cuda {
namespace {

// The blocks per SM of __launch_bounds__ (its register budget) and of the grid: the rule of
// min_blocks_per_sm (float64: 2, 128 registers; the float64 backward of gelu, erf and exp in
// double: 1), and 2 for 16-bit data with dropout when H % 4 != 0, where a chunk's 8 elements
// take three Philox calls and spill at 64 registers on sm_80.
template <Act kAct, bool kGrad>
struct GatedBudget {
  static constexpr int kFloat64Blocks = kGrad && kAct == Act::kGelu ? 1 : 2;
};

template <class T, Act kAct, bool kGrad, bool kDropout, bool kAligned4>
constexpr int gated_min_blocks() {
  if (sizeof(T) == 2 && kDropout && !kAligned4) return 2;
  return min_blocks_per_sm<T, GatedBudget<kAct, kGrad>, kDropout, false>();
}

// kGrad false: out = y (rows, H), grad unused.  kGrad true: out = grad_gate_up (rows, 2H), grad
// (rows, H).  kVec: H % N == 0 and every pointer 16-byte aligned.  kAligned4 (with dropout
// only): H % 4 == 0, so every chunk's first dropout element is a multiple of 4 and the chunk
// takes N / 4 Philox calls.
template <class T, Act kAct, bool kGrad, bool kVec, bool kDropout, bool kAligned4>
__global__ void __launch_bounds__(kThreads,
                                  (gated_min_blocks<T, kAct, kGrad, kDropout, kAligned4>()))
gated_kernel(T* __restrict__ out, const T* __restrict__ grad, const T* __restrict__ gate_up,
             int64_t rows, int64_t H, DropoutArgs d) {
  using M = math_t<T>;
  constexpr int N = kChunk<T>;
  const int64_t row_chunks = (H + N - 1) / N;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  // chunk k is (row, cc) = (k / row_chunks, k % row_chunks); advanced by stride per step with
  // no division in the loop
  int64_t row = first / row_chunks, cc = first % row_chunks;
  const int64_t row_step = stride / row_chunks, cc_step = stride % row_chunks;
  PhiloxKey key{};
  if constexpr (kDropout) key = load_philox_key(d);
  const M scale = static_cast<M>(d.scale);
  for (; row < rows; row += row_step) {
    const int64_t c0 = cc * N;
    const int valid = H - c0 < N ? static_cast<int>(H - c0) : N;
    const int64_t i0 = row * H + c0;  // output element of column c0: the dropout index
    const int64_t gi = i0 + row * H;  // g[row, c0] in gate_up; u[row, c0] is H further
    M g[N], u[N];
    load_chunk<N>(gate_up + gi, g, valid, kVec);
    load_chunk<N>(gate_up + gi + H, u, valid, kVec);
    uint32_t bits = 0;
    if constexpr (kDropout) bits = keep_bits<N, kAligned4>(static_cast<uint64_t>(i0), key);
    if constexpr (!kGrad) {
      M y[N];
#pragma unroll
      for (int j = 0; j < N; ++j) {
        M t = activate<kAct, false>(g[j]) * u[j];
        if (kDropout) t *= ((bits >> j) & 1u) ? scale : M(0);
        y[j] = t;
      }
      store_chunk<N>(out + i0, y, valid, kVec);
    } else {
      M dy[N], dg[N], du[N];
      load_chunk<N>(grad + i0, dy, valid, kVec);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        M dm = dy[j];
        if (kDropout) dm *= ((bits >> j) & 1u) ? scale : M(0);
        M a, da;  // act(g) and act'(g), sharing their exp / erf / tanh
        activation<kAct, true, true>(g[j], &a, &da);
        dg[j] = dm * u[j] * da;
        du[j] = dm * a;
      }
      store_chunk<N>(out + gi, dg, valid, kVec);
      store_chunk<N>(out + gi + H, du, valid, kVec);
    }
    cc += cc_step;
    if (cc >= row_chunks) {
      cc -= row_chunks;
      ++row;
    }
  }
}

template <class T, Act kAct, bool kGrad>
cudaError_t launch_gated(T* out, const T* grad, const T* gate_up, int64_t rows, int64_t H,
                         const DropoutParams& dropout, cudaStream_t stream) {
  constexpr int N = kChunk<T>;
  const DropoutArgs d = make_dropout_args(dropout);
  const bool vec = H % N == 0 && aligned16(out) && aligned16(gate_up) &&
                   (!kGrad || aligned16(grad));
  const int device = current_device();
  with_bool(vec, [&](auto kv) {
    return with_bool(dropout.p > 0.0, [&](auto kd) {
      constexpr bool kVec = decltype(kv)::value, kDropout = decltype(kd)::value;
      // five variants: without dropout the alignment of the dropout index is unused, and
      // vectors (H % N == 0) imply H % 4 == 0
      return with_bool(kDropout && !kVec && H % 4 == 0, [&](auto ka) {
        constexpr bool kAligned4 = kDropout && (kVec || decltype(ka)::value);
        const int blocks = flat_blocks(rows * ceil_div(H, N), 1, device,
                                       gated_min_blocks<T, kAct, kGrad, kDropout, kAligned4>());
        gated_kernel<T, kAct, kGrad, kVec, kDropout, kAligned4>
            <<<blocks, kThreads, 0, stream>>>(out, grad, gate_up, rows, H, d);
        return cudaSuccess;
      });
    });
  });
  return cudaGetLastError();
}

}  // namespace

cudaError_t gated_act_dropout_forward(DType dtype, Act act, void* y, const void* gate_up,
                                      int64_t rows, int64_t H, DropoutParams dropout,
                                      cudaStream_t stream) {
  return with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return with_activation(act, [&](auto a) {
      return launch_gated<T, decltype(a)::value, false>(
          static_cast<T*>(y), nullptr, static_cast<const T*>(gate_up), rows, H, dropout, stream);
    });
  });
}

cudaError_t gated_act_dropout_backward(DType dtype, Act act, void* grad_gate_up,
                                       const void* grad, const void* gate_up, int64_t rows,
                                       int64_t H, DropoutParams dropout, cudaStream_t stream) {
  return with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return with_activation(act, [&](auto a) {
      return launch_gated<T, decltype(a)::value, true>(
          static_cast<T*>(grad_gate_up), static_cast<const T*>(grad),
          static_cast<const T*>(gate_up), rows, H, dropout, stream);
    });
  });
}

}  // namespace rezero::cuda
