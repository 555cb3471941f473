// Autograd for the ops, in C++ (the Autograd dispatch key), so that a training step pays no
// Python on the way forward or back.  Each forward op runs below autograd and records one node;
// its backward calls the matching *_backward op.  What each keeps for backward (never a dropout
// mask: the seed regenerates it):
//   residual          fx, alpha, seed              (not x: grad_x is grad itself)
//   bias_act_dropout  h, bias, seed                (relu, whose kept_for_backward is its output:
//                                                   y with a zero bias, since y > 0 exactly where
//                                                   relu passes gradient)
//   linear_residual   inp, weight, bias, alpha, seed  (not the GEMM output; linear_residual.cpp)
//   rezero_fc         x, weight, alpha, seed and act(F) or F (rezero_fc.cpp)
// The *_backward ops are not differentiable: their Autograd kernels record a node that raises if
// a second backward reaches it.  Inputs whose gradient nobody asked for are skipped
// (needs_input_grad), down to the GEMMs of linear_residual's backward.
#include <ATen/ATen.h>
#include <ATen/FuncTorchTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <type_traits>

#include "op_calls.h"
#include "op_checks.h"

namespace rezero {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Function;
using torch::autograd::variable_list;
using TensorPair = std::tuple<at::Tensor, at::Tensor>;
using TensorQuad = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

using ResidualSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                               const at::Tensor&);
using ResidualBwdSig = TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                  const at::Tensor&);
using BiasActSig = at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, double,
                              const at::Tensor&);
using BiasActBwdSig = TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 c10::string_view, double, const at::Tensor&);
using LinearSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, double, const at::Tensor&);
using LinearBwdSig = TensorQuad(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, double, const at::Tensor&,
                                std::array<bool, 4>);

// --- residual: y = x + alpha * dropout(fx) ------------------------------------------------

struct ResidualFn : Function<ResidualFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& fx,
                            const at::Tensor& alpha, double p, const at::Tensor& seed) {
    static const auto impl = op<ResidualSig>("rezero_kernels::residual");
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->saved_data["p"] = p;
    ctx->save_for_backward({fx, alpha, seed});
    return impl.call(x, fx, alpha, p, seed);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto impl = op<ResidualBwdSig>("rezero_kernels::residual_backward");
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad = grads[0].contiguous(), grad_fx, grad_alpha;
    if (ctx->needs_input_grad(1) || ctx->needs_input_grad(2))
      std::tie(grad_fx, grad_alpha) =
          impl.call(grad, saved[0], saved[1], ctx->saved_data["p"].toDouble(), saved[2]);
    return {ctx->needs_input_grad(0) ? grad : at::Tensor(), grad_fx, grad_alpha, at::Tensor(),
            at::Tensor()};
  }
};

// --- bias_act_dropout: y = dropout(act(h + bias)) -----------------------------------------

struct BiasActFn : Function<BiasActFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& bias,
                            c10::string_view activation, double p, const at::Tensor& seed) {
    static const auto impl = op<BiasActSig>("rezero_kernels::bias_act_dropout");
    at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor y = impl.call(h, bias, activation, p, seed);
    ctx->saved_data["p"] = p;
    ctx->saved_data["activation"] = std::string(activation);
    if (kept_for_backward(parse_activation(activation)) == Kept::kOutput)
      ctx->save_for_backward({y, at::zeros_like(bias), seed});
    else
      ctx->save_for_backward({h, bias, seed});
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto impl = op<BiasActBwdSig>("rezero_kernels::bias_act_dropout_backward");
    const auto saved = ctx->get_saved_variables();
    auto [grad_h, grad_bias] =
        impl.call(grads[0].contiguous(), saved[0], saved[1],
                  ctx->saved_data["activation"].toStringRef(), ctx->saved_data["p"].toDouble(),
                  saved[2]);
    return {ctx->needs_input_grad(0) ? grad_h : at::Tensor(),
            ctx->needs_input_grad(1) ? grad_bias : at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

// --- linear_residual: y = x + alpha * dropout(inp @ weight^T + bias) ----------------------

struct LinearFn : Function<LinearFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& inp,
                            const at::Tensor& weight, const at::Tensor& bias,
                            const at::Tensor& alpha, double p, const at::Tensor& seed) {
    static const auto impl = op<LinearSig>("rezero_kernels::linear_residual");
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->saved_data["p"] = p;
    ctx->save_for_backward({inp, weight, bias, alpha, seed});
    return impl.call(x, inp, weight, bias, alpha, p, seed);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto impl = op<LinearBwdSig>("rezero_kernels::linear_residual_backward");
    const auto s = ctx->get_saved_variables();
    const at::Tensor grad = grads[0].contiguous();
    const std::array<bool, 4> mask = {ctx->needs_input_grad(1), ctx->needs_input_grad(2),
                                      ctx->needs_input_grad(3), ctx->needs_input_grad(4)};
    at::Tensor gi, gw, gb, ga;
    if (mask[0] || mask[1] || mask[2] || mask[3])
      std::tie(gi, gw, gb, ga) =
          impl.call(grad, s[0], s[1], s[2], s[3], ctx->saved_data["p"].toDouble(), s[4], mask);
    return {ctx->needs_input_grad(0) ? grad : at::Tensor(), gi, gw, gb, ga, at::Tensor(),
            at::Tensor()};
  }
};

// torch.func's grad/vjp/jvp cannot differentiate through a C++ autograd Function; say so in
// our terms (torch's own message names neither the op nor a way out).  vmap alone is fine.
template <class Fn, class... Args>
auto apply(const Args&... args) {
  if (const auto& functorch = at::functorch::functorchTLSAccessor()) {
    try {
      functorch->checkSupportsCppAutogradFunction();
    } catch (const c10::Error&) {
      TORCH_CHECK_NOT_IMPLEMENTED(false,
                                  "rezero_kernels: torch.func transforms that differentiate "
                                  "(grad, vjp, jvp, jacrev, ...) cannot run through the fused "
                                  "ops; use backend='torch' inside them");
    }
  }
  return Fn::apply(args...);
}

// --- rezero_fc: y = x + alpha * dropout(act(x @ weight^T + bias)) -----------------------

using FcSig = TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, c10::string_view, double, const at::Tensor&);
using FcBwdSig = TensorQuad(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, c10::string_view, double,
                            const at::Tensor&, std::array<bool, 4>);

struct FcFn : Function<FcFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& bias, const at::Tensor& alpha,
                               c10::string_view activation, double p, const at::Tensor& seed) {
    static const auto impl = op<FcSig>("rezero_kernels::rezero_fc");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, kept] = impl.call(x, weight, bias, alpha, activation, p, seed);
    ctx->saved_data["p"] = p;
    ctx->saved_data["activation"] = std::string(activation);
    ctx->save_for_backward({x, weight, alpha, kept, seed});
    ctx->mark_non_differentiable({kept});
    return {y, kept};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto impl = op<FcBwdSig>("rezero_kernels::rezero_fc_backward");
    const auto s = ctx->get_saved_variables();
    const std::array<bool, 4> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      ctx->needs_input_grad(2), ctx->needs_input_grad(3)};
    at::Tensor gx, gw, gb, ga;
    if (mask[0] || mask[1] || mask[2] || mask[3])
      std::tie(gx, gw, gb, ga) =
          impl.call(grads[0].contiguous(), s[0], s[1], s[2], s[3],
                    ctx->saved_data["activation"].toStringRef(), ctx->saved_data["p"].toDouble(),
                    s[4], mask);
    return {gx, gw, gb, ga, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor residual_autograd(const at::Tensor& x, const at::Tensor& fx, const at::Tensor& alpha,
                             double p, const at::Tensor& seed) {
  return apply<ResidualFn>(x, fx, alpha, p, seed);
}

at::Tensor bias_act_autograd(const at::Tensor& h, const at::Tensor& bias,
                             c10::string_view activation, double p, const at::Tensor& seed) {
  return apply<BiasActFn>(h, bias, activation, p, seed);
}

at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& inp, const at::Tensor& weight,
                           const at::Tensor& bias, const at::Tensor& alpha, double p,
                           const at::Tensor& seed) {
  return apply<LinearFn>(x, inp, weight, bias, alpha, p, seed);
}

TensorPair rezero_fc_autograd(const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& bias, const at::Tensor& alpha,
                              c10::string_view activation, double p, const at::Tensor& seed) {
  const variable_list out = apply<FcFn>(x, weight, bias, alpha, activation, p, seed);
  return {out[0], out[1]};
}

// --- the backward ops: a second backward through them is an error -------------------------

struct NoDoubleBackward : Function<NoDoubleBackward> {
  // Connects `results` (computed below autograd) to the backward op's tensor `inputs` through
  // one node that raises if a second backward reaches it.
  static variable_list forward(AutogradContext*, at::TensorList inputs, at::TensorList results) {
    return results.vec();
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK_NOT_IMPLEMENTED(false,
                                "rezero_kernels: double backward (create_graph=True, then a "
                                "second backward through the gradient) is not implemented for "
                                "the fused ops; use backend='torch' for it");
  }
};

template <class... T>
variable_list defined_tensors(const T&... values) {
  variable_list out;
  auto add = [&](const auto& v) {
    if constexpr (std::is_same_v<std::decay_t<decltype(v)>, at::Tensor>)
      if (v.defined()) out.push_back(v);
  };
  (add(values), ...);
  return out;
}

// Runs a backward op below autograd; when grad mode is on (create_graph=True) its outputs get a
// node that raises if differentiated.
template <class Signature, class Out, class... Args>
Out below_autograd(const char* name, const Args&... args) {
  static const auto impl = op<Signature>(name);
  Out out;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    out = impl.call(args...);
  }
  if (!at::GradMode::is_enabled()) return out;
  const variable_list inputs = defined_tensors(args...);
  const variable_list results =
      std::apply([](const auto&... t) { return defined_tensors(t...); }, out);
  const variable_list linked =
      NoDoubleBackward::apply(at::TensorList(inputs), at::TensorList(results));
  size_t i = 0;
  std::apply([&](auto&... t) { ((t = t.defined() ? linked[i++] : t), ...); }, out);
  return out;
}

TensorPair residual_backward_autograd(const at::Tensor& grad, const at::Tensor& fx,
                                      const at::Tensor& alpha, double p, const at::Tensor& seed) {
  return below_autograd<ResidualBwdSig, TensorPair>("rezero_kernels::residual_backward", grad,
                                                    fx, alpha, p, seed);
}

TensorPair bias_act_backward_autograd(const at::Tensor& grad, const at::Tensor& h,
                                      const at::Tensor& bias, c10::string_view activation,
                                      double p, const at::Tensor& seed) {
  return below_autograd<BiasActBwdSig, TensorPair>("rezero_kernels::bias_act_dropout_backward",
                                                   grad, h, bias, activation, p, seed);
}

TensorQuad linear_backward_autograd(const at::Tensor& grad, const at::Tensor& inp,
                                    const at::Tensor& weight, const at::Tensor& bias,
                                    const at::Tensor& alpha, double p, const at::Tensor& seed,
                                    std::array<bool, 4> mask) {
  return below_autograd<LinearBwdSig, TensorQuad>("rezero_kernels::linear_residual_backward",
                                                  grad, inp, weight, bias, alpha, p, seed, mask);
}

TensorQuad rezero_fc_backward_autograd(const at::Tensor& grad, const at::Tensor& x,
                                      const at::Tensor& weight, const at::Tensor& alpha,
                                      const at::Tensor& kept, c10::string_view activation,
                                      double p, const at::Tensor& seed, std::array<bool, 4> mask) {
  return below_autograd<FcBwdSig, TensorQuad>("rezero_kernels::rezero_fc_backward", grad, x,
                                              weight, alpha, kept, activation, p, seed, mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(rezero_kernels, Autograd, m) {
  m.impl("residual", &residual_autograd);
  m.impl("residual_backward", &residual_backward_autograd);
  m.impl("bias_act_dropout", &bias_act_autograd);
  m.impl("bias_act_dropout_backward", &bias_act_backward_autograd);
  m.impl("linear_residual", &linear_autograd);
  m.impl("linear_residual_backward", &linear_backward_autograd);
  m.impl("rezero_fc", &rezero_fc_autograd);
  m.impl("rezero_fc_backward", &rezero_fc_backward_autograd);
}

}  // namespace rezero
