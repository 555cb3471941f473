// The CUDA kernels as torch operators (schemas in ../ops.cpp): argument checks, output and
// workspace allocation (the caching allocator, so CUDA-graph capture works), and the launchers
// of launchers.h on the current stream of the data's device.  Compiled only in the CUDA build
// (setup.py adds csrc/cuda/*.cpp when REZERO_CUDA is on).
//
// Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE
// headers); c10::cuda::getCurrentCUDAStream is what at::cuda::getCurrentCUDAStream names.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../op_checks.h"
#include "launchers.h"

namespace rezero::cuda {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default:
      TORCH_CHECK(false, "rezero_kernels: unsupported dtype ", t.scalar_type());
  }
  return DType::kFloat32;  // unreachable
}

// The seed is only checked (never read on the host) when dropout is on.
DropoutParams make_dropout(double p, const at::Tensor& seed, const at::Tensor& data) {
  check_dropout(p, seed, data);
  DropoutParams d;
  if (p == 0.0) return d;
  d.p = p;
  d.seed = seed.data_ptr<int64_t>();
  return d;
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

at::Tensor residual_op(const at::Tensor& x, const at::Tensor& fx, const at::Tensor& alpha, double p,
                    const at::Tensor& seed) {
  check_residual_args(x, "x", fx, alpha, c10::DeviceType::CUDA);
  const DropoutParams d = make_dropout(p, seed, x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return y;
  C10_CUDA_CHECK(residual_forward(dtype_of(x), y.data_ptr(), x.data_ptr(), fx.data_ptr(),
                                  alpha.data_ptr(), x.numel(), channels_of(x), alpha.numel(), d,
                                  current_stream()));
  return y;
}

std::tuple<at::Tensor, at::Tensor> residual_backward_op(const at::Tensor& grad,
                                                        const at::Tensor& fx,
                                                        const at::Tensor& alpha, double p,
                                                        const at::Tensor& seed,
                                                        std::array<bool, 2> mask) {
  check_residual_args(grad, "grad", fx, alpha, c10::DeviceType::CUDA);
  const DropoutParams d = make_dropout(p, seed, fx);
  if (!mask[0] && !mask[1]) return {};
  const c10::cuda::CUDAGuard guard(fx.device());
  at::Tensor grad_fx = at::empty_like(fx, at::MemoryFormat::Contiguous), grad_alpha;
  if (fx.numel() == 0)
    return {mask[0] ? grad_fx : at::Tensor(), mask[1] ? at::zeros_like(alpha) : at::Tensor()};
  if (mask[1]) grad_alpha = at::empty_like(alpha);
  const DType dt = dtype_of(fx);
  const at::Tensor ws = workspace(
      residual_backward_workspace_bytes(dt, fx.numel(), channels_of(fx), alpha.numel(), mask[1],
                                        fx.get_device()),
      fx);
  C10_CUDA_CHECK(residual_backward(
      dt, grad_fx.data_ptr(), mask[1] ? grad_alpha.data_ptr() : nullptr, ws.data_ptr(),
      grad.data_ptr(), fx.data_ptr(), alpha.data_ptr(), fx.numel(), channels_of(fx),
      alpha.numel(), d, current_stream()));
  return {mask[0] ? grad_fx : at::Tensor(), grad_alpha};
}

// The device pointer of an optional bias, or nullptr.
const void* bias_ptr(const std::optional<at::Tensor>& bias) {
  return present(bias) ? bias->data_ptr() : nullptr;
}

at::Tensor bias_act_dropout_op(const at::Tensor& h, const std::optional<at::Tensor>& bias,
                               c10::string_view activation, double p, const at::Tensor& seed) {
  check_bias_act_args(h, present(bias), nullptr, c10::DeviceType::CUDA);
  const Act act = parse_activation(activation);
  const DropoutParams d = make_dropout(p, seed, h);
  const c10::cuda::CUDAGuard guard(h.device());
  at::Tensor y = at::empty_like(h, at::MemoryFormat::Contiguous);
  if (h.numel() == 0) return y;
  C10_CUDA_CHECK(bias_act_dropout_forward(dtype_of(h), act, y.data_ptr(), h.data_ptr(),
                                          bias_ptr(bias), h.numel(), channels_of(h), d,
                                          current_stream()));
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_act_dropout_backward_op(
    const at::Tensor& grad, const at::Tensor& h, const std::optional<at::Tensor>& bias,
    c10::string_view activation, double p, const at::Tensor& seed, std::array<bool, 2> mask) {
  check_bias_act_args(h, present(bias), &grad, c10::DeviceType::CUDA);
  const Act act = parse_activation(activation);
  const DropoutParams d = make_dropout(p, seed, h);
  if (!mask[0] && !mask[1]) return {};
  const c10::cuda::CUDAGuard guard(h.device());
  at::Tensor grad_h = at::empty_like(h, at::MemoryFormat::Contiguous), grad_bias;
  const auto sums = h.options().dtype(math_type(h.scalar_type()));
  if (h.numel() == 0)
    return {mask[0] ? grad_h : at::Tensor(),
            mask[1] ? at::zeros({h.size(-1)}, sums) : at::Tensor()};
  if (mask[1]) grad_bias = at::empty({h.size(-1)}, sums);
  const DType dt = dtype_of(h);
  const at::Tensor ws = workspace(bias_act_dropout_backward_workspace_bytes(
                                      dt, h.numel(), channels_of(h), mask[1], h.get_device()),
                                  h);
  C10_CUDA_CHECK(bias_act_dropout_backward(
      dt, act, grad_h.data_ptr(), mask[1] ? grad_bias.data_ptr() : nullptr, ws.data_ptr(),
      grad.data_ptr(), h.data_ptr(), bias_ptr(bias), h.numel(), channels_of(h), d,
      current_stream()));
  return {mask[0] ? grad_h : at::Tensor(), grad_bias};
}

// gate_up (..., 2 H) as (rows, 2 H): H and rows of a non-empty gate_up.
int64_t half_width(const at::Tensor& gate_up) { return gate_up.size(-1) / 2; }
int64_t gated_rows(const at::Tensor& gate_up) { return gate_up.numel() / gate_up.size(-1); }

at::Tensor gated_act_dropout_op(const at::Tensor& gate_up, c10::string_view activation, double p,
                                const at::Tensor& seed) {
  check_gated_args(gate_up, nullptr, c10::DeviceType::CUDA);
  const Act act = parse_activation(activation);
  const DropoutParams d = make_dropout(p, seed, gate_up);
  const c10::cuda::CUDAGuard guard(gate_up.device());
  std::vector<int64_t> sizes = gate_up.sizes().vec();
  sizes.back() = half_width(gate_up);
  at::Tensor y = at::empty(sizes, gate_up.options());
  if (gate_up.numel() == 0) return y;
  C10_CUDA_CHECK(gated_act_dropout_forward(dtype_of(gate_up), act, y.data_ptr(),
                                           gate_up.data_ptr(), gated_rows(gate_up),
                                           half_width(gate_up), d, current_stream()));
  return y;
}

at::Tensor gated_act_dropout_backward_op(const at::Tensor& grad, const at::Tensor& gate_up,
                                         c10::string_view activation, double p,
                                         const at::Tensor& seed) {
  check_gated_args(gate_up, &grad, c10::DeviceType::CUDA);
  const Act act = parse_activation(activation);
  const DropoutParams d = make_dropout(p, seed, gate_up);
  const c10::cuda::CUDAGuard guard(gate_up.device());
  at::Tensor grad_gate_up = at::empty_like(gate_up, at::MemoryFormat::Contiguous);
  if (gate_up.numel() == 0) return grad_gate_up;
  C10_CUDA_CHECK(gated_act_dropout_backward(dtype_of(gate_up), act, grad_gate_up.data_ptr(),
                                            grad.data_ptr(), gate_up.data_ptr(),
                                            gated_rows(gate_up), half_width(gate_up), d,
                                            current_stream()));
  return grad_gate_up;
}

}  // namespace
TORCH_LIBRARY_IMPL(rezero_kernels, CUDA, m) {
  m.impl("residual", &residual_op);
  m.impl("residual_backward", &residual_backward_op);
  m.impl("bias_act_dropout", &bias_act_dropout_op);
  m.impl("bias_act_dropout_backward", &bias_act_dropout_backward_op);
  m.impl("gated_act_dropout", &gated_act_dropout_op);
  m.impl("gated_act_dropout_backward", &gated_act_dropout_backward_op);
}

}  // namespace rezero::cuda
