// The ReZero residual update on CPU: y = x + alpha * dropout(fx) (into a new tensor, or over fx
// for residual_into_fx), and its backward
//   grad_fx = alpha * mask * scale * grad,  grad_alpha = sum(grad * mask * scale * fx)
// (grad_x is grad itself and never reaches this file; fx is read only when grad_alpha is asked
// for).  The kernels are in kernels/residual.cpp.
#include <torch/library.h>

#include "op_args.h"

namespace rezero::cpu {
namespace {

at::Tensor residual(const at::Tensor& x, const at::Tensor& fx, const at::Tensor& alpha, double p,
                    const at::Tensor& seed) {
  check_residual_args(x, "x", fx, alpha, c10::DeviceType::CPU);
  const Dropout d = make_dropout(p, seed, x);
  at::Tensor y = at::empty_like(x);
  if (x.numel() > 0) REZERO_CPU_KERNEL(residual)(y, x, fx, alpha, d);
  return y;
}

void residual_into_fx(const at::Tensor& x, const at::Tensor& fx, const at::Tensor& alpha,
                      double p, const at::Tensor& seed) {
  check_residual_args(x, "x", fx, alpha, c10::DeviceType::CPU);
  const Dropout d = make_dropout(p, seed, x);
  at::Tensor y = fx;
  if (x.numel() > 0) REZERO_CPU_KERNEL(residual)(y, x, fx, alpha, d);
}

std::tuple<at::Tensor, at::Tensor> residual_backward(const at::Tensor& grad, const at::Tensor& fx,
                                                     const at::Tensor& alpha, double p,
                                                     const at::Tensor& seed,
                                                     std::array<bool, 2> mask) {
  check_residual_args(grad, "grad", fx, alpha, c10::DeviceType::CPU);
  const Dropout d = make_dropout(p, seed, fx);
  if (!mask[0] && !mask[1]) return {};
  at::Tensor grad_fx = at::empty_like(fx), grad_alpha;
  if (mask[1]) grad_alpha = fx.numel() > 0 ? at::empty_like(alpha) : at::zeros_like(alpha);
  if (fx.numel() > 0)
    REZERO_CPU_KERNEL(residual_backward)(grad_fx, mask[1] ? &grad_alpha : nullptr, grad, fx,
                                         alpha, d);
  return {mask[0] ? grad_fx : at::Tensor(), grad_alpha};
}

}  // namespace

TORCH_LIBRARY_IMPL(rezero_kernels, CPU, m) {
  m.impl("residual", &residual);
  m.impl("residual_into_fx", &residual_into_fx);
  m.impl("residual_backward", &residual_backward);
}

}  // namespace rezero::cpu
