// Argument checks and dropout set-up shared by the CPU op bindings.  The Python wrappers
// already guarantee these conventions (see csrc/ops.cpp); the checks guard direct callers of
// torch.ops.rezero_kernels.*.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "../philox.h"
#include "dropout_mask.h"

namespace rezero::cpu {

inline void check_data(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ||
                  t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              name, " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
}

inline void check_same(const at::Tensor& a, const at::Tensor& b, const char* an, const char* bn) {
  TORCH_CHECK(a.sizes() == b.sizes(), an, " and ", bn, " must have the same shape, got ",
              a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), an, " and ", bn,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

inline int64_t channels_of(const at::Tensor& t) { return t.dim() == 0 ? 1 : t.size(-1); }

// A length-1 or length-C vector in the math dtype of `data`.
inline void check_vector(const at::Tensor& v, const at::Tensor& data, const char* name,
                         bool allow_scalar) {
  const auto math = data.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(v.dim() == 1 && v.is_contiguous() && v.device().is_cpu(), name,
              " must be a contiguous 1-D CPU tensor");
  TORCH_CHECK(v.numel() == channels_of(data) || (allow_scalar && v.numel() == 1), name,
              " must have ", allow_scalar ? "1 or " : "", channels_of(data), " elements, got ",
              v.numel());
  TORCH_CHECK(v.scalar_type() == math, name, " must be ", math, " for ", data.scalar_type(),
              " data, got ", v.scalar_type());
}

// Calls f(T{}) for T the C++ type of dtype st (float, double, BFloat16, Half).
template <class F>
void dispatch_float_types(at::ScalarType st, const F& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "rezero_kernels",
                                  [&] { f(scalar_t{}); });
}

inline Dropout make_dropout(double p, const at::Tensor& seed) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout probability must be in [0, 1), got ", p);
  Dropout d;
  if (p == 0.0) return d;
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 2 && seed.device().is_cpu(),
              "seed must be a CPU int64 tensor of 2 elements [key, counter_base]");
  const auto s = seed.contiguous();
  d.key = static_cast<uint64_t>(s.data_ptr<int64_t>()[0]);
  d.counter_base = static_cast<uint64_t>(s.data_ptr<int64_t>()[1]);
  d.enabled = true;
  d.threshold = dropout_threshold(p);
  d.scale = 1.0 / (1.0 - p);
  return d;
}

}  // namespace rezero::cpu
