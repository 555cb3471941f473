// What the device-generic C++ (autograd, the eager entry points, the GEMM ops) shares: typed
// handles of this library's ops, called through the dispatcher so that one source serves every
// device, and the (rows, C) matrix view of a tensor.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/accumulate.h>

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

}  // namespace rezero
