// rezero_gated_linear: a gated MLP's tail with its ReZero residual, device-generic:
//   h = dropout_mlp(act(g) * u)  ([g | u] = gate_up),   y = x + alpha * dropout(h @ weight^T)
// as this extension's gated_act_dropout and linear_residual ops, reached through the dispatcher
// (CPU and CUDA share this file).  What makes it one op is its backward: h, the down
// projection's input (as wide as the hidden), is not kept but recomputed from gate_up, which the
// gated activation keeps anyway, with the same seed:
//   h = gated_act_dropout(gate_up),  (grad_h, grad_weight, grad_alpha) = linear_residual's
//   backward with h,  grad_gate_up = gated_act_dropout's backward of grad_h,  grad_x = grad.
// So a layer's MLP keeps gate_up, weight, alpha and the two seeds, at the cost of one more
// gated_act_dropout forward in backward.  There is no bias (Llama's down projection has none):
// linear_residual gets zeros, whose gradient is never asked for.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "op_calls.h"

namespace rezero {
namespace {

void check_args(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D, got ", weight.sizes());
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) == 2 * weight.size(1),
              "gate_up's last dimension must be 2 x weight's in_features (", 2 * weight.size(1),
              "), got ", gate_up.sizes());
  TORCH_CHECK(x.dim() == gate_up.dim() && x.size(-1) == weight.size(0) &&
                  x.sizes().slice(0, x.dim() - 1).equals(
                      gate_up.sizes().slice(0, gate_up.dim() - 1)),
              "x must have gate_up's leading dimensions and weight's out_features, got ",
              x.sizes());
  TORCH_CHECK(gate_up.scalar_type() == weight.scalar_type(),
              "gate_up and weight must share one dtype");
}

at::Tensor zeros_of(const at::Tensor& weight) {
  return at::zeros({weight.size(0)}, weight.options());
}

at::Tensor gated_linear_residual(const at::Tensor& x, const at::Tensor& gate_up,
                                 const at::Tensor& weight, const at::Tensor& alpha,
                                 c10::string_view activation, double p_mlp,
                                 const at::Tensor& seed_mlp, double p, const at::Tensor& seed) {
  check_args(x, gate_up, weight);
  const at::Tensor h = ops::gated_act_dropout().call(gate_up, activation, p_mlp, seed_mlp);
  return ops::linear_residual().call(x, h, weight, zeros_of(weight), alpha, p, seed);
}

// mask: which of (grad_gate_up, grad_weight, grad_alpha) to compute.
TensorTriple gated_linear_residual_backward(const at::Tensor& grad, const at::Tensor& gate_up,
                                            const at::Tensor& weight, const at::Tensor& alpha,
                                            c10::string_view activation, double p_mlp,
                                            const at::Tensor& seed_mlp, double p,
                                            const at::Tensor& seed, Mask3 mask) {
  check_args(grad, gate_up, weight);
  if (!mask[0] && !mask[1] && !mask[2]) return {};
  const at::Tensor h = ops::gated_act_dropout().call(gate_up, activation, p_mlp, seed_mlp);
  auto [grad_h, grad_weight, grad_bias, grad_alpha] = ops::linear_residual_backward().call(
      grad, h, weight, zeros_of(weight), alpha, p, seed, {mask[0], mask[1], false, mask[2]});
  at::Tensor grad_gate_up;
  if (mask[0])
    grad_gate_up = ops::gated_act_dropout_backward().call(grad_h, gate_up, activation, p_mlp,
                                                          seed_mlp);
  return {grad_gate_up, grad_weight, grad_alpha};
}

}  // namespace

TORCH_LIBRARY_IMPL(rezero_kernels, CPU, m) {
  m.impl("gated_linear_residual", &gated_linear_residual);
  m.impl("gated_linear_residual_backward", &gated_linear_residual_backward);
}

#ifdef REZERO_WITH_CUDA
TORCH_LIBRARY_IMPL(rezero_kernels, CUDA, m) {
  m.impl("gated_linear_residual", &gated_linear_residual);
  m.impl("gated_linear_residual_backward", &gated_linear_residual_backward);
}
#endif

}  // namespace rezero
