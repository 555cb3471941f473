// The feed-forward epilogue on CPU: y = dropout(act(h + bias)), and its backward
//   grad_h = grad * mask * scale * act'(h + bias),  grad_bias = column sums of grad_h.
// Only h and bias are saved; the mask is regenerated from the seed.  The kernels are in
// kernels/bias_act_dropout.cpp.
#include <torch/library.h>

#include "op_args.h"

namespace rezero::cpu {
namespace {

at::Tensor bias_act_dropout(const at::Tensor& h, const at::Tensor& bias,
                            c10::string_view activation, double p, const at::Tensor& seed) {
  check_bias_act_args(h, bias, nullptr, c10::DeviceType::CPU);
  const Act act = parse_activation(activation);
  const Dropout d = make_dropout(p, seed, h);
  at::Tensor y = at::empty_like(h);
  if (h.numel() > 0) REZERO_CPU_KERNEL(bias_act_dropout)(y, h, bias, act, d);
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_act_dropout_backward(
    const at::Tensor& grad, const at::Tensor& h, const at::Tensor& bias,
    c10::string_view activation, double p, const at::Tensor& seed) {
  check_bias_act_args(h, bias, &grad, c10::DeviceType::CPU);
  const Act act = parse_activation(activation);
  const Dropout d = make_dropout(p, seed, h);
  at::Tensor grad_h = at::empty_like(h);
  at::Tensor grad_bias = at::zeros_like(bias);
  if (h.numel() > 0)
    REZERO_CPU_KERNEL(bias_act_dropout_backward)(grad_h, grad_bias, grad, h, bias, act, d);
  return {grad_h, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(rezero_kernels, CPU, m) {
  m.impl("bias_act_dropout", &bias_act_dropout);
  m.impl("bias_act_dropout_backward", &bias_act_dropout_backward);
}

}  // namespace rezero::cpu
