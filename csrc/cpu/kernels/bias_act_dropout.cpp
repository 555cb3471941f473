// The feed-forward epilogue on CPU: y = dropout(act(h + bias)), and its backward
//   grad_h = grad * mask * scale * act'(h + bias),  grad_bias = column sums of grad_h
// (only when asked for).  A missing bias reads as zeros.  Only h and bias are saved; the mask is
// regenerated from the seed.  The activations (formulas in ../../activations.h) run on at::vec
// vectors (std::erf / std::tanh would be scalar calls).
// Bound to the op in ../bias_act_dropout.cpp.
#include "variant.h"

#include <type_traits>
#include <vector>

#include "dropout_mask.h"
#include "vec.h"

namespace rezero::cpu::CPU_CAPABILITY {
namespace {

template <typename M>
void add_bias(M* __restrict z, const M* __restrict h, const M* __restrict b, int64_t n) {
  for (int64_t j = 0; j < n; ++j) z[j] = h[j] + b[j];
}

// add_bias, and grad copied beside it: reading both input streams in one loop keeps the
// hardware prefetchers on both (reading them in separate loops halved the bandwidth).
template <typename M>
void add_bias_load_grad(M* __restrict z, M* __restrict gz, const M* __restrict h,
                        const M* __restrict b, const M* __restrict g, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    z[j] = h[j] + b[j];
    gz[j] = g[j];
  }
}

template <typename T, typename M, bool kDropout>
void store_forward(T* __restrict y, const M* __restrict z, const M* __restrict m, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] = static_cast<T>(kDropout ? z[j] * m[j] : z[j]);
}

template <typename T, typename M, bool kDropout, bool kReduce>
void store_backward(T* __restrict gh, M* __restrict acc, const M* __restrict g,
                    const M* __restrict dz, const M* __restrict m, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    M v = g[j] * dz[j];
    if constexpr (kDropout) v *= m[j];
    gh[j] = static_cast<T>(v);
    if constexpr (kReduce) acc[j] += v;
  }
}

// The bias of a sub-piece of k <= kSub columns: zeros when there is no bias.
template <typename M>
const M* bias_at(const M* bias, int64_t col) {
  alignas(64) static constexpr M kZeros[kSub] = {};
  return bias != nullptr ? bias + col : kZeros;
}

// The bfloat16/half values of a sub-piece in one pass, 2 x VM::size() at a time: widen, add the
// bias, activate, drop, round and store straight from registers (the buffered passes below cost
// more than eager's bfloat16 kernels).  Returns how many of the k values it did; the caller does
// the rest.  The same float operations in the same order as the buffered path: bit-identical.
template <typename T, Act kAct, bool kDropout, bool kGrad, bool kReduce, typename M>
int64_t one_pass_16_bit(T* __restrict out, M* __restrict acc, const T* __restrict grad,
                        const T* __restrict h, const M* __restrict b, const M* __restrict m,
                        int64_t k) {
  using VT = at::vec::Vectorized<T>;
  using VM = at::vec::Vectorized<M>;
  constexpr int64_t kHalf = VM::size();
  int64_t j = 0;
  for (; j + VT::size() <= k; j += VT::size()) {
    auto [z0, z1] = at::vec::convert_to_float<T>(VT::loadu(h + j));
    z0 = rezero::activate<kAct, kGrad>(z0 + VM::loadu(b + j));
    z1 = rezero::activate<kAct, kGrad>(z1 + VM::loadu(b + j + kHalf));
    if constexpr (kGrad) {
      auto [g0, g1] = at::vec::convert_to_float<T>(VT::loadu(grad + j));
      z0 = g0 * z0;
      z1 = g1 * z1;
    }
    if constexpr (kDropout) {
      z0 = z0 * VM::loadu(m + j);
      z1 = z1 * VM::loadu(m + j + kHalf);
    }
    at::vec::convert_from_float<T>(z0, z1).store(out + j);
    if constexpr (kReduce) {
      (VM::loadu(acc + j) + z0).store(acc + j);
      (VM::loadu(acc + j + kHalf) + z1).store(acc + j + kHalf);
    }
  }
  return j;
}

// One kernel for both directions: forward writes y; backward writes grad_h and, with kReduce,
// the per-block column sums of grad_h into partials.
template <typename T, Act kAct, bool kDropout, bool kGrad, bool kReduce>
void kernel(T* out, at::opmath_type<T>* partials, const T* grad, const T* h,
            const at::opmath_type<T>* bias, const RowLayout& l, const Dropout& d) {
  using M = at::opmath_type<T>;
  parallel_blocks(l, [&](int64_t b, int64_t r0, int64_t r1) {
    ScaleBuffer<M> buf;
    M z[kSub], gz[kSub];
    constexpr int64_t kWiden = std::is_same_v<T, M> ? 1 : kSub;
    M hb[kWiden], gb[kWiden];  // bfloat16/half inputs widened to M
    for_pieces(l, r0, r1, [&](int64_t s, int64_t n, int64_t col) {
      const M* m = kDropout ? dropout_scales(buf, s, n, d) : nullptr;
      // Short sub-pieces keep the loads, the activation and the stores of one sub-piece
      // within the out-of-order window, so memory and math overlap.
      for (int64_t o0 = 0; o0 < n; o0 += kSub) {
        int64_t o = o0, k = std::min(kSub, n - o0);
        if constexpr (!std::is_same_v<T, M>) {
          const int64_t done = one_pass_16_bit<T, kAct, kDropout, kGrad, kReduce>(
              out + s + o, kReduce ? partials + b * l.width + col + o : nullptr,
              kGrad ? grad + s + o : nullptr, h + s + o, bias_at(bias, col + o),
              kDropout ? m + o : nullptr, k);
          if (done == k) continue;
          o += done, k -= done;  // the tail, buffered
        }
        const int64_t i = s + o;
        const M* hs = read_math(h + i, hb, k);
        if constexpr (kGrad)
          add_bias_load_grad(z, gz, hs, bias_at(bias, col + o), read_math(grad + i, gb, k), k);
        else
          add_bias(z, hs, bias_at(bias, col + o), k);
        activate_in_place<kAct, kGrad>(z, k);
        write_rounded<T, M>(out + i, k, [&](auto* dst) {
          using O = std::remove_pointer_t<decltype(dst)>;
          if constexpr (kGrad)
            store_backward<O, M, kDropout, kReduce>(
                dst, kReduce ? partials + b * l.width + col + o : nullptr, gz, z,
                kDropout ? m + o : nullptr, k);
          else
            store_forward<O, M, kDropout>(dst, z, kDropout ? m + o : nullptr, k);
        });
      }
    });
  });
}

// kGrad: backward (grad given), with the column sums unless grad_bias is nullptr.
template <bool kGrad>
void run(at::Tensor& out, at::Tensor* grad_bias, const at::Tensor* grad, const at::Tensor& h,
         const at::Tensor* bias, Act act, const Dropout& d) {
  const auto l = RowLayout::make(h.numel(), channels_of(h), /*per_channel=*/true);
  dispatch_float_types(h.scalar_type(), [&](auto t) {
    using T = decltype(t);
    using M = at::opmath_type<T>;
    const bool reduce = kGrad && grad_bias != nullptr;
    std::vector<M> partials(reduce ? l.blocks * l.width : 0, M(0));
    const M* bp = bias != nullptr ? bias->data_ptr<M>() : nullptr;
    bool_dispatch(d.enabled, [&](auto dr) {
      return bool_dispatch(reduce, [&](auto rd) {
        constexpr bool kDrop = decltype(dr)::value, kReduce = kGrad && decltype(rd)::value;
        const T* gp = kGrad ? grad->data_ptr<T>() : nullptr;
        with_activation(act, [&](auto a) {
          kernel<T, decltype(a)::value, kDrop, kGrad, kReduce>(out.data_ptr<T>(),
                                                               partials.data(), gp,
                                                               h.data_ptr<T>(), bp, l, d);
        });
        return 0;
      });
    });
    if (reduce) sum_partials(partials, l.blocks, l.width, grad_bias->data_ptr<M>());
  });
}

}  // namespace

void bias_act_dropout(at::Tensor& y, const at::Tensor& h, const at::Tensor* bias, Act act,
                      const Dropout& d) {
  run<false>(y, nullptr, nullptr, h, bias, act, d);
}

void bias_act_dropout_backward(at::Tensor& grad_h, at::Tensor* grad_bias, const at::Tensor& grad,
                               const at::Tensor& h, const at::Tensor* bias, Act act,
                               const Dropout& d) {
  run<true>(grad_h, grad_bias, &grad, h, bias, act, d);
}

}  // namespace rezero::cpu::CPU_CAPABILITY
