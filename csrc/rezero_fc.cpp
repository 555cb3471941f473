// rezero_fc: y = x + alpha * dropout(act(x @ weight^T + bias)), the ReZero fully connected
// block (the paper's deep FC nets) as one op, device-generic.  A deep narrow net is all host
// time: eager spends four autograd nodes and about eleven kernels per block, this op one node
// and seven kernels (forward: the GEMM with the bias, the activation, the fused residual with
// dropout; backward: the fused residual backward, the activation backward with the bias
// gradient's column sums, the weight GEMM, and the input GEMM that adds grad itself:
// grad_x = grad + grad_F @ W).  The activation and its backward are this library's
// bias_act_dropout ops with a zero bias and no dropout, so every activation's formula is
// csrc/activations.h's.
//
// With F = x W^T + b and A = act(F):
//   grad_A = alpha * mask * scale * grad,   grad_alpha = sum(grad * mask * scale * A)  (residual)
//   grad_F = act'(F) * grad_A,  grad_W = grad_F^T x,  grad_b = colsum(grad_F),
//   grad_x = grad + grad_F W.
// The op returns y and what backward needs of F (kept_for_backward, csrc/activations.h): A where
// act' is a function of A (identity, relu: A is also the residual's input), else F itself (A is
// recomputed from it).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "op_calls.h"
#include "op_checks.h"

namespace rezero {
namespace {

using TensorPair = std::tuple<at::Tensor, at::Tensor>;

using BiasActSig = at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, double,
                              const at::Tensor&);
using BiasActBwdSig = TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 c10::string_view, double, const at::Tensor&);

void check_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2 && weight.size(0) == x.size(-1) &&
                  weight.size(1) == x.size(-1),
              "weight must be (C, C) for x of last dimension C, got ", weight.sizes(), " and ",
              x.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == x.size(-1), "bias must have ", x.size(-1),
              " elements, got ", bias.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() && bias.scalar_type() == x.scalar_type(),
              "x, weight and bias must share one dtype");
}

TensorPair rezero_fc(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       const at::Tensor& alpha, c10::string_view activation, double p,
                       const at::Tensor& seed) {
  static const auto residual =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                    const at::Tensor&)>("rezero_kernels::residual");
  check_args(x, weight, bias);
  static const auto activate = op<BiasActSig>("rezero_kernels::bias_act_dropout");
  const Act act = parse_activation(activation);
  const at::Tensor f = at::addmm(bias, as_matrix(x), weight.t()).view(x.sizes());
  const at::Tensor a =
      act == Act::kIdentity ? f : activate.call(f, zero_bias(f), activation, 0.0, no_seed(f));
  return {residual.call(x, a, alpha, p, seed), kept_for_backward(act) == Kept::kInput ? f : a};
}

// mask: which of (grad_x, grad_weight, grad_bias, grad_alpha) to compute.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rezero_fc_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& alpha, const at::Tensor& kept, c10::string_view activation, double p,
    const at::Tensor& seed, std::array<bool, 4> mask) {
  static const auto residual_backward =
      op<TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                    const at::Tensor&)>("rezero_kernels::residual_backward");
  static const auto activate = op<BiasActSig>("rezero_kernels::bias_act_dropout");
  static const auto activate_backward =
      op<BiasActBwdSig>("rezero_kernels::bias_act_dropout_backward");
  const Act act = parse_activation(activation);
  TORCH_CHECK(grad.sizes().equals(x.sizes()) && kept.sizes().equals(x.sizes()),
              "grad and the kept tensor must have x's shape ", x.sizes());
  const bool kept_input = kept_for_backward(act) == Kept::kInput;
  const at::Tensor zero = act == Act::kIdentity ? at::Tensor() : zero_bias(kept);
  const at::Tensor a =
      kept_input ? activate.call(kept, zero, activation, 0.0, no_seed(kept)) : kept;
  at::Tensor grad_x, grad_weight, grad_bias, grad_alpha;
  auto [grad_a, ga] = residual_backward.call(grad, a, alpha, p, seed);
  if (mask[3]) grad_alpha = ga;
  if (!(mask[0] || mask[1] || mask[2])) return {grad_x, grad_weight, grad_bias, grad_alpha};
  // grad_F = act'(F) grad_A, and its column sums (the bias gradient) in the same pass
  at::Tensor grad_f = grad_a, column_sums;
  if (act != Act::kIdentity)
    std::tie(grad_f, column_sums) =
        activate_backward.call(grad_a, kept, zero, activation, 0.0, no_seed(kept));
  grad_f = as_matrix(grad_f);
  if (mask[0]) grad_x = at::addmm(as_matrix(grad), grad_f, weight).view(x.sizes());
  if (mask[1]) grad_weight = at::mm(grad_f.t(), as_matrix(x));
  if (mask[2])
    grad_bias = column_sums.defined() ? column_sums.to(weight.scalar_type()) : grad_f.sum(0);
  return {grad_x, grad_weight, grad_bias, grad_alpha};
}

}  // namespace

TORCH_LIBRARY_IMPL(rezero_kernels, CPU, m) {
  m.impl("rezero_fc", &rezero_fc);
  m.impl("rezero_fc_backward", &rezero_fc_backward);
}

#ifdef REZERO_WITH_CUDA
TORCH_LIBRARY_IMPL(rezero_kernels, CUDA, m) {
  m.impl("rezero_fc", &rezero_fc);
  m.impl("rezero_fc_backward", &rezero_fc_backward);
}
#endif

}  // namespace rezero
