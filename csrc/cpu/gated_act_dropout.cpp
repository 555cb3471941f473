// A gated MLP's hidden on CPU: y = dropout(act(g) * u) with [g | u] = gate_up, and its backward
//   grad_gate_up = [d * u * act'(g) | d * act(g)],  d = grad * mask * scale.
// Only gate_up is saved; the mask is regenerated from the seed.  The kernels are in
// kernels/gated_act_dropout.cpp.
#include <torch/library.h>

#include "op_args.h"

namespace rezero::cpu {
namespace {

at::Tensor gated_act_dropout(const at::Tensor& gate_up, c10::string_view activation, double p,
                             const at::Tensor& seed) {
  check_gated_args(gate_up, nullptr, c10::DeviceType::CPU);
  const Act act = parse_activation(activation);
  const Dropout d = make_dropout(p, seed, gate_up);
  auto sizes = gate_up.sizes().vec();
  sizes.back() /= 2;
  at::Tensor y = at::empty(sizes, gate_up.options());
  if (y.numel() > 0) REZERO_CPU_KERNEL(gated_act_dropout)(y, gate_up, act, d);
  return y;
}

at::Tensor gated_act_dropout_backward(const at::Tensor& grad, const at::Tensor& gate_up,
                                      c10::string_view activation, double p,
                                      const at::Tensor& seed) {
  check_gated_args(gate_up, &grad, c10::DeviceType::CPU);
  const Act act = parse_activation(activation);
  const Dropout d = make_dropout(p, seed, gate_up);
  at::Tensor grad_gate_up = at::empty_like(gate_up);
  if (grad.numel() > 0)
    REZERO_CPU_KERNEL(gated_act_dropout_backward)(grad_gate_up, grad, gate_up, act, d);
  return grad_gate_up;
}

}  // namespace

TORCH_LIBRARY_IMPL(rezero_kernels, CPU, m) {
  m.impl("gated_act_dropout", &gated_act_dropout);
  m.impl("gated_act_dropout_backward", &gated_act_dropout_backward);
}

}  // namespace rezero::cpu
