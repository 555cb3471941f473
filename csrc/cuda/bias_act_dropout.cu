// The feed-forward epilogue on CUDA: y = dropout(act(h + bias)), and its backward
//   grad_h = grad * mask * scale * act'(h + bias),  grad_bias = column sums of grad_h.
// The activation is a template parameter of one forward and one backward policy.  (For relu,
// compiled_ops.py passes the forward output as h and a zero bias: act'(y) is the same mask.)
#include "common.cuh"

namespace rezero::cuda {
namespace {

__device__ __forceinline__ float erf_(float v) { return erff(v); }
__device__ __forceinline__ double erf_(double v) { return erf(v); }
__device__ __forceinline__ float exp_(float v) { return expf(v); }
__device__ __forceinline__ double exp_(double v) { return exp(v); }
__device__ __forceinline__ float tanh_(float v) { return tanhf(v); }
__device__ __forceinline__ double tanh_(double v) { return tanh(v); }

// act(z) (kGrad false) or act'(z) (kGrad true), in the math type M (the formulas of torch's
// gelu / gelu_backward, as the CPU kernels use them).
template <Activation kAct, bool kGrad, class M>
__device__ __forceinline__ M activate(M z) {
  const M half = M(0.5), one = M(1);
  if constexpr (kAct == Activation::kIdentity) {
    return kGrad ? one : z;
  } else if constexpr (kAct == Activation::kRelu) {
    return kGrad ? (z > M(0) ? one : M(0)) : (z > M(0) ? z : M(0));
  } else if constexpr (kAct == Activation::kGelu) {
    const M inv_sqrt2 = M(0.70710678118654752440), inv_sqrt_2pi = M(0.39894228040143267794);
    const M cdf = half * (one + erf_(z * inv_sqrt2));
    return kGrad ? cdf + z * inv_sqrt_2pi * exp_(M(-0.5) * z * z) : z * cdf;
  } else {
    const M k0 = M(0.79788456080286535588), k1 = M(0.044715);
    const M t = tanh_(k0 * (z + k1 * z * z * z));
    return kGrad ? half * (one + t) + half * z * (one - t * t) * k0 * (one + M(3) * k1 * z * z)
                 : half * z * (one + t);
  }
}

// u = h, c = bias:  y = act(h + bias) * m
template <Activation kAct>
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
template <Activation kAct>
struct BiasActBackward {
  static constexpr bool kTwoInputs = true;
  // erf and exp in double for four elements at a time need more than 128 registers
  static constexpr int kFloat64Blocks = kAct == Activation::kGelu ? 1 : 2;
  template <bool kDropout, class M>
  static __device__ __forceinline__ M apply(M g, M h, M b, M m, M& contrib) {
    M t = g * activate<kAct, true>(h + b);
    if (kDropout) t *= m;
    contrib = t;
    return t;
  }
};

// f(std::integral_constant<Activation, act>{})
template <class F>
cudaError_t with_activation(Activation act, F&& f) {
  switch (act) {
    case Activation::kIdentity: return f(std::integral_constant<Activation, Activation::kIdentity>{});
    case Activation::kRelu: return f(std::integral_constant<Activation, Activation::kRelu>{});
    case Activation::kGelu: return f(std::integral_constant<Activation, Activation::kGelu>{});
    case Activation::kGeluTanh: return f(std::integral_constant<Activation, Activation::kGeluTanh>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t bias_act_dropout_forward(DType dtype, Activation act, void* y, const void* h,
                                     const void* bias, int64_t n, int64_t channels,
                                     DropoutParams dropout, cudaStream_t stream) {
  return with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    using M = math_t<T>;
    return with_activation(act, [&](auto a) {
      return launch_flat<T, BiasActForward<decltype(a)::value>, true, false>(
          static_cast<T*>(y), static_cast<const T*>(h), nullptr, static_cast<const M*>(bias), n,
          channels, nullptr, nullptr, dropout, stream);
    });
  });
}

size_t bias_act_dropout_backward_workspace_bytes(DType dtype, int64_t n, int64_t channels,
                                                 int device) {
  return column_workspace_bytes(dtype, n, channels, device);
}

cudaError_t bias_act_dropout_backward(DType dtype, Activation act, void* grad_h, void* grad_bias,
                                      void* workspace, const void* grad, const void* h,
                                      const void* bias, int64_t n, int64_t channels,
                                      DropoutParams dropout, cudaStream_t stream) {
  return with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    using M = math_t<T>;
    return with_activation(act, [&](auto a) {
      return launch_columns<T, BiasActBackward<decltype(a)::value>>(
          static_cast<T*>(grad_h), static_cast<const T*>(grad), static_cast<const T*>(h),
          static_cast<const M*>(bias), n, channels, static_cast<M*>(workspace),
          static_cast<M*>(grad_bias), dropout, stream);
    });
  });
}

}  // namespace rezero::cuda
