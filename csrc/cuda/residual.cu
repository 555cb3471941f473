// The ReZero residual update on CUDA: y = x + alpha * dropout(fx), and its backward
//   grad_fx = alpha * mask * scale * grad,  grad_alpha = sum(grad * mask * scale * fx)
// (over everything for a 1-element alpha, per channel for a length-C alpha; without grad_alpha,
// fx is not read).  grad_x is grad itself and never reaches this file.  The mask is regenerated
// from the seed, never stored.
#include "launch.cuh"  // launch_flat, launch_columns, with_bool
#include "types.cuh"   // with_dtype, math_t

namespace rezero::cuda {
namespace {

// u = x, v = fx, c = alpha:  y = x + (fx * alpha) * m   (the CPU kernel's order of operations)
struct ResidualForward {
  static constexpr bool kTwoInputs = true;
  static constexpr int kFloat64Blocks = 2;
  template <bool kDropout, class M>
  static __device__ __forceinline__ M apply(M x, M f, M a, M m, M& /*contrib*/) {
    M t = f * a;
    if (kDropout) t *= m;
    return x + t;
  }
};

// u = grad, v = fx, c = alpha:  g' = grad * m;  grad_fx = g' * alpha;  contrib = g' * fx
struct ResidualBackward {
  static constexpr bool kTwoInputs = true;
  static constexpr int kFloat64Blocks = 2;
  template <bool kDropout, class M>
  static __device__ __forceinline__ M apply(M g, M f, M a, M m, M& contrib) {
    if (kDropout) g *= m;
    contrib = g * f;
    return g * a;
  }
};

// Without grad_alpha: u = grad, c = alpha:  grad_fx = (grad * m) * alpha, fx not read
struct ResidualGradFx {
  static constexpr bool kTwoInputs = false;
  static constexpr int kFloat64Blocks = 2;
  template <bool kDropout, class M>
  static __device__ __forceinline__ M apply(M g, M /*unused*/, M a, M m, M& /*contrib*/) {
    if (kDropout) g *= m;
    return g * a;
  }
};

bool per_channel(int64_t alpha_len) { return alpha_len > 1; }

}  // namespace

cudaError_t residual_forward(DType dtype, void* y, const void* x, const void* fx,
                             const void* alpha, int64_t n, int64_t channels, int64_t alpha_len,
                             DropoutParams dropout, cudaStream_t stream) {
  return with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    using M = math_t<T>;
    return with_bool(per_channel(alpha_len), [&](auto pc) {
      return launch_flat<T, ResidualForward, decltype(pc)::value, false>(
          static_cast<T*>(y), static_cast<const T*>(x), static_cast<const T*>(fx),
          static_cast<const M*>(alpha), n, channels, nullptr, nullptr, dropout, stream);
    });
  });
}

size_t residual_backward_workspace_bytes(DType dtype, int64_t n, int64_t channels,
                                         int64_t alpha_len, bool grad_alpha, int device) {
  if (!grad_alpha) return 0;
  return per_channel(alpha_len) ? column_workspace_bytes(dtype, n, channels, device)
                                : flat_workspace_bytes(dtype, n, device);
}

cudaError_t residual_backward(DType dtype, void* grad_fx, void* grad_alpha, void* workspace,
                              const void* grad, const void* fx, const void* alpha, int64_t n,
                              int64_t channels, int64_t alpha_len, DropoutParams dropout,
                              cudaStream_t stream) {
  return with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    using M = math_t<T>;
    T* out = static_cast<T*>(grad_fx);
    const T* g = static_cast<const T*>(grad);
    const T* f = static_cast<const T*>(fx);
    const M* a = static_cast<const M*>(alpha);
    M* ws = static_cast<M*>(workspace);
    M* ga = static_cast<M*>(grad_alpha);
    if (ga == nullptr)
      return with_bool(per_channel(alpha_len), [&](auto pc) {
        return launch_flat<T, ResidualGradFx, decltype(pc)::value, false>(
            out, g, nullptr, a, n, channels, nullptr, nullptr, dropout, stream);
      });
    if (per_channel(alpha_len))
      return launch_columns<T, ResidualBackward>(out, g, f, a, n, channels, ws, ga, dropout,
                                                 stream);
    return launch_flat<T, ResidualBackward, false, true>(out, g, f, a, n, channels, ws, ga,
                                                         dropout, stream);
  });
}

}  // namespace rezero::cuda
