// Argument checks shared by the CPU and CUDA op bindings.  The Python wrappers already
// guarantee these conventions (see ops.cpp); the checks guard direct callers of
// torch.ops.rezero_kernels.*.
#pragma once
#include <ATen/ATen.h>

#include <string>

namespace rezero {

inline void check_data(const at::Tensor& t, const char* name, c10::DeviceType device) {
  TORCH_CHECK(t.device().type() == device, name, " must be a ", c10::DeviceTypeName(device),
              " tensor, got ", t.device());
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
  TORCH_CHECK(a.device() == b.device(), an, " and ", bn, " must be on the same device, got ",
              a.device(), " and ", b.device());
}

inline int64_t channels_of(const at::Tensor& t) { return t.dim() == 0 ? 1 : t.size(-1); }

// A length-1 or length-C vector in the math dtype of `data` (float32; float64 for float64).
inline void check_vector(const at::Tensor& v, const at::Tensor& data, const char* name,
                         bool allow_scalar) {
  const auto math = data.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(v.dim() == 1 && v.is_contiguous() && v.device() == data.device(), name,
              " must be a contiguous 1-D tensor on ", data.device());
  TORCH_CHECK(v.numel() == channels_of(data) || (allow_scalar && v.numel() == 1), name,
              " must have ", allow_scalar ? "1 or " : "", channels_of(data), " elements, got ",
              v.numel());
  TORCH_CHECK(v.scalar_type() == math, name, " must be ", math, " for ", data.scalar_type(),
              " data, got ", v.scalar_type());
}

// p in [0, 1); when p > 0, seed is [key, counter_base] (int64) on the data's device.
inline void check_dropout(double p, const at::Tensor& seed, const at::Tensor& data) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout probability must be in [0, 1), got ", p);
  if (p == 0.0) return;
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 2 && seed.is_contiguous() &&
                  seed.device() == data.device(),
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

// bias_act_dropout(h, bias) and, with grad, its backward.
inline void check_bias_act_args(const at::Tensor& h, const at::Tensor& bias,
                                const at::Tensor* grad, c10::DeviceType device) {
  check_data(h, "h", device);
  TORCH_CHECK(h.dim() >= 1, "h must have at least one dimension");
  check_vector(bias, h, "bias", /*allow_scalar=*/false);
  if (grad != nullptr) {
    check_data(*grad, "grad", device);
    check_same(*grad, h, "grad", "h");
  }
}

// The activations every backend implements, in this order.
enum class Act { kIdentity, kRelu, kGelu, kGeluTanh };

inline Act parse_activation(c10::string_view name) {
  if (name == "identity") return Act::kIdentity;
  if (name == "relu") return Act::kRelu;
  if (name == "gelu") return Act::kGelu;
  if (name == "gelu_tanh") return Act::kGeluTanh;
  TORCH_CHECK_VALUE(false, "unknown activation '", std::string(name),
                    "'; expected identity, relu, gelu or gelu_tanh");
}

}  // namespace rezero
