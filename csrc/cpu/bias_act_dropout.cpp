// The feed-forward epilogue on CPU: y = dropout(act(h + bias)), and its backward
//   grad_h = grad * mask * scale * act'(h + bias),  grad_bias = column sums of grad_h
// (the column sums only when asked for).  Only h and bias are saved; the mask is regenerated
// from the seed.  bias may be None.  The kernels are in kernels/bias_act_dropout.cpp.
#include <torch/library.h>

#include "op_args.h"

namespace rezero::cpu {
namespace {

at::Tensor bias_act_dropout(const at::Tensor& h, const std::optional<at::Tensor>& bias,
                            c10::string_view activation, double p, const at::Tensor& seed) {
  check_bias_act_args(h, present(bias), nullptr, c10::DeviceType::CPU);
  const Act act = parse_activation(activation);
  const Dropout d = make_dropout(p, seed, h);
  at::Tensor y = at::empty_like(h);
  if (h.numel() > 0) REZERO_CPU_KERNEL(bias_act_dropout)(y, h, present(bias), act, d);
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_act_dropout_backward(
    const at::Tensor& grad, const at::Tensor& h, const std::optional<at::Tensor>& bias,
    c10::string_view activation, double p, const at::Tensor& seed, std::array<bool, 2> mask) {
  check_bias_act_args(h, present(bias), &grad, c10::DeviceType::CPU);
  const Act act = parse_activation(activation);
  const Dropout d = make_dropout(p, seed, h);
  if (!mask[0] && !mask[1]) return {};
  at::Tensor grad_h = at::empty_like(h), grad_bias;
  if (mask[1]) {  // the kernel writes every column sum
    const auto options = h.options().dtype(math_type(h.scalar_type()));
    grad_bias = h.numel() > 0 ? at::empty({h.size(-1)}, options) : at::zeros({h.size(-1)}, options);
  }
  if (h.numel() > 0)
    REZERO_CPU_KERNEL(bias_act_dropout_backward)(grad_h, mask[1] ? &grad_bias : nullptr, grad, h,
                                                 present(bias), act, d);
  return {mask[0] ? grad_h : at::Tensor(), grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(rezero_kernels, CPU, m) {
  m.impl("bias_act_dropout", &bias_act_dropout);
  m.impl("bias_act_dropout_backward", &bias_act_dropout_backward);
}

}  // namespace rezero::cpu
