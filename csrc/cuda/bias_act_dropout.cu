// The feed-forward epilogue on CUDA: y = dropout(act(h + bias)), and its backward
//   grad_h = grad * mask * scale * act'(h + bias),  grad_bias = column sums of grad_h
// (only when asked for; bias may be nullptr: none).  The activation is a template parameter of
// one forward and one backward policy; its formulas are in ../activations.h.  (For relu, autograd.cpp passes the forward output as h and no bias:
// act'(y) is the same mask.)
#include "../activations.h"  // activate, with_activation
#include "launch.cuh"         // launch_flat, launch_columns
#include "types.cuh"          // with_dtype, math_t

namespace rezero::cuda {
namespace {

// u = h, c = bias:  y = act(h + bias) * m
template <Act kAct>
struct BiasActForward {
  static constexpr bool kTwoInputs = false;
  static constexpr int kFloat64Blocks = 2;
  template <bool kDropout, class M>
  static __device__ __forceinline__ M apply(M h, M /*unused*/, M b, M m, M& /*contrib*/) {
    const M y = activate<kAct, false>(h + b);
    return kDropout ? y * m : y;
  }
};

// u = grad, v = h, c = bias:  grad_h = grad * act'(h + bias) * m;  contrib = grad_h
template <Act kAct>
struct BiasActBackward {
  static constexpr bool kTwoInputs = true;
  // erf and exp in double for four elements at a time need more than 128 registers
  static constexpr int kFloat64Blocks = kAct == Act::kGelu ? 1 : 2;
  template <bool kDropout, class M>
  static __device__ __forceinline__ M apply(M g, M h, M b, M m, M& contrib) {
    M t = g * activate<kAct, true>(h + b);
    if (kDropout) t *= m;
    contrib = t;
    return t;
  }
};

}  // namespace

cudaError_t bias_act_dropout_forward(DType dtype, Act act, void* y, const void* h,
                                     const void* bias, int64_t n, int64_t channels,
                                     DropoutParams dropout, cudaStream_t stream) {
  return with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    using M = math_t<T>;
    return with_activation(act, [&](auto a) {
      return with_bool(bias != nullptr, [&](auto has_bias) {  // no bias: a zero scalar vector
        return launch_flat<T, BiasActForward<decltype(a)::value>, decltype(has_bias)::value,
                           false>(static_cast<T*>(y), static_cast<const T*>(h), nullptr,
                                  static_cast<const M*>(bias), n, channels, nullptr, nullptr,
                                  dropout, stream);
      });
    });
  });
}

size_t bias_act_dropout_backward_workspace_bytes(DType dtype, int64_t n, int64_t channels,
                                                 bool grad_bias, int device) {
  if (!grad_bias) return 0;
  return column_workspace_bytes(dtype, n, channels, device);
}

cudaError_t bias_act_dropout_backward(DType dtype, Act act, void* grad_h, void* grad_bias,
                                      void* workspace, const void* grad, const void* h,
                                      const void* bias, int64_t n, int64_t channels,
                                      DropoutParams dropout, cudaStream_t stream) {
  return with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    using M = math_t<T>;
    return with_activation(act, [&](auto a) {
      using Op = BiasActBackward<decltype(a)::value>;
      if (grad_bias == nullptr)  // no column sums: the flat kernel without its reduction
        return with_bool(bias != nullptr, [&](auto has_bias) {
          return launch_flat<T, Op, decltype(has_bias)::value, false>(
              static_cast<T*>(grad_h), static_cast<const T*>(grad), static_cast<const T*>(h),
              static_cast<const M*>(bias), n, channels, nullptr, nullptr, dropout, stream);
        });
      return launch_columns<T, Op>(
          static_cast<T*>(grad_h), static_cast<const T*>(grad), static_cast<const T*>(h),
          static_cast<const M*>(bias), n, channels, static_cast<M*>(workspace),
          static_cast<M*>(grad_bias), dropout, stream);
    });
  });
}

}  // namespace rezero::cuda
