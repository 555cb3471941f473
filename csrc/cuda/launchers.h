// Host launchers of the CUDA kernels (residual.cu, bias_act_dropout.cu, gated_act_dropout.cu):
// plain C++ over raw device pointers, no torch types, so the kernels build and are tested with
// nvcc alone and binding.cpp is the only torch-facing file.
//
// Every launcher
//  * takes contiguous data of `n` elements viewed as (n / channels, channels) rows (the gated
//    ones: (rows, 2 H) in, (rows, H) out);
//  * takes alpha / bias in the math type (float, or double for kFloat64 data) and writes the
//    gradients of them in that type;
//  * reads the dropout seed [key, counter_base] from device memory inside the kernels (no host
//    synchronisation, so the launches can be captured in a CUDA graph);
//  * enqueues its kernels on `stream` and returns cudaGetLastError() (cudaSuccess when fine),
//    or the error of a CUDA runtime call it made;
//  * needs n > 0, rows * H > 0 for the gated ones (the binding handles empty tensors without
//    launching anything).
// The backward launchers that reduce (grad_alpha, grad_bias) write per-block partial sums into a
// caller-provided workspace of *_workspace_bytes(...) bytes, then add them in a fixed order in a
// second kernel: the reductions use no atomics and give bitwise identical results run to run on
// one device.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../activations.h"  // Act

namespace rezero::cuda {

enum class DType { kFloat32, kFloat64, kBFloat16, kFloat16 };

// p == 0: no dropout (seed is never read).  Otherwise element i (row-major) is kept iff
// rezero::dropout_keep(i, seed[0], seed[1], dropout_threshold(p)) (../philox.h), and kept
// values are scaled by 1 / (1 - p).
struct DropoutParams {
  double p = 0.0;
  const int64_t* seed = nullptr;  // device pointer to 2 int64: [key, counter_base]
};

// y = x + alpha * dropout(fx);  alpha_len is 1 or channels.
cudaError_t residual_forward(DType dtype, void* y, const void* x, const void* fx,
                             const void* alpha, int64_t n, int64_t channels, int64_t alpha_len,
                             DropoutParams dropout, cudaStream_t stream);

// grad_fx = alpha * mask * scale * grad;  grad_alpha (alpha_len elements) = sum over rows (and
// over channels when alpha_len == 1) of grad * mask * scale * fx.  grad_alpha nullptr: not
// computed (fx is not read; no workspace).
size_t residual_backward_workspace_bytes(DType dtype, int64_t n, int64_t channels,
                                         int64_t alpha_len, bool grad_alpha, int device);
cudaError_t residual_backward(DType dtype, void* grad_fx, void* grad_alpha, void* workspace,
                              const void* grad, const void* fx, const void* alpha, int64_t n,
                              int64_t channels, int64_t alpha_len, DropoutParams dropout,
                              cudaStream_t stream);

// y = dropout(act(h + bias));  bias has `channels` elements, or is nullptr (none).
cudaError_t bias_act_dropout_forward(DType dtype, Act act, void* y, const void* h,
                                     const void* bias, int64_t n, int64_t channels,
                                     DropoutParams dropout, cudaStream_t stream);

// grad_h = grad * mask * scale * act'(h + bias);  grad_bias = column sums of grad_h (nullptr:
// not computed, no workspace).  bias may be nullptr.
size_t bias_act_dropout_backward_workspace_bytes(DType dtype, int64_t n, int64_t channels,
                                                 bool grad_bias, int device);
cudaError_t bias_act_dropout_backward(DType dtype, Act act, void* grad_h, void* grad_bias,
                                      void* workspace, const void* grad, const void* h,
                                      const void* bias, int64_t n, int64_t channels,
                                      DropoutParams dropout, cudaStream_t stream);

// gate_up is (rows, 2 H) holding [g | u]:  y (rows, H) = dropout(act(g) * u), dropout element i
// the i-th element of y.
cudaError_t gated_act_dropout_forward(DType dtype, Act act, void* y, const void* gate_up,
                                      int64_t rows, int64_t H, DropoutParams dropout,
                                      cudaStream_t stream);

// grad_gate_up (rows, 2 H) = [d * u * act'(g) | d * act(g)] with d = grad * mask * scale, grad
// (rows, H).  No reduction, no workspace.
cudaError_t gated_act_dropout_backward(DType dtype, Act act, void* grad_gate_up,
                                       const void* grad, const void* gate_up, int64_t rows,
                                       int64_t H, DropoutParams dropout, cudaStream_t stream);

}  // namespace rezero::cuda
