// rezero_linear: y = x + alpha * dropout(inp @ weight^T + bias), device-generic.
// The GEMM (bias folded in) goes through ATen (MKL/oneDNN on CPU, cuBLAS on CUDA); the residual
// epilogue and the backward's dropout pass are this extension's elementwise ops, reached
// through the dispatcher so that the CPU and the CUDA build share this file.
//
// Backward without saving F = inp @ weight^T + bias: with dy' = mask * scale * grad and
// G = dy'^T inp,
//   grad_weight = alpha * G (alpha per output row),   grad_inp = dy' @ (alpha * weight),
//   grad_bias   = alpha * colsum(dy'),                grad_alpha = rowsum(weight * G) + bias * colsum(dy')
// (summed over rows for a scalar alpha).  So only inp, weight, bias, alpha and the seed are kept.
// With a scalar alpha and few rows (M rows against N outputs and K inputs), the weight-sized
// (N x K) products above cost more than the GEMMs; then, with H = dy' @ weight (M x K),
//   grad_weight = (alpha dy')^T inp,   grad_inp = alpha H,
//   grad_alpha = sum(H * inp) + bias . colsum(dy'),
// the same quantities from row-sized (M x N, M x K) products.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "op_calls.h"

namespace rezero {
namespace {

// dy' = mask * scale * grad (grad itself without dropout) and, when `sums`, its column sums in
// the math type (else undefined).
TensorPair dropout_grad(const at::Tensor& grad, double p, const at::Tensor& seed, bool sums) {
  if (p == 0.0)
    return {grad, sums ? at::sum(as_matrix(grad), {0}, false, math_type(grad.scalar_type()))
                       : at::Tensor()};
  // the identity activation without a bias: grad_h = mask * scale * grad
  return ops::bias_act_dropout_backward().call(grad, grad, std::nullopt, "identity", p, seed,
                                               {true, sums});
}

void check_args(const at::Tensor& x, const at::Tensor& inp, const at::Tensor& weight,
                const at::Tensor& bias) {
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D, got ", weight.sizes());
  TORCH_CHECK(inp.dim() >= 1 && inp.size(-1) == weight.size(1), "inp's last dimension must be ",
              weight.size(1), ", got ", inp.sizes());
  TORCH_CHECK(x.dim() == inp.dim() && x.size(-1) == weight.size(0) &&
                  x.sizes().slice(0, x.dim() - 1).equals(inp.sizes().slice(0, inp.dim() - 1)),
              "x must have inp's leading dimensions and weight's out_features, got ", x.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0), "bias must have ",
              weight.size(0), " elements, got ", bias.sizes());
  TORCH_CHECK(inp.scalar_type() == weight.scalar_type() && bias.scalar_type() == weight.scalar_type(),
              "inp, weight and bias must share one dtype");
}

at::Tensor linear_residual(const at::Tensor& x, const at::Tensor& inp, const at::Tensor& weight,
                           const at::Tensor& bias, const at::Tensor& alpha, double p,
                           const at::Tensor& seed) {
  check_args(x, inp, weight, bias);
  at::Tensor f = at::addmm(bias, as_matrix(inp), weight.t());
  f = in_type(with_sizes(f, x.sizes()), x.scalar_type());
  if (!f.is_cpu()) return ops::residual().call(x, f, alpha, p, seed);
  // f is this op's own: on the CPU y is written over it, saving a fresh x-sized buffer
  ops::residual_into_fx().call(x, f, alpha, p, seed);
  return f;
}

// a @ b with a float32 (float64 for float64) result.  G = dy'^T inp feeds grad_alpha, a sum over
// all of W * G.  cuBLAS produces the float32 result from the 16-bit operands (mm's out_dtype
// overload, torch >= 2.8): a 16-bit G from cuBLAS made that sum up to 20x less accurate than
// eager's on an H100.  The CPU has no such overload; its 16-bit GEMM (oneDNN, MKL) accumulates in
// float32 and rounds each result once, which keeps grad_alpha as accurate as eager's own (whose
// F is rounded the same way), and on CPUs with AVX512-BF16 or AMX it runs 3-4x faster than the
// float32 GEMM of widened operands: so the CPU widens the result, not the operands.
at::Tensor mm_math(const at::Tensor& a, const at::Tensor& b) {
  const auto st = a.scalar_type();
  if (st == at::kFloat || st == at::kDouble) return at::mm(a, b);
  if (a.is_cuda()) return at::mm(a, b, at::kFloat);
  return at::mm(a, b).to(at::kFloat);
}

// mask says which of (grad_inp, grad_weight, grad_bias, grad_alpha) to compute; the others are
// returned undefined, and their GEMMs and reductions are skipped.
TensorQuad linear_residual_backward(const at::Tensor& grad, const at::Tensor& inp,
                                    const at::Tensor& weight, const at::Tensor& bias,
                                    const at::Tensor& alpha, double p, const at::Tensor& seed,
                                    Mask4 mask) {
  check_args(grad, inp, weight, bias);
  const int64_t n_out = weight.size(0), n_in = weight.size(1);
  auto [dy, colsum] = dropout_grad(grad, p, seed, /*sums=*/mask[2] || mask[3]);
  const at::Tensor dy2 = in_type(as_matrix(dy), weight.scalar_type());
  const at::Tensor inp2 = as_matrix(inp);
  const auto dtype = weight.scalar_type(), math = alpha.scalar_type();
  at::Tensor grad_inp, grad_weight, grad_bias, grad_alpha;
  if (mask[2]) grad_bias = in_type(colsum * alpha, bias.scalar_type());
  const int64_t rows = dy2.size(0);
  const bool scalar = alpha.numel() == 1;
  // bias . colsum(dy'): grad_alpha's bias term (a scalar gate's; per channel: bias * colsum)
  auto bias_term = [&] { return at::dot(in_type(bias, math), colsum); };
  if (scalar && rows * (n_out + 2 * n_in) <= 3 * n_out * n_in) {  // few rows
    if (mask[1]) grad_weight = at::mm(in_type(dy2 * alpha, dtype).t(), inp2);
    if (mask[0] || mask[3]) {
      const at::Tensor h = mm_math(dy2, weight);  // (rows, in), math type
      if (mask[0]) grad_inp = with_sizes(in_type(h * alpha, dtype), inp.sizes());
      if (mask[3])
        grad_alpha = (at::dot(h.view(-1), in_type(inp2, math).reshape(-1)) + bias_term())
                         .reshape({1});
    }
    return {grad_inp, grad_weight, grad_bias, grad_alpha};
  }
  const at::Tensor alpha_rows = alpha.view({-1, 1});
  at::Tensor g;
  if (mask[1] || mask[3]) g = mm_math(dy2.t(), inp2);  // (out, in), math type
  if (mask[0])
    grad_inp = with_sizes(at::mm(dy2, in_type(weight * alpha_rows, dtype)), inp.sizes());
  if (mask[3] && scalar)
    grad_alpha =
        (at::dot(in_type(weight, math).reshape(-1), g.view(-1)) + bias_term()).reshape({1});
  else if (mask[3])
    grad_alpha = (in_type(weight, math) * g).sum(1) + in_type(bias, math) * colsum;
  if (mask[1]) grad_weight = in_type(g * alpha_rows, dtype);
  return {grad_inp, grad_weight, grad_bias, grad_alpha};
}

}  // namespace

TORCH_LIBRARY_IMPL(rezero_kernels, CPU, m) {
  m.impl("linear_residual", &linear_residual);
  m.impl("linear_residual_backward", &linear_residual_backward);
}

#ifdef REZERO_WITH_CUDA
TORCH_LIBRARY_IMPL(rezero_kernels, CUDA, m) {
  m.impl("linear_residual", &linear_residual);
  m.impl("linear_residual_backward", &linear_residual_backward);
}
#endif

}  // namespace rezero
