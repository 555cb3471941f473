// What the device-generic C++ (autograd, the eager entry points, the GEMM ops) shares: typed
// handles of this library's ops, called through the dispatcher so that one source serves every
// device, the (rows, C) matrix view of a tensor, and the arguments that stand for "no bias" and
// "no dropout".
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/accumulate.h>

#include "op_checks.h"  // math_type

namespace rezero {

// The op rezero_kernels::<name> with C++ signature Signature (look it up once: keep the result in
// a function-local static).
template <class Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// t as (product of the leading dimensions, last dimension); in_features == 0 works.
inline at::Tensor as_matrix(const at::Tensor& t) {
  return t.reshape({c10::multiply_integers(t.sizes().slice(0, t.dim() - 1)), t.size(-1)});
}

// A zero bias for the elementwise ops on data like `like`: one per channel (last dimension), in
// the data's math type.
inline at::Tensor zero_bias(const at::Tensor& like) {
  return at::zeros({like.size(-1)}, like.options().dtype(math_type(like.scalar_type())));
}

// The seed argument of an op without dropout: an empty tensor on `like`'s device, never read.
inline at::Tensor no_seed(const at::Tensor& like) {
  return at::empty({0}, like.options().dtype(at::kLong));
}

}  // namespace rezero
