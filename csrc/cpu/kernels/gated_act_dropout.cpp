// A gated MLP's hidden on CPU: with [g | u] the two halves of a row of gate_up (H columns each),
//   y = dropout(act(g) * u),
// and its backward, with d = grad * mask * scale,
//   grad_g = d * u * act'(g),  grad_u = d * act(g)
// written into the two halves of grad_gate_up.  Only gate_up is saved; the mask is regenerated
// from the seed, by the index of the element of y.  The activations are those of
// ../../activations.h on at::vec vectors.  Bound to the op in ../gated_act_dropout.cpp.
#include "variant.h"

#include <type_traits>

#include "dropout_mask.h"
#include "vec.h"

namespace rezero::cpu::CPU_CAPABILITY {
namespace {

template <typename T, typename M, bool kDropout>
void store_product(T* __restrict y, const M* __restrict a, const M* __restrict u,
                   const M* __restrict m, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    M v = a[j] * u[j];
    if constexpr (kDropout) v *= m[j];
    y[j] = static_cast<T>(v);
  }
}

// out = d * f * (kTwo ? f2 : 1), d = grad (* m)
template <typename T, typename M, bool kDropout, bool kTwo>
void store_grad(T* __restrict out, const M* __restrict grad, const M* __restrict m,
                const M* __restrict f, const M* __restrict f2, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    M v = grad[j] * f[j];
    if constexpr (kTwo) v *= f2[j];
    if constexpr (kDropout) v *= m[j];
    out[j] = static_cast<T>(v);
  }
}

template <typename M>
void copy_math(M* __restrict dst, const M* __restrict src, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = src[j];
}

// The layout walks y (rows of H); a piece of y starting at flat index s, column col, reads the
// same columns of both halves of row s / H of gate_up.  Forward: out = y; backward (kGrad):
// out = grad_gate_up.
template <typename T, Act kAct, bool kDropout, bool kGrad>
void kernel(T* out, const T* grad, const T* gate_up, const RowLayout& l, const Dropout& d) {
  using M = at::opmath_type<T>;
  const int64_t H = l.width;
  parallel_blocks(l, [&](int64_t, int64_t r0, int64_t r1) {
    ScaleBuffer<M> buf;
    M a[kSub], da[kSub];
    constexpr int64_t kWiden = std::is_same_v<T, M> ? 1 : kSub;
    M gb[kWiden], ub[kWiden], db[kWiden];  // bfloat16/half inputs widened to M
    for_pieces(l, r0, r1, [&](int64_t s, int64_t n, int64_t col) {
      const int64_t in = (s / H) * 2 * H + col;  // g of this piece in gate_up; u is H later
      const M* m = kDropout ? dropout_scales(buf, s, n, d) : nullptr;
      for (int64_t o = 0; o < n; o += kSub) {
        const int64_t k = std::min(kSub, n - o);
        const M* g = read_math(gate_up + in + o, gb, k);
        const M* u = read_math(gate_up + in + H + o, ub, k);
        const M* mo = kDropout ? m + o : nullptr;
        copy_math(a, g, k);
        if constexpr (kGrad) {
          activate_both_in_place<kAct>(a, da, k);
          const M* gr = read_math(grad + s + o, db, k);
          write_rounded<T, M>(out + in + o, k, [&](auto* dst) {
            store_grad<std::remove_pointer_t<decltype(dst)>, M, kDropout, true>(dst, gr, mo, u,
                                                                                 da, k);
          });
          write_rounded<T, M>(out + in + H + o, k, [&](auto* dst) {
            store_grad<std::remove_pointer_t<decltype(dst)>, M, kDropout, false>(dst, gr, mo, a,
                                                                                  nullptr, k);
          });
        } else {
          activate_in_place<kAct, false>(a, k);
          write_rounded<T, M>(out + s + o, k, [&](auto* dst) {
            store_product<std::remove_pointer_t<decltype(dst)>, M, kDropout>(dst, a, u, mo, k);
          });
        }
      }
    });
  });
}

template <bool kGrad>
void run(at::Tensor& out, const at::Tensor* grad, const at::Tensor& gate_up, Act act,
         const Dropout& d) {
  const int64_t H = gate_up.size(-1) / 2;
  const auto l = RowLayout::make(gate_up.numel() / 2, H, /*per_channel=*/true);
  dispatch_float_types(gate_up.scalar_type(), [&](auto t) {
    using T = decltype(t);
    const T* gp = kGrad ? grad->data_ptr<T>() : nullptr;
    bool_dispatch(d.enabled, [&](auto dr) {
      with_activation(act, [&](auto a) {
        kernel<T, decltype(a)::value, decltype(dr)::value, kGrad>(out.data_ptr<T>(), gp,
                                                                  gate_up.data_ptr<T>(), l, d);
      });
      return 0;
    });
  });
}

}  // namespace

void gated_act_dropout(at::Tensor& y, const at::Tensor& gate_up, Act act, const Dropout& d) {
  run<false>(y, nullptr, gate_up, act, d);
}

void gated_act_dropout_backward(at::Tensor& grad_gate_up, const at::Tensor& grad,
                                const at::Tensor& gate_up, Act act, const Dropout& d) {
  run<true>(grad_gate_up, &grad, gate_up, act, d);
}

}  // namespace rezero::cpu::CPU_CAPABILITY
