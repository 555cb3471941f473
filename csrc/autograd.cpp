// Autograd for the ops, in C++ (the Autograd dispatch key), so that a training step pays no
// Python on the way forward or back.  Each forward op runs below autograd and, when an input
// requires grad, records one node, written out as torch's generated nodes are (a Node subclass
// with its saved variables as members: a torch::autograd::Function costs about twice the host
// time per op); its apply calls the matching *_backward op.  What each keeps for backward
// (never a dropout mask: the seed regenerates it):
//   residual          fx, alpha, seed              (not x: grad_x is grad itself)
//   bias_act_dropout  h, bias, seed                (relu, whose kept_for_backward is its output:
//                                                   y and no bias, since y > 0 exactly where
//                                                   relu passes gradient)
//   gated_act_dropout gate_up, seed                (not act(g), the product or a mask)
//   linear_residual   inp, weight, bias, alpha, seed  (not the GEMM output; linear_residual.cpp)
//   gated_linear_residual  gate_up, weight, alpha, both seeds  (not the hidden: recomputed;
//                     gated_linear.cpp)
//   rezero_fc         x, weight, bias, alpha, seed and act(F) or the GEMM output (rezero_fc.cpp)
// The *_backward ops are not differentiable: their Autograd kernels record a node that raises if
// a second backward reaches it.  Inputs whose gradient nobody asked for are skipped
// (task_should_compute_output, passed on as output_mask): the GEMMs of linear_residual's and
// rezero_fc's backward, and the reductions behind grad_alpha and grad_bias.
#include <ATen/ATen.h>
#include <ATen/FuncTorchTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <array>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include "op_calls.h"
#include "op_checks.h"

namespace rezero {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Function;
using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// --- recording a node ------------------------------------------------------------------------

// Nodes are owned by std::shared_ptr in torch 2.11 and by c10::intrusive_ptr in torch 2.13; an
// Edge holds whichever this torch uses.
using NodeOwner = decltype(torch::autograd::Edge::function);

// deleteNode (torch 2.11) frees a long chain of nodes without deep recursion: a 10,000-layer
// net is such a chain.  Looked up only when instantiated, so torch 2.13 never needs it.
template <class N>
void delete_node(N* node) {
  deleteNode(node);
}

template <class N>
auto make_node() {
  if constexpr (std::is_same_v<NodeOwner, std::shared_ptr<Node>>)
    return std::shared_ptr<N>(new N(), &delete_node<N>);
  else
    return c10::make_intrusive<N>();
}

// torch.func's grad/vjp/jvp and forward-mode AD cannot differentiate through these nodes; say so
// in our terms (torch's own message names neither the op nor a way out).  vmap alone is fine.
template <class... Tensors>
void check_differentiable_here(const Tensors&... inputs) {
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
  TORCH_CHECK_NOT_IMPLEMENTED(!(torch::autograd::isFwGradDefined(inputs) || ...),
                              "rezero_kernels: forward-mode AD (dual tensors) is not implemented "
                              "for the fused ops; use backend='torch' for it");
}

// A node for `out` with an edge to each of `inputs` (an undefined tensor: an absent optional
// input, whose edge is empty), or nullptr when none requires grad (or grad mode is off).
template <class N, class... Inputs>
auto record(const at::Tensor& out, const Inputs&... inputs) -> decltype(make_node<N>()) {
  if (!torch::autograd::compute_requires_grad(inputs...)) return nullptr;
  auto node = make_node<N>();
  node->set_next_edges(torch::autograd::collect_next_edges(inputs...));
  torch::autograd::set_history(out, node);
  return node;
}

at::Tensor or_undefined(const OptTensor& t) { return present(t) ? *t : at::Tensor(); }

// The undefined tensor, for an input whose gradient is not computed.
at::Tensor if_wanted(bool wanted, const at::Tensor& grad) { return wanted ? grad : at::Tensor(); }

// --- residual: y = x + alpha * dropout(fx) ------------------------------------------------

struct ResidualBackward : Node {  // edges: x, fx, alpha
  SavedVariable fx, alpha, seed;
  double p = 0.0;

  variable_list apply(variable_list&& grads) override {
    const auto& impl = ops::residual_backward();
    if (!grads[0].defined()) return variable_list(3);
    const at::Tensor grad = grads[0].contiguous();
    const Mask2 mask = {task_should_compute_output(1), task_should_compute_output(2)};
    at::Tensor grad_fx, grad_alpha;
    if (mask[0] || mask[1])
      std::tie(grad_fx, grad_alpha) =
          impl.call(grad, fx.unpack(), alpha.unpack(), p, seed.unpack(), mask);
    return {if_wanted(task_should_compute_output(0), grad), grad_fx, grad_alpha};
  }
  std::string name() const override { return "rezero_kernels::ResidualBackward"; }
  void release_variables() override {
    fx.reset_data();
    alpha.reset_data();
    seed.reset_data();
  }
};

at::Tensor residual_autograd(const at::Tensor& x, const at::Tensor& fx, const at::Tensor& alpha,
                             double p, const at::Tensor& seed) {
  const auto& impl = ops::residual();
    check_differentiable_here(x, fx, alpha);
  at::Tensor y;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    y = impl.call(x, fx, alpha, p, seed);
  }
  if (auto node = record<ResidualBackward>(y, x, fx, alpha)) {
    node->fx = SavedVariable(fx, false);
    node->alpha = SavedVariable(alpha, false);
    node->seed = SavedVariable(seed, false);
    node->p = p;
  }
  return y;
}

// --- bias_act_dropout: y = dropout(act(h + bias)) -----------------------------------------

struct BiasActBackward : Node {  // edges: h, bias (empty without one)
  SavedVariable kept, bias, seed;  // kept: h, or y when act' is a function of the output
  std::string activation;
  double p = 0.0;

  variable_list apply(variable_list&& grads) override {
    const auto& impl = ops::bias_act_dropout_backward();
    if (!grads[0].defined()) return variable_list(2);
    const Mask2 mask = {task_should_compute_output(0), task_should_compute_output(1)};
    at::Tensor grad_h, grad_bias;
    if (mask[0] || mask[1])
      std::tie(grad_h, grad_bias) = impl.call(grads[0].contiguous(), kept.unpack(getptr()),
                                              bias.unpack(), activation, p, seed.unpack(), mask);
    return {grad_h, grad_bias};
  }
  std::string name() const override { return "rezero_kernels::BiasActDropoutBackward"; }
  void release_variables() override {
    kept.reset_data();
    bias.reset_data();
    seed.reset_data();
  }
};

at::Tensor bias_act_autograd(const at::Tensor& h, const OptTensor& bias,
                             c10::string_view activation, double p, const at::Tensor& seed) {
  const auto& impl = ops::bias_act_dropout();
    check_differentiable_here(h, bias);
  at::Tensor y;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    y = impl.call(h, bias, activation, p, seed);
  }
  if (auto node = record<BiasActBackward>(y, h, or_undefined(bias))) {
    const bool keep_output = kept_for_backward(parse_activation(activation)) == Kept::kOutput;
    node->kept = keep_output ? SavedVariable(y, true) : SavedVariable(h, false);
    node->bias = SavedVariable(keep_output ? at::Tensor() : or_undefined(bias), false);
    node->seed = SavedVariable(seed, false);
    node->activation = std::string(activation);
    node->p = p;
  }
  return y;
}

// --- gated_act_dropout: y = dropout(act(g) * u), [g | u] = gate_up ----------------------

struct GatedActBackward : Node {  // edges: gate_up
  SavedVariable gate_up, seed;
  std::string activation;
  double p = 0.0;

  variable_list apply(variable_list&& grads) override {
    const auto& impl = ops::gated_act_dropout_backward();
    if (!grads[0].defined() || !task_should_compute_output(0)) return variable_list(1);
    return {impl.call(grads[0].contiguous(), gate_up.unpack(), activation, p, seed.unpack())};
  }
  std::string name() const override { return "rezero_kernels::GatedActDropoutBackward"; }
  void release_variables() override {
    gate_up.reset_data();
    seed.reset_data();
  }
};

at::Tensor gated_act_autograd(const at::Tensor& gate_up, c10::string_view activation, double p,
                              const at::Tensor& seed) {
  const auto& impl = ops::gated_act_dropout();
  check_differentiable_here(gate_up);
  at::Tensor y;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    y = impl.call(gate_up, activation, p, seed);
  }
  if (auto node = record<GatedActBackward>(y, gate_up)) {
    node->gate_up = SavedVariable(gate_up, false);
    node->seed = SavedVariable(seed, false);
    node->activation = std::string(activation);
    node->p = p;
  }
  return y;
}

// --- linear_residual: y = x + alpha * dropout(inp @ weight^T + bias) ----------------------

struct LinearBackward : Node {  // edges: x, inp, weight, bias, alpha
  SavedVariable inp, weight, bias, alpha, seed;
  double p = 0.0;

  variable_list apply(variable_list&& grads) override {
    const auto& impl = ops::linear_residual_backward();
    if (!grads[0].defined()) return variable_list(5);
    const at::Tensor grad = grads[0].contiguous();
    const Mask4 mask = {task_should_compute_output(1), task_should_compute_output(2),
                        task_should_compute_output(3), task_should_compute_output(4)};
    at::Tensor gi, gw, gb, ga;
    if (mask[0] || mask[1] || mask[2] || mask[3])
      std::tie(gi, gw, gb, ga) = impl.call(grad, inp.unpack(), weight.unpack(), bias.unpack(),
                                           alpha.unpack(), p, seed.unpack(), mask);
    return {if_wanted(task_should_compute_output(0), grad), gi, gw, gb, ga};
  }
  std::string name() const override { return "rezero_kernels::LinearResidualBackward"; }
  void release_variables() override {
    inp.reset_data();
    weight.reset_data();
    bias.reset_data();
    alpha.reset_data();
    seed.reset_data();
  }
};

at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& inp, const at::Tensor& weight,
                           const at::Tensor& bias, const at::Tensor& alpha, double p,
                           const at::Tensor& seed) {
  const auto& impl = ops::linear_residual();
    check_differentiable_here(x, inp, weight, bias, alpha);
  at::Tensor y;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    y = impl.call(x, inp, weight, bias, alpha, p, seed);
  }
  if (auto node = record<LinearBackward>(y, x, inp, weight, bias, alpha)) {
    node->inp = SavedVariable(inp, false);
    node->weight = SavedVariable(weight, false);
    node->bias = SavedVariable(bias, false);
    node->alpha = SavedVariable(alpha, false);
    node->seed = SavedVariable(seed, false);
    node->p = p;
  }
  return y;
}

// --- gated_linear_residual: y = x + alpha * dropout(gated_act_dropout(gate_up) @ weight^T) --

struct GatedLinearBackward : Node {  // edges: x, gate_up, weight, alpha
  SavedVariable gate_up, weight, alpha, seed_mlp, seed;
  std::string activation;
  double p_mlp = 0.0, p = 0.0;

  variable_list apply(variable_list&& grads) override {
    const auto& impl = ops::gated_linear_residual_backward();
    if (!grads[0].defined()) return variable_list(4);
    const at::Tensor grad = grads[0].contiguous();
    const Mask3 mask = {task_should_compute_output(1), task_should_compute_output(2),
                        task_should_compute_output(3)};
    at::Tensor ggu, gw, ga;
    if (mask[0] || mask[1] || mask[2])
      std::tie(ggu, gw, ga) = impl.call(grad, gate_up.unpack(), weight.unpack(), alpha.unpack(),
                                        activation, p_mlp, seed_mlp.unpack(), p, seed.unpack(),
                                        mask);
    return {if_wanted(task_should_compute_output(0), grad), ggu, gw, ga};
  }
  std::string name() const override { return "rezero_kernels::GatedLinearResidualBackward"; }
  void release_variables() override {
    gate_up.reset_data();
    weight.reset_data();
    alpha.reset_data();
    seed_mlp.reset_data();
    seed.reset_data();
  }
};

at::Tensor gated_linear_autograd(const at::Tensor& x, const at::Tensor& gate_up,
                                 const at::Tensor& weight, const at::Tensor& alpha,
                                 c10::string_view activation, double p_mlp,
                                 const at::Tensor& seed_mlp, double p, const at::Tensor& seed) {
  const auto& impl = ops::gated_linear_residual();
  check_differentiable_here(x, gate_up, weight, alpha);
  at::Tensor y;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    y = impl.call(x, gate_up, weight, alpha, activation, p_mlp, seed_mlp, p, seed);
  }
  if (auto node = record<GatedLinearBackward>(y, x, gate_up, weight, alpha)) {
    node->gate_up = SavedVariable(gate_up, false);
    node->weight = SavedVariable(weight, false);
    node->alpha = SavedVariable(alpha, false);
    node->seed_mlp = SavedVariable(seed_mlp, false);
    node->seed = SavedVariable(seed, false);
    node->activation = std::string(activation);
    node->p_mlp = p_mlp;
    node->p = p;
  }
  return y;
}

// --- rezero_fc: y = x + alpha * dropout(act(x @ weight^T + bias)) -----------------------

struct FcBackward : Node {  // edges: x, weight, bias (empty without one), alpha
  SavedVariable x, weight, bias, alpha, kept, seed;
  std::string activation;
  double p = 0.0;

  variable_list apply(variable_list&& grads) override {
    const auto& impl = ops::rezero_fc_backward();
    if (!grads[0].defined()) return variable_list(4);
    const Mask4 mask = {task_should_compute_output(0), task_should_compute_output(1),
                        task_should_compute_output(2), task_should_compute_output(3)};
    if (!(mask[0] || mask[1] || mask[2] || mask[3])) return variable_list(4);
    auto [gx, gw, gb, ga] =
        impl.call(grads[0].contiguous(), x.unpack(), weight.unpack(), bias.unpack(),
                  alpha.unpack(), kept.unpack(), activation, p, seed.unpack(), mask);
    return {gx, gw, gb, ga};
  }
  std::string name() const override { return "rezero_kernels::ReZeroFCBackward"; }
  void release_variables() override {
    x.reset_data();
    weight.reset_data();
    bias.reset_data();
    alpha.reset_data();
    kept.reset_data();
    seed.reset_data();
  }
};

// y gets the node; kept (what backward needs of F) is not differentiable.
TensorPair rezero_fc_autograd(const at::Tensor& x, const at::Tensor& weight,
                              const OptTensor& bias, const at::Tensor& alpha,
                              c10::string_view activation, double p, const at::Tensor& seed) {
  const auto& impl = ops::rezero_fc();
    check_differentiable_here(x, weight, bias, alpha);
  at::Tensor y, kept;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    std::tie(y, kept) = impl.call(x, weight, bias, alpha, activation, p, seed);
  }
  if (auto node = record<FcBackward>(y, x, weight, or_undefined(bias), alpha)) {
    node->x = SavedVariable(x, false);
    node->weight = SavedVariable(weight, false);
    node->bias = SavedVariable(or_undefined(bias), false);
    node->alpha = SavedVariable(alpha, false);
    node->kept = SavedVariable(kept, false);
    node->seed = SavedVariable(seed, false);
    node->activation = std::string(activation);
    node->p = p;
  }
  return {y, kept};
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
    using V = std::decay_t<decltype(v)>;
    if constexpr (std::is_same_v<V, at::Tensor>) {
      if (v.defined()) out.push_back(v);
    } else if constexpr (std::is_same_v<V, OptTensor>) {
      if (present(v)) out.push_back(*v);
    }
  };
  (add(values), ...);
  return out;
}

// Runs a backward op below autograd; when grad mode is on (create_graph=True) its outputs get a
// node that raises if differentiated.
template <class Signature, class... Args>
auto below_autograd(const c10::TypedOperatorHandle<Signature>& impl, const Args&... args) {
  typename c10::guts::function_traits<Signature>::return_type out;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    out = impl.call(args...);
  }
  if (!at::GradMode::is_enabled()) return out;
  // the outputs as a tuple of references (one tensor, or each element of a tuple of them)
  auto outputs = [&] {
    if constexpr (std::is_same_v<decltype(out), at::Tensor>)
      return std::tie(out);
    else
      return std::apply([](auto&... t) { return std::tie(t...); }, out);
  }();
  const variable_list inputs = defined_tensors(args...);
  const variable_list results =
      std::apply([](const auto&... t) { return defined_tensors(t...); }, outputs);
  const variable_list linked =
      NoDoubleBackward::apply(at::TensorList(inputs), at::TensorList(results));
  size_t i = 0;
  std::apply([&](auto&... t) { ((t = t.defined() ? linked[i++] : t), ...); }, outputs);
  return out;
}

TensorPair residual_backward_autograd(const at::Tensor& grad, const at::Tensor& fx,
                                      const at::Tensor& alpha, double p, const at::Tensor& seed,
                                      Mask2 mask) {
  return below_autograd(ops::residual_backward(), grad, fx, alpha, p, seed, mask);
}

TensorPair bias_act_backward_autograd(const at::Tensor& grad, const at::Tensor& h,
                                      const OptTensor& bias, c10::string_view activation,
                                      double p, const at::Tensor& seed, Mask2 mask) {
  return below_autograd(ops::bias_act_dropout_backward(), grad, h, bias, activation, p, seed,
                        mask);
}

at::Tensor gated_act_backward_autograd(const at::Tensor& grad, const at::Tensor& gate_up,
                                      c10::string_view activation, double p,
                                      const at::Tensor& seed) {
  return below_autograd(ops::gated_act_dropout_backward(), grad, gate_up, activation, p, seed);
}

TensorTriple gated_linear_backward_autograd(const at::Tensor& grad, const at::Tensor& gate_up,
                                           const at::Tensor& weight, const at::Tensor& alpha,
                                           c10::string_view activation, double p_mlp,
                                           const at::Tensor& seed_mlp, double p,
                                           const at::Tensor& seed, Mask3 mask) {
  return below_autograd(ops::gated_linear_residual_backward(), grad, gate_up, weight, alpha,
                        activation, p_mlp, seed_mlp, p, seed, mask);
}

TensorQuad linear_backward_autograd(const at::Tensor& grad, const at::Tensor& inp,
                                    const at::Tensor& weight, const at::Tensor& bias,
                                    const at::Tensor& alpha, double p, const at::Tensor& seed,
                                    Mask4 mask) {
  return below_autograd(ops::linear_residual_backward(), grad, inp, weight, bias, alpha, p, seed,
                        mask);
}

TensorQuad rezero_fc_backward_autograd(const at::Tensor& grad, const at::Tensor& x,
                                      const at::Tensor& weight, const OptTensor& bias,
                                      const at::Tensor& alpha, const at::Tensor& kept,
                                      c10::string_view activation, double p,
                                      const at::Tensor& seed, Mask4 mask) {
  return below_autograd(ops::rezero_fc_backward(), grad, x, weight, bias, alpha, kept,
                        activation, p, seed, mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(rezero_kernels, Autograd, m) {
  m.impl("residual", &residual_autograd);
  m.impl("residual_backward", &residual_backward_autograd);
  m.impl("bias_act_dropout", &bias_act_autograd);
  m.impl("bias_act_dropout_backward", &bias_act_backward_autograd);
  m.impl("gated_act_dropout", &gated_act_autograd);
  m.impl("gated_act_dropout_backward", &gated_act_backward_autograd);
  m.impl("gated_linear_residual", &gated_linear_autograd);
  m.impl("gated_linear_residual_backward", &gated_linear_backward_autograd);
  m.impl("linear_residual", &linear_autograd);
  m.impl("linear_residual_backward", &linear_backward_autograd);
  m.impl("rezero_fc", &rezero_fc_autograd);
  m.impl("rezero_fc_backward", &rezero_fc_backward_autograd);
}

}  // namespace rezero
