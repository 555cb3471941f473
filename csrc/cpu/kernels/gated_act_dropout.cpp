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

// The layout walks y (rows of H); a piece of y starting at flat index s, column col, reads the
// same columns of both halves of row s / H of gate_up, one MathLanes vector at a time (the
// activation, the product and the dropout in registers, in the math type).  Forward: out = y;
// backward (kGrad): out = grad_gate_up.
template <typename T, Act kAct, bool kDropout, bool kGrad>
void kernel(T* out, const T* grad, const T* gate_up, const RowLayout& l, const Dropout& d) {
  using M = at::opmath_type<T>;
  using L = MathLanes<T>;
  const int64_t H = l.width;
  parallel_blocks(l, [&](int64_t, int64_t r0, int64_t r1) {
    ScaleBuffer<M> buf;
    for_pieces(l, r0, r1, [&](int64_t s, int64_t n, int64_t col) {
      const int64_t in = (s / H) * 2 * H + col;  // g of this piece in gate_up; u is H later
      const M* m = kDropout ? dropout_scales(buf, s, n, d) : nullptr;
      for (int64_t o = 0; o < n; o += L::size()) {
        const int64_t k = std::min(L::size(), n - o);
        const L g = L::load(gate_up + in + o, k), u = L::load(gate_up + in + H + o, k);
        L mask;
        if constexpr (kDropout) mask = L::load_scales(m + o, k);
        if constexpr (kGrad) {
          const L gr = L::load(grad + s + o, k);
          L grad_g, grad_u;
          for (int w = 0; w < L::kWidth; ++w) {
            typename L::VM a, da;
            rezero::activation<kAct, true, true>(g.v[w], &a, &da);
            grad_g.v[w] = gr.v[w] * u.v[w] * da;
            grad_u.v[w] = gr.v[w] * a;
            if constexpr (kDropout) {
              grad_g.v[w] = grad_g.v[w] * mask.v[w];
              grad_u.v[w] = grad_u.v[w] * mask.v[w];
            }
          }
          grad_g.store(out + in + o, k);
          grad_u.store(out + in + H + o, k);
        } else {
          L y;
          for (int w = 0; w < L::kWidth; ++w) {
            y.v[w] = rezero::activate<kAct, false>(g.v[w]) * u.v[w];
            if constexpr (kDropout) y.v[w] = y.v[w] * mask.v[w];
          }
          y.store(out + s + o, k);
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
