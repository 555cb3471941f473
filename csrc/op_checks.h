// The conventions of the op schemas (ops.cpp), written once: as predicates, which the eager fast
// path (fast_path.cpp) uses to decide whether inputs can go straight to an op, and as checks,
// which the CPU and CUDA op bindings use to guard direct callers of torch.ops.rezero_kernels.*.
// The Python wrappers (rezero_kernels/validation.py) turn any other input into this form or
// raise an error that names the problem.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <string_view>

#include "activations.h"

namespace rezero {

inline bool is_float_type(at::ScalarType st) {
  return st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf;
}

// float64 data computes in float64, every other type in float32.
inline at::ScalarType math_type(at::ScalarType data) {
  return data == at::kDouble ? at::kDouble : at::kFloat;
}

inline int64_t channels_of(const at::Tensor& t) { return t.dim() == 0 ? 1 : t.size(-1); }

// A data tensor: contiguous, of a float type.
inline bool is_data(const at::Tensor& t) { return is_float_type(t.scalar_type()) && t.is_contiguous(); }

// a and b: same shape, dtype and device.
inline bool is_like(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == b.scalar_type() && a.device() == b.device() && a.sizes().equals(b.sizes());
}

// alpha or bias of `data`: a contiguous 1-D vector in data's math type on data's device, of
// length channels_of(data) (or 1 when allow_scalar).
inline bool is_vector(const at::Tensor& v, at::ScalarType data_type, c10::Device device,
                      int64_t channels, bool allow_scalar) {
  return v.dim() == 1 && v.is_contiguous() && v.device() == device &&
         v.scalar_type() == math_type(data_type) &&
         (v.size(0) == channels || (allow_scalar && v.size(0) == 1));
}

inline bool is_vector(const at::Tensor& v, const at::Tensor& data, bool allow_scalar) {
  return is_vector(v, data.scalar_type(), data.device(), channels_of(data), allow_scalar);
}

// The tensor of an optional argument (Tensor? in a schema), or nullptr for None.
inline const at::Tensor* present(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

// p in [0, 1); when p > 0, seed is [key, counter_base] (int64, contiguous) on the data's device.
inline bool is_dropout(double p, const at::Tensor& seed, const at::Tensor& data) {
  if (!(p >= 0.0 && p < 1.0)) return false;
  return p == 0.0 || (seed.defined() && seed.scalar_type() == at::kLong && seed.numel() == 2 &&
                      seed.is_contiguous() && seed.device() == data.device());
}

// --- the checks of the op bindings -------------------------------------------------------

inline void check_data(const at::Tensor& t, const char* name, c10::DeviceType device) {
  TORCH_CHECK(t.device().type() == device, name, " must be a ", c10::DeviceTypeName(device),
              " tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(is_float_type(t.scalar_type()), name,
              " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
}

inline void check_same(const at::Tensor& a, const at::Tensor& b, const char* an, const char* bn) {
  TORCH_CHECK(is_like(a, b), an, " and ", bn, " must have the same shape, dtype and device, got ",
              a.sizes(), " ", a.scalar_type(), " ", a.device(), " and ", b.sizes(), " ",
              b.scalar_type(), " ", b.device());
}

inline void check_vector(const at::Tensor& v, const at::Tensor& data, const char* name,
                         bool allow_scalar) {
  TORCH_CHECK(is_vector(v, data, allow_scalar), name, " must be a contiguous 1-D ",
              math_type(data.scalar_type()), " tensor of ", allow_scalar ? "1 or " : "",
              channels_of(data), " elements on ", data.device(), " for ", data.scalar_type(),
              " data, got ", v.sizes(), " ", v.scalar_type(), " on ", v.device());
}

inline void check_dropout(double p, const at::Tensor& seed, const at::Tensor& data) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout probability must be in [0, 1), got ", p);
  TORCH_CHECK(is_dropout(p, seed, data),
              "seed must be a contiguous int64 tensor of 2 elements [key, counter_base] on ",
              data.device());
}

// residual(x, fx, alpha) and residual_backward(grad, fx, alpha): `a` is x or grad.
inline void check_residual_args(const at::Tensor& a, const char* a_name, const at::Tensor& fx,
                                const at::Tensor& alpha, c10::DeviceType device) {
  check_data(a, a_name, device);
  check_data(fx, "fx", device);
  check_same(a, fx, a_name, "fx");
  check_vector(alpha, fx, "alpha", /*allow_scalar=*/true);
}

// bias_act_dropout(h, bias) and, with grad, its backward; bias may be nullptr (none).
inline void check_bias_act_args(const at::Tensor& h, const at::Tensor* bias,
                                const at::Tensor* grad, c10::DeviceType device) {
  check_data(h, "h", device);
  TORCH_CHECK(h.dim() >= 1, "h must have at least one dimension");
  if (bias != nullptr) check_vector(*bias, h, "bias", /*allow_scalar=*/false);
  if (grad != nullptr) {
    check_data(*grad, "grad", device);
    check_same(*grad, h, "grad", "h");
  }
}

// gated_act_dropout(gate_up) and, with grad, its backward: gate_up's last dimension is even, and
// grad has gate_up's shape with half its last dimension.
inline void check_gated_args(const at::Tensor& gate_up, const at::Tensor* grad,
                             c10::DeviceType device) {
  check_data(gate_up, "gate_up", device);
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0,
              "gate_up must have an even last dimension ([gate | up]), got ", gate_up.sizes());
  if (grad != nullptr) {
    check_data(*grad, "grad", device);
    auto want = gate_up.sizes().vec();
    want.back() /= 2;
    TORCH_CHECK(grad->sizes().equals(want) && grad->scalar_type() == gate_up.scalar_type() &&
                    grad->device() == gate_up.device(),
                "grad must have shape ", at::IntArrayRef(want), ", dtype ",
                gate_up.scalar_type(), " and device ", gate_up.device(), ", got ",
                grad->sizes(), " ", grad->scalar_type(), " ", grad->device());
  }
}

inline Act parse_activation(c10::string_view name) {
  Act act = Act::kIdentity;
  TORCH_CHECK_VALUE(lookup_activation(std::string_view(name.data(), name.size()), &act),
                    "unknown activation '", std::string(name), "'; expected one of ",
                    kActivationNames);
  return act;
}

}  // namespace rezero
