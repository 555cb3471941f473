// The activations, written once: their list, the name lookup, the dispatch from a run-time Act
// to a compile-time one, and each one's formula and derivative, generic over the value type so
// that the CUDA kernels (scalar float / double) and the CPU kernels (at::vec vectors) share it.
// No torch headers: the CUDA launchers and kernels include it as well as op_checks.h.
// A new activation is one line of REZERO_ACTIVATIONS and one branch of activation() (without it
// the kernels do not compile).  python_ref/activations.py lists the same activations, in the
// same order, with the same "kept for backward".
#pragma once
#include <math.h>  // erff, expf, tanhf, ... in the global namespace, as CUDA names them

#include <cstdlib>
#include <string_view>
#include <type_traits>

#include "host_device.h"

namespace rezero {

// What the fused ops keep of an activation for its derivative: nothing (identity), its output
// (act' is a function of act(z): relu' = 1 where relu(z) > 0), or its input z.
enum class Kept { kNothing, kOutput, kInput };

// X(enumerator, name, kept) for each activation.  The order is the activation code the Python
// side shares (identity 0, relu 1, gelu 2, gelu_tanh 3, silu 4).
#define REZERO_ACTIVATIONS(X)              \
  X(kIdentity, "identity", Kept::kNothing) \
  X(kRelu, "relu", Kept::kOutput)          \
  X(kGelu, "gelu", Kept::kInput)           \
  X(kGeluTanh, "gelu_tanh", Kept::kInput)  \
  X(kSilu, "silu", Kept::kInput)

#define REZERO_ACT_ENUMERATOR(e, name, kept) e,
enum class Act { REZERO_ACTIVATIONS(REZERO_ACT_ENUMERATOR) };
#undef REZERO_ACT_ENUMERATOR

inline constexpr Kept kept_for_backward(Act act) {
#define REZERO_ACT_KEPT(e, name, kept) \
  if (act == Act::e) return kept;
  REZERO_ACTIVATIONS(REZERO_ACT_KEPT)
#undef REZERO_ACT_KEPT
  return Kept::kInput;
}

// "identity, relu, gelu, gelu_tanh": the list ", identity, ..." past its first ", ".
#define REZERO_ACT_LISTED(e, name, kept) ", " name
inline constexpr const char* kActivationNames = REZERO_ACTIVATIONS(REZERO_ACT_LISTED) + 2;
#undef REZERO_ACT_LISTED

// false for an unknown name.
inline bool lookup_activation(std::string_view name, Act* act) {
#define REZERO_ACT_LOOKUP(e, n, kept) \
  if (name == n) {              \
    *act = Act::e;              \
    return true;                \
  }
  REZERO_ACTIVATIONS(REZERO_ACT_LOOKUP)
#undef REZERO_ACT_LOOKUP
  return false;
}

// f(std::integral_constant<Act, act>{}): the activation as a template argument.
template <class F>
decltype(auto) with_activation(Act act, F&& f) {
  switch (act) {
#define REZERO_ACT_CASE(e, name, kept) \
  case Act::e: return f(std::integral_constant<Act, Act::e>{});
    REZERO_ACTIVATIONS(REZERO_ACT_CASE)
#undef REZERO_ACT_CASE
  }
  std::abort();  // an Act outside the list
}

// The primitives the formulas are written in, for the value type V: float and double here (the
// CUDA kernels), at::vec::Vectorized in the CPU kernels (cpu/kernels/vec.h).  Each has
//   constant(c): c in V's scalar type;  erf, exp, tanh;
//   positive_part(z): max(z, 0);  where_positive(z, a, b): a where z > 0, else b.
template <class V>
struct ActOps;

template <class M>
struct ScalarActOps {
  static REZERO_HOST_DEVICE M constant(double c) { return M(c); }
  // NaN stays NaN, as in torch.relu and the CPU's at::vec::maximum.
  static REZERO_HOST_DEVICE M positive_part(M z) { return z < M(0) ? M(0) : z; }
  static REZERO_HOST_DEVICE M where_positive(M z, M a, M b) { return z > M(0) ? a : b; }
};

template <>
struct ActOps<float> : ScalarActOps<float> {
  static REZERO_HOST_DEVICE float erf(float v) { return ::erff(v); }
  static REZERO_HOST_DEVICE float exp(float v) { return ::expf(v); }
  static REZERO_HOST_DEVICE float tanh(float v) { return ::tanhf(v); }
};

template <>
struct ActOps<double> : ScalarActOps<double> {
  static REZERO_HOST_DEVICE double erf(double v) { return ::erf(v); }
  static REZERO_HOST_DEVICE double exp(double v) { return ::exp(v); }
  static REZERO_HOST_DEVICE double tanh(double v) { return ::tanh(v); }
};

template <Act>
inline constexpr bool kNoFormula = false;

// act(z) into *value and act'(z) into *grad, each only where the pointer is not null (known at
// compile time: the pointers are constants after inlining, so what is not wanted is not
// computed), the two sharing their exp / erf / tanh: the formulas of torch's gelu /
// gelu_backward, silu / silu_backward.
template <Act kAct, bool kValue, bool kGrad, class V>
REZERO_HOST_DEVICE void activation(V z, V* value, V* grad) {
  using O = ActOps<V>;
  const V half = O::constant(0.5), one = O::constant(1);
  if constexpr (kAct == Act::kIdentity) {
    if constexpr (kValue) *value = z;
    if constexpr (kGrad) *grad = one;
  } else if constexpr (kAct == Act::kRelu) {
    if constexpr (kValue) *value = O::positive_part(z);
    if constexpr (kGrad) *grad = O::where_positive(z, one, O::constant(0));
  } else if constexpr (kAct == Act::kGelu) {
    // z Phi(z), Phi(z) = (1 + erf(z / sqrt 2)) / 2;  Phi(z) + z exp(-z^2 / 2) / sqrt(2 pi)
    const V inv_sqrt2 = O::constant(0.70710678118654752440);
    const V inv_sqrt_2pi = O::constant(0.39894228040143267794);
    const V cdf = half * (one + O::erf(z * inv_sqrt2));
    if constexpr (kValue) *value = z * cdf;
    if constexpr (kGrad) *grad = cdf + z * inv_sqrt_2pi * O::exp(O::constant(-0.5) * z * z);
  } else if constexpr (kAct == Act::kGeluTanh) {
    // z (1 + t) / 2, t = tanh(k0 (z + k1 z^3)), k0 = sqrt(2 / pi);
    // (1 + t) / 2 + z (1 - t^2) k0 (1 + 3 k1 z^2) / 2, with 3 k1 rounded to V's scalar type as
    // torch's gelu_backward rounds it
    const V k0 = O::constant(0.79788456080286535588), k1 = O::constant(0.044715);
    const V t = O::tanh(k0 * (z + k1 * z * z * z));
    if constexpr (kValue) *value = half * z * (one + t);
    if constexpr (kGrad)
      *grad = half * (one + t) +
              half * z * (one - t * t) * k0 * (one + O::constant(3) * k1 * z * z);
  } else if constexpr (kAct == Act::kSilu) {
    // z s, s = 1 / (1 + exp(-z));  s (1 + z (1 - s))  (torch's silu / silu_backward)
    const V s = one / (one + O::exp(O::constant(0) - z));
    if constexpr (kValue) *value = z * s;
    if constexpr (kGrad) *grad = s * (one + z * (one - s));
  } else {
    static_assert(kNoFormula<kAct>, "an activation of REZERO_ACTIVATIONS has no formula");
  }
}

// act(z) (kGrad false) or act'(z) (kGrad true).
template <Act kAct, bool kGrad, class V>
REZERO_HOST_DEVICE V activate(V z) {
  V out = z;
  activation<kAct, !kGrad, kGrad>(z, &out, &out);
  return out;
}

}  // namespace rezero
