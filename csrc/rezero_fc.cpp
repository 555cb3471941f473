// rezero_fc: y = x + alpha * dropout(act(x @ weight^T + bias)), the ReZero fully connected
// block (the paper's deep FC nets) as one op, device-generic.  A deep narrow net is all host
// time: eager spends four autograd nodes and about eleven kernels per block, this op one node
// and seven kernels (forward: the GEMM, the activation, which adds the bias (bias_in_gemm), the
// fused residual with dropout; backward: the fused residual backward, the activation backward
// with the bias gradient's column sums, the weight GEMM, and the input GEMM that adds grad
// itself: grad_x = grad + grad_F @ W).  The activation and its backward are this library's
// bias_act_dropout ops without dropout, so every activation's formula is csrc/activations.h's.
// bias may be None.
//
// With F = x W^T + b and A = act(F):
//   grad_A = alpha * mask * scale * grad,   grad_alpha = sum(grad * mask * scale * A)  (residual)
//   grad_F = act'(F) * grad_A,  grad_W = grad_F^T x,  grad_b = colsum(grad_F),
//   grad_x = grad + grad_F W.
// The op returns y and what backward needs of F (kept_for_backward, csrc/activations.h): A where
// act' is a function of A (identity, relu: A is also the residual's input), else the GEMM's
// output (A is recomputed from it).  A gradient nobody asked for costs nothing: its GEMM or
// its reduction is skipped.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "op_calls.h"
#include "op_checks.h"

namespace rezero {
namespace {

void check_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor* bias) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2 && weight.size(0) == x.size(-1) &&
                  weight.size(1) == x.size(-1),
              "weight must be (C, C) for x of last dimension C, got ", weight.sizes(), " and ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and weight must share one dtype");
  if (bias == nullptr) return;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == x.size(-1), "bias must have ", x.size(-1),
              " elements, got ", bias->sizes());
  TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "x, weight and bias must share one dtype");
}

// Where the bias is added.  16-bit data: in the GEMM, which rounds x W^T + b once (as eager's
// addmm does); adding it in the activation would round x W^T first.  float32/float64: in the
// activation kernel, which saves the GEMM's broadcast copy of the bias (the same roundings).
bool bias_in_gemm(const at::Tensor& x) { return math_type(x.scalar_type()) != x.scalar_type(); }

// The bias the activation ops add (in the data's math type), or None.
OptTensor activation_bias(const OptTensor& bias, const at::Tensor& x) {
  if (!present(bias) || bias_in_gemm(x)) return std::nullopt;
  return *bias;
}

// The activation calls run without dropout (p = 0), so they never read their seed argument:
// they get the op's own seed rather than a newly allocated empty tensor.
TensorPair rezero_fc(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                     const at::Tensor& alpha, c10::string_view activation, double p,
                     const at::Tensor& seed) {
  check_args(x, weight, present(bias));
  const Act act = parse_activation(activation);
  const OptTensor b = activation_bias(bias, x);
  const at::Tensor x2 = as_matrix(x);
  const at::Tensor f = with_sizes(
      present(bias) && !b ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t()), x.sizes());
  const at::Tensor a = act == Act::kIdentity && !b
                           ? f
                           : ops::bias_act_dropout().call(f, b, activation, 0.0, seed);
  const at::Tensor y = ops::residual().call(x, a, alpha, p, seed);
  return {y, kept_for_backward(act) == Kept::kInput ? f : a};
}

// mask: which of (grad_x, grad_weight, grad_bias, grad_alpha) to compute.
TensorQuad rezero_fc_backward(const at::Tensor& grad, const at::Tensor& x,
                              const at::Tensor& weight, const OptTensor& bias,
                              const at::Tensor& alpha, const at::Tensor& kept,
                              c10::string_view activation, double p, const at::Tensor& seed,
                              Mask4 mask) {
  const Act act = parse_activation(activation);
  TORCH_CHECK(grad.sizes().equals(x.sizes()) && kept.sizes().equals(x.sizes()),
              "grad and the kept tensor must have x's shape ", x.sizes());
  const bool grad_f_needed = mask[0] || mask[1] || mask[2];
  // kept is A = act(F) (act' a function of A: no bias to add), or the GEMM's output (F, or
  // x W^T to which the activation adds the bias)
  const bool kept_input = kept_for_backward(act) == Kept::kInput;
  const OptTensor kept_bias = kept_input ? activation_bias(bias, x) : OptTensor();
  const at::Tensor a =
      kept_input ? ops::bias_act_dropout().call(kept, kept_bias, activation, 0.0, seed) : kept;
  at::Tensor grad_x, grad_weight, grad_bias, grad_alpha, grad_a;
  std::tie(grad_a, grad_alpha) =
      ops::residual_backward().call(grad, a, alpha, p, seed, {grad_f_needed, mask[3]});
  if (!grad_f_needed) return {grad_x, grad_weight, grad_bias, grad_alpha};
  // grad_F = act'(F) grad_A, and its column sums (the bias gradient) in the same pass
  at::Tensor grad_f = grad_a, column_sums;
  if (act != Act::kIdentity)
    std::tie(grad_f, column_sums) = ops::bias_act_dropout_backward().call(
        grad_a, kept, kept_bias, activation, 0.0, seed, {true, mask[2]});
  grad_f = as_matrix(grad_f);
  if (mask[0]) grad_x = with_sizes(at::addmm(as_matrix(grad), grad_f, weight), x.sizes());
  if (mask[1]) grad_weight = at::mm(grad_f.t(), as_matrix(x));
  if (mask[2])
    grad_bias = column_sums.defined() ? in_type(column_sums, weight.scalar_type()) : grad_f.sum(0);
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
