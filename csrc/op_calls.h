// What the device-generic C++ (autograd, the eager entry points, the GEMM ops) shares: typed
// handles of this library's ops, called through the dispatcher so that one source serves every
// device; the (rows, C) matrix view of a tensor, and casts and views that skip the dispatch when
// they would change nothing.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/accumulate.h>

#include <array>
#include <optional>
#include <tuple>

#include "op_checks.h"  // math_type

namespace rezero {

using OptTensor = std::optional<at::Tensor>;
using TensorPair = std::tuple<at::Tensor, at::Tensor>;
using TensorTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using TensorQuad = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Mask2 = std::array<bool, 2>;
using Mask3 = std::array<bool, 3>;
using Mask4 = std::array<bool, 4>;

// Each op's C++ signature (its schema in ops.cpp) and handle, looked up once.
#define REZERO_OP(fn, name, ...)                                                              \
  inline const c10::TypedOperatorHandle<__VA_ARGS__>& fn() {                                  \
    static const auto handle =                                                                \
        c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<__VA_ARGS__>();        \
    return handle;                                                                            \
  }
namespace ops {
using In = const at::Tensor&;
REZERO_OP(residual, "rezero_kernels::residual", at::Tensor(In, In, In, double, In))
REZERO_OP(residual_into_fx, "rezero_kernels::residual_into_fx", void(In, In, In, double, In))
REZERO_OP(residual_backward, "rezero_kernels::residual_backward",
          TensorPair(In, In, In, double, In, Mask2))
REZERO_OP(bias_act_dropout, "rezero_kernels::bias_act_dropout",
          at::Tensor(In, const OptTensor&, c10::string_view, double, In))
REZERO_OP(bias_act_dropout_backward, "rezero_kernels::bias_act_dropout_backward",
          TensorPair(In, In, const OptTensor&, c10::string_view, double, In, Mask2))
REZERO_OP(gated_act_dropout, "rezero_kernels::gated_act_dropout",
          at::Tensor(In, c10::string_view, double, In))
REZERO_OP(gated_act_dropout_backward, "rezero_kernels::gated_act_dropout_backward",
          at::Tensor(In, In, c10::string_view, double, In))
REZERO_OP(gated_linear_residual, "rezero_kernels::gated_linear_residual",
          at::Tensor(In, In, In, In, c10::string_view, double, In, double, In))
REZERO_OP(gated_linear_residual_backward, "rezero_kernels::gated_linear_residual_backward",
          TensorTriple(In, In, In, In, c10::string_view, double, In, double, In, Mask3))
REZERO_OP(linear_residual, "rezero_kernels::linear_residual",
          at::Tensor(In, In, In, In, In, double, In))
REZERO_OP(linear_residual_backward, "rezero_kernels::linear_residual_backward",
          TensorQuad(In, In, In, In, In, double, In, Mask4))
REZERO_OP(rezero_fc, "rezero_kernels::rezero_fc",
          TensorPair(In, In, const OptTensor&, In, c10::string_view, double, In))
REZERO_OP(rezero_fc_backward, "rezero_kernels::rezero_fc_backward",
          TensorQuad(In, In, In, const OptTensor&, In, In, c10::string_view, double, In, Mask4))
}  // namespace ops
#undef REZERO_OP

// t as (product of the leading dimensions, last dimension); in_features == 0 works.  A matrix
// is returned as it is (a reshape or view costs a dispatch even when it changes nothing).
inline at::Tensor as_matrix(const at::Tensor& t) {
  if (t.dim() == 2) return t;
  return t.reshape({c10::multiply_integers(t.sizes().slice(0, t.dim() - 1)), t.size(-1)});
}

// t viewed with `sizes` (t itself when it has them).
inline at::Tensor with_sizes(const at::Tensor& t, at::IntArrayRef sizes) {
  return t.sizes().equals(sizes) ? t : t.view(sizes);
}

// t as `type`: t itself when it has that type already (no dispatch at all).
inline at::Tensor in_type(const at::Tensor& t, at::ScalarType type) {
  return t.scalar_type() == type ? t : t.to(type);
}

}  // namespace rezero
