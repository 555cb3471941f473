// The ReZero residual update on CPU: y = x + alpha * dropout(fx), and its backward
//   grad_fx = alpha * mask * scale * grad,  grad_alpha = sum(grad * mask * scale * fx)
// (grad_x is grad itself and never reaches this file; without grad_alpha fx is not read).  One
// pass over memory each way; the mask is regenerated from the seed in backward, never stored.
// Bound to the op in ../residual.cpp.
#include "variant.h"

#include <type_traits>
#include <vector>

#include "dropout_mask.h"
#include "vec.h"

namespace rezero::cpu::CPU_CAPABILITY {
namespace {

// Inputs arrive in the math type M (read_math); O is T or M (write_rounded).  y may be f itself
// (residual_into_fx): element j is read before it is written, so the loop has no dependence
// between iterations (omp simd), and neither pointer is restrict.
template <typename O, typename M, bool kPerChannel, bool kDropout>
void forward_piece(O* y, const M* __restrict x, const M* f, const M* __restrict a,
                   const M* __restrict m, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    M v = f[j] * (kPerChannel ? a[j] : a[0]);
    if constexpr (kDropout) v *= m[j];
    y[j] = static_cast<O>(x[j] + v);
  }
}

// Writes grad_fx for the piece; with kReduce returns its contribution to a scalar grad_alpha,
// or adds it per channel to acc (without, f is not read).
template <typename O, typename M, bool kPerChannel, bool kDropout, bool kReduce>
M backward_piece(O* __restrict gf, M* __restrict acc, const M* __restrict g,
                 const M* __restrict f, const M* __restrict a, const M* __restrict m, int64_t n) {
  M total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < n; ++j) {
    M gj = g[j];
    if constexpr (kDropout) gj *= m[j];
    gf[j] = static_cast<O>(gj * (kPerChannel ? a[j] : a[0]));
    if constexpr (kReduce) {
      const M contribution = gj * f[j];
      if constexpr (kPerChannel) acc[j] += contribution;
      else total += contribution;
    }
  }
  return total;
}

template <typename T, bool kPerChannel, bool kDropout>
void forward_kernel(at::Tensor& y, const at::Tensor& x, const at::Tensor& fx,
                    const at::Tensor& alpha, const Dropout& d) {
  using M = at::opmath_type<T>;
  const auto l = RowLayout::make(x.numel(), channels_of(x), kPerChannel);
  T* yp = y.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  const T* fp = fx.data_ptr<T>();
  const M* ap = alpha.data_ptr<M>();
  parallel_blocks(l, [&](int64_t, int64_t r0, int64_t r1) {
    ScaleBuffer<M> buf;
    M xbuf[std::is_same_v<T, M> ? 1 : kTile], fbuf[std::is_same_v<T, M> ? 1 : kTile];
    for_pieces(l, r0, r1, [&](int64_t s, int64_t n, int64_t col) {
      const M* m = kDropout ? dropout_scales(buf, s, n, d) : nullptr;
      const M* xs = read_math(xp + s, xbuf, n);
      const M* fs = read_math(fp + s, fbuf, n);
      write_rounded<T, M>(yp + s, n, [&](auto* out) {
        using O = std::remove_pointer_t<decltype(out)>;
        forward_piece<O, M, kPerChannel, kDropout>(out, xs, fs, ap + (kPerChannel ? col : 0),
                                                      m, n);
      });
    });
  });
}

template <typename T, bool kPerChannel, bool kDropout, bool kReduce>
void backward_kernel(at::Tensor& grad_fx, at::Tensor* grad_alpha, const at::Tensor& grad,
                     const at::Tensor& fx, const at::Tensor& alpha, const Dropout& d) {
  using M = at::opmath_type<T>;
  const auto l = RowLayout::make(fx.numel(), channels_of(fx), kPerChannel);
  const int64_t len = kPerChannel ? l.width : 1;
  std::vector<M> partials(kReduce ? l.blocks * len : 0, M(0));
  T* gfp = grad_fx.data_ptr<T>();
  const T* gp = grad.data_ptr<T>();
  const T* fp = fx.data_ptr<T>();
  const M* ap = alpha.data_ptr<M>();
  parallel_blocks(l, [&](int64_t b, int64_t r0, int64_t r1) {
    ScaleBuffer<M> buf;
    M gbuf[std::is_same_v<T, M> ? 1 : kTile], fbuf[std::is_same_v<T, M> || !kReduce ? 1 : kTile];
    M* acc = kReduce ? partials.data() + b * len : nullptr;
    for_pieces(l, r0, r1, [&](int64_t s, int64_t n, int64_t col) {
      const M* m = kDropout ? dropout_scales(buf, s, n, d) : nullptr;
      const M* a = ap + (kPerChannel ? col : 0);
      const M* gs = read_math(gp + s, gbuf, n);
      const M* fs = kReduce ? read_math(fp + s, fbuf, n) : nullptr;
      M total = 0;
      write_rounded<T, M>(gfp + s, n, [&](auto* out) {
        using O = std::remove_pointer_t<decltype(out)>;
        total = backward_piece<O, M, kPerChannel, kDropout, kReduce>(
            out, kReduce ? acc + (kPerChannel ? col : 0) : nullptr, gs, fs, a, m, n);
      });
      if constexpr (kReduce && !kPerChannel) acc[0] += total;
    });
  });
  if constexpr (kReduce) sum_partials(partials, l.blocks, len, grad_alpha->data_ptr<M>());
}

// Calls f(T{}, per_channel, dropout) with compile-time flags for the dtype of `data`.
template <class F>
void dispatch_residual(const at::Tensor& data, const at::Tensor& alpha, const Dropout& d,
                       const F& f) {
  dispatch_float_types(data.scalar_type(), [&](auto t) {
    bool_dispatch(alpha.numel() > 1, [&](auto per_channel) {
      bool_dispatch(d.enabled, [&](auto dropout) { f(t, per_channel, dropout); return 0; });
      return 0;
    });
  });
}

}  // namespace

void residual(at::Tensor& y, const at::Tensor& x, const at::Tensor& fx, const at::Tensor& alpha,
              const Dropout& d) {
  dispatch_residual(x, alpha, d, [&](auto t, auto pc, auto dr) {
    forward_kernel<decltype(t), decltype(pc)::value, decltype(dr)::value>(y, x, fx, alpha, d);
  });
}

void residual_backward(at::Tensor& grad_fx, at::Tensor* grad_alpha, const at::Tensor& grad,
                       const at::Tensor& fx, const at::Tensor& alpha, const Dropout& d) {
  dispatch_residual(fx, alpha, d, [&](auto t, auto pc, auto dr) {
    bool_dispatch(grad_alpha != nullptr, [&](auto reduce) {
      backward_kernel<decltype(t), decltype(pc)::value, decltype(dr)::value,
                      decltype(reduce)::value>(grad_fx, grad_alpha, grad, fx, alpha, d);
      return 0;
    });
  });
}

}  // namespace rezero::cpu::CPU_CAPABILITY
