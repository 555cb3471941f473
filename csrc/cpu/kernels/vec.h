// at::vec with the widest instruction set this variant is compiled for (variant.h).
// The Sleef functions the wide versions call are exported by libtorch_cpu.
#pragma once
#include "variant.h"  // first: it picks at::vec's implementation
#include <ATen/cpu/vec/functional.h>  // convert_to_float for bfloat16/half
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>

#include "../../activations.h"
#include "row_loop.h"  // kTile

namespace rezero::cpu::CPU_CAPABILITY {

// src as the math type M: src itself when T is M, else widened into buf with at::vec
// (a scalar half -> float loop does not vectorise).
template <typename T, typename M>
inline const M* read_math(const T* src, M* buf, int64_t n) {
  if constexpr (std::is_same_v<T, M>) {
    return src;
  } else {
    using VT = at::vec::Vectorized<T>;
    using VM = at::vec::Vectorized<M>;
    int64_t j = 0;
    for (; j + VT::size() <= n; j += VT::size()) {
      auto [lo, hi] = at::vec::convert_to_float<T>(VT::loadu(src + j));
      lo.store(buf + j);
      hi.store(buf + j + VM::size());
    }
    for (; j < n; ++j) buf[j] = static_cast<M>(src[j]);
    return buf;
  }
}

// Runs fill(out) for an output piece of n values: straight into dst when T is the math type,
// else into a buffer that at::vec rounds into dst (a scalar float -> bfloat16/half rounding
// loop does not vectorise).
template <typename T, typename M, class Fill>
inline void write_rounded(T* dst, int64_t n, const Fill& fill) {
  if constexpr (std::is_same_v<T, M>) {
    fill(dst);
  } else {
    M tmp[kTile];
    fill(tmp);
    at::vec::convert(tmp, dst, n);
  }
}

// One at::vec vector of T (size() values) in the math type M, as kWidth M vectors: one for
// float/double, two for bfloat16/half; loaded widened and stored rounded in registers, without
// the scratch buffers of read_math / write_rounded.  A count below size() loads zeros into the
// lanes past it and stores none of them.
template <typename T>
struct MathLanes {
  using M = at::opmath_type<T>;
  using VM = at::vec::Vectorized<M>;
  static constexpr int kWidth = std::is_same_v<T, M> ? 1 : 2;
  static constexpr int64_t size() { return kWidth * VM::size(); }

  VM v[kWidth];

  static MathLanes load(const T* src, int64_t count) {
    MathLanes l;
    if constexpr (kWidth == 1) {
      l.v[0] = VM::loadu(src, count);
    } else {
      auto [lo, hi] = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(src, count));
      l.v[0] = lo;
      l.v[1] = hi;
    }
    return l;
  }
  // count values that are already in the math type (dropout scales), lane for lane
  static MathLanes load_scales(const M* src, int64_t count) {
    MathLanes l;
    for (int w = 0; w < kWidth; ++w)
      l.v[w] = VM::loadu(src + w * VM::size(),
                         std::clamp<int64_t>(count - w * VM::size(), 0, VM::size()));
    return l;
  }
  void store(T* dst, int64_t count) const {
    if constexpr (kWidth == 1)
      v[0].store(dst, count);
    else
      at::vec::convert_from_float<T>(v[0], v[1]).store(dst, count);
  }
};

// Elements of a sub-piece: short enough that the loads, the activation and the stores of one
// sub-piece stay within the out-of-order window, so memory and math overlap.
constexpr int64_t kSub = 64;

}  // namespace rezero::cpu::CPU_CAPABILITY

namespace rezero {

// erf(x) for float as an odd rational function of x on [-4, 4] (erf is +-1 in float beyond),
// within 4.2e-7 of the exact value: twelve fused multiply-adds and one division, no call.  With
// at::vec's float erf (a division, a polynomial and a call to Sleef's exp) our gelu was 1.4x
// slower than eager's in bfloat16; with this one it is 2.7x faster in float32 and 1.3x in
// bfloat16 (2048 x 2048, one thread), and no less accurate than eager's (max error against a
// float64 gelu: 9.9e-7 against eager's 1.2e-6).  Doubles keep at::vec's erf.  The coefficients
// are the widely used minimax fit behind Eigen's and XLA's fast float erf.
inline at::vec::Vectorized<float> rational_erf(at::vec::Vectorized<float> x) {
  using V = at::vec::Vectorized<float>;
  constexpr float kNum[] = {-2.72614225801306e-10f, 2.77068142495902e-08f, -2.10102402082508e-06f,
                            -5.69250639462346e-05f, -7.34990630326855e-04f, -2.95459980854025e-03f,
                            -1.60960333262415e-02f};
  constexpr float kDen[] = {-1.45660718464996e-05f, -2.13374055278905e-04f, -1.68282697438203e-03f,
                            -7.37332916720468e-03f, -1.42647390514189e-02f};
  x = at::vec::clamp(x, V(-4.0f), V(4.0f));
  const V x2 = x * x;
  V p(kNum[0]), q(kDen[0]);
  for (int i = 1; i < 7; ++i) p = at::vec::fmadd(p, x2, V(kNum[i]));
  for (int i = 1; i < 5; ++i) q = at::vec::fmadd(q, x2, V(kDen[i]));
  return x * p / q;
}

// The primitives of activations.h's formulas on this variant's at::vec vectors (Sleef's exp and
// tanh in the wide variants, and its erf for doubles; rational_erf for floats).
template <typename M>
struct ActOps<at::vec::Vectorized<M>> {
  using V = at::vec::Vectorized<M>;
  static V constant(double c) { return V(static_cast<M>(c)); }
  static V erf(V v) {
    if constexpr (std::is_same_v<M, float>)
      return rational_erf(v);
    else
      return v.erf();
  }
  static V exp(V v) {
    if constexpr (std::is_same_v<M, float>)
      return v.exp_u20();
    else
      return v.exp();
  }
  static V tanh(V v) { return v.tanh(); }
  static V positive_part(V z) { return at::vec::maximum(z, V(M(0))); }
  static V where_positive(V z, V a, V b) { return V::blendv(b, a, z > V(M(0))); }
};

}  // namespace rezero

namespace rezero::cpu::CPU_CAPABILITY {

// z[j] <- act(z[j]) (kGrad false) or act'(z[j]) (kGrad true), for j < n.
template <Act kAct, bool kGrad, typename M>
inline void activate_in_place(M* z, int64_t n) {
  using V = at::vec::Vectorized<M>;
  for (int64_t j = 0; j < n; j += V::size()) {
    const int64_t count = std::min<int64_t>(V::size(), n - j);
    rezero::activate<kAct, kGrad>(V::loadu(z + j, count)).store(z + j, count);
  }
}

// a[j] <- act(a[j]) and da[j] <- act'(a[j]) together (one exp / erf / tanh), for j < n.
template <Act kAct, typename M>
inline void activate_both_in_place(M* a, M* da, int64_t n) {
  using V = at::vec::Vectorized<M>;
  for (int64_t j = 0; j < n; j += V::size()) {
    const int64_t count = std::min<int64_t>(V::size(), n - j);
    V value, grad;
    rezero::activation<kAct, true, true>(V::loadu(a + j, count), &value, &grad);
    value.store(a + j, count);
    grad.store(da + j, count);
  }
}

}  // namespace rezero::cpu::CPU_CAPABILITY
