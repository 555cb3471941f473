// rezero_kernels._C: the eager entry points of the "cpu" and "cuda" backends.
//
// A fused op exists to save time, and at small sizes (and on a GPU at any size) most of an op's
// time is spent on the host.  So rezero_kernels.functional hands its arguments straight here:
// when they already have the form the op schemas expect (op_checks.h), one C++ call draws the
// dropout seed and runs the op (its autograd is in autograd.cpp).  Anything else (another
// type, a tensor subclass, mixed dtypes, a strided input, autocast, a bad argument) returns
// None, and the Python wrapper takes its general path, which converts the inputs or raises an
// error that names the problem.  Under torch.compile the Python path is always taken.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>
#include <torch/extension.h>

#include "op_calls.h"
#include "op_checks.h"

namespace rezero {
namespace {

namespace py = pybind11;

// The tensor behind h, or nullptr unless h is exactly a torch.Tensor or nn.Parameter.
const at::Tensor* tensor(py::handle h) {
  return THPVariable_CheckExact(h.ptr()) ? &THPVariable_Unpack(h.ptr()) : nullptr;
}

// The dropout probability the op sees (0 when not training), or -1 when p or training is not a
// plain float/int and bool, or p is outside [0, 1).
double probability(py::handle p, py::handle training) {
  double value = 0.0;
  if (PyFloat_CheckExact(p.ptr())) value = PyFloat_AS_DOUBLE(p.ptr());
  else if (PyLong_CheckExact(p.ptr())) value = static_cast<double>(PyLong_AsLong(p.ptr()));
  else return -1.0;
  if (!(value >= 0.0 && value < 1.0) || !PyBool_Check(training.ptr())) return -1.0;
  return training.ptr() == Py_True ? value : 0.0;
}

// [key, counter_base] for dropout on `like`'s device: torch.randint(0, 2**62, (2,)) (what the
// general path, compiled_ops.new_seed, draws), so both paths give one mask for one torch seed.
// On CPU the same two draws of the default generator are made here, without randint's dispatch
// (a test checks they match randint's).  Without dropout no tensor at all: the ops never read
// the seed when p == 0, so an undefined tensor stands for it (the Python path, which cannot pass
// one, passes an empty tensor).
at::Tensor new_seed(double p, const at::Tensor& like) {
  if (p == 0.0) return at::Tensor();
  constexpr int64_t kRange = int64_t{1} << 62;
  if (!like.device().is_cpu()) return at::randint(0, kRange, {2}, like.options().dtype(at::kLong));
  at::Tensor seed = at::empty({2}, like.options().dtype(at::kLong));
  int64_t* s = seed.data_ptr<int64_t>();
  auto generator = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(generator.mutex());
  auto* cpu = at::check_generator<at::CPUGeneratorImpl>(generator);
  for (int i = 0; i < 2; ++i) s[i] = static_cast<int64_t>(cpu->random64() % kRange);
  return seed;
}

// A gate or bias vector for data of type `data_type` with `channels` channels on `device`, in
// the data's math type (a differentiable cast where needed); undefined when v is not one.
at::Tensor vector_for(const at::Tensor* v, at::ScalarType data_type, c10::Device device,
                      int64_t channels, bool allow_scalar) {
  if (v == nullptr || !is_float_type(v->scalar_type())) return at::Tensor();
  at::Tensor t = (allow_scalar && v->dim() == 0) ? v->reshape({1}) : *v;
  const auto math = math_type(data_type);
  if (t.scalar_type() != math && t.device() == device) t = t.to(math);
  return is_vector(t, data_type, device, channels, allow_scalar) ? t : at::Tensor();
}

at::Tensor vector_for(const at::Tensor* v, const at::Tensor& data, bool allow_scalar) {
  return vector_for(v, data.scalar_type(), data.device(), channels_of(data), allow_scalar);
}

bool on_supported_device(const at::Tensor& t) {
  return t.device().is_cpu() || t.device().is_cuda();
}

py::object wrap(at::Tensor t) { return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(t))); }

py::object residual(py::handle x_, py::handle fx_, py::handle alpha_, py::handle p_,
                    py::handle training) {
  const at::Tensor *x = tensor(x_), *fx = tensor(fx_);
  const double p = probability(p_, training);
  // (0-dim x: the Python path, where a (1,) gate broadcasts the result to (1,), as in eager)
  if (!x || !fx || p < 0 || !is_data(*x) || x->dim() == 0 || !is_like(*x, *fx) ||
      !on_supported_device(*x))
    return py::none();
  const at::Tensor alpha = vector_for(tensor(alpha_), *x, /*allow_scalar=*/true);
  if (!alpha.defined()) return py::none();
  return wrap(ops::residual().call(*x, *fx, alpha, p, new_seed(p, *x)));
}

// The activation named by h, or false.
bool activation_of(py::handle h, std::string* name) {
  Act act;
  if (!PyUnicode_CheckExact(h.ptr())) return false;
  *name = py::cast<std::string>(h);
  return lookup_activation(*name, &act);
}

at::Tensor call_bias_act(const at::Tensor& h, const OptTensor& bias, const std::string& act,
                         double p) {
  return ops::bias_act_dropout().call(h, bias, act, p, new_seed(p, h));
}

py::object bias_act_dropout(py::handle h_, py::handle bias_, py::handle activation,
                            py::handle p_, py::handle training) {
  const at::Tensor* h = tensor(h_);
  const double p = probability(p_, training);
  std::string act;
  if (!h || p < 0 || !activation_of(activation, &act) || !is_data(*h) || h->dim() == 0 ||
      !on_supported_device(*h))
    return py::none();
  if (bias_.is_none()) return wrap(call_bias_act(*h, std::nullopt, act, p));
  const at::Tensor bias = vector_for(tensor(bias_), *h, /*allow_scalar=*/false);
  if (!bias.defined()) return py::none();
  return wrap(call_bias_act(*h, bias, act, p));
}

py::object gated_act_dropout(py::handle gate_up_, py::handle activation, py::handle p_,
                             py::handle training) {
  const at::Tensor* gate_up = tensor(gate_up_);
  const double p = probability(p_, training);
  std::string act;
  if (!gate_up || p < 0 || !activation_of(activation, &act) || !is_data(*gate_up) ||
      gate_up->dim() == 0 || gate_up->size(-1) % 2 != 0 || !on_supported_device(*gate_up))
    return py::none();
  return wrap(ops::gated_act_dropout().call(*gate_up, act, p, new_seed(p, *gate_up)));
}

// bias=None of rezero_linear's GEMM: zeros of the weight's dtype (as the general path adds);
// undefined when a bias was given or weight is not a matrix.
at::Tensor zeros_for(py::handle bias, const at::Tensor* weight) {
  if (!bias.is_none() || !weight || weight->dim() != 2) return at::Tensor();
  return at::zeros({weight->size(0)}, weight->options());
}

// inp, weight and bias (nullptr: none) of a GEMM: one float dtype, one device, weight 2-D and
// matching inp, no autocast to apply.
bool is_gemm(const at::Tensor* inp, const at::Tensor* weight, const at::Tensor* bias) {
  if (!inp || !weight || !on_supported_device(*inp)) return false;
  const auto st = inp->scalar_type();
  const bool bias_ok = bias == nullptr || (bias->scalar_type() == st &&
                                           bias->device() == inp->device() && bias->dim() == 1 &&
                                           bias->size(0) == weight->size(0));
  return is_float_type(st) && weight->scalar_type() == st && weight->device() == inp->device() &&
         weight->dim() == 2 && inp->dim() >= 1 && inp->size(-1) == weight->size(1) && bias_ok &&
         !at::autocast::is_autocast_enabled(inp->device().type());
}

// The bias argument of a GEMM entry point: {true, nullptr} for None, {true, tensor} for a plain
// tensor, {false, nullptr} for anything else.
std::pair<bool, const at::Tensor*> optional_tensor(py::handle h) {
  if (h.is_none()) return {true, nullptr};
  const at::Tensor* t = tensor(h);
  return {t != nullptr, t};
}

py::object rezero_linear(py::handle x_, py::handle inp_, py::handle weight_, py::handle bias_,
                         py::handle alpha_, py::handle p_, py::handle training) {
  const at::Tensor *x = tensor(x_), *inp = tensor(inp_), *weight = tensor(weight_);
  const double p = probability(p_, training);
  const at::Tensor zero_bias = zeros_for(bias_, weight);
  const at::Tensor* bias = bias_.is_none() ? &zero_bias : tensor(bias_);
  if (!x || p < 0 || !bias || !is_gemm(inp, weight, bias) || !is_data(*x) ||
      x->scalar_type() != inp->scalar_type() || x->device() != inp->device() ||
      x->dim() != inp->dim() || x->size(-1) != weight->size(0) ||
      !x->sizes().slice(0, x->dim() - 1).equals(inp->sizes().slice(0, inp->dim() - 1)))
    return py::none();
  const at::Tensor alpha = vector_for(tensor(alpha_), *x, /*allow_scalar=*/true);
  if (!alpha.defined()) return py::none();
  return wrap(ops::linear_residual().call(*x, *inp, *weight, *bias, alpha, p, new_seed(p, *x)));
}

py::object rezero_gated_linear(py::handle x_, py::handle gate_up_, py::handle weight_,
                               py::handle alpha_, py::handle activation, py::handle p_mlp_,
                               py::handle p_, py::handle training) {
  const at::Tensor *x = tensor(x_), *gate_up = tensor(gate_up_), *weight = tensor(weight_);
  const double p_mlp = probability(p_mlp_, training), p = probability(p_, training);
  std::string act;
  if (!x || !gate_up || !weight || p < 0 || p_mlp < 0 || !activation_of(activation, &act) ||
      !is_data(*x) || !is_data(*gate_up) || !on_supported_device(*x) || x->dim() == 0 ||
      gate_up->scalar_type() != x->scalar_type() || weight->scalar_type() != x->scalar_type() ||
      gate_up->device() != x->device() || weight->device() != x->device() ||
      weight->dim() != 2 || gate_up->dim() != x->dim() ||
      gate_up->size(-1) != 2 * weight->size(1) || x->size(-1) != weight->size(0) ||
      !x->sizes().slice(0, x->dim() - 1).equals(gate_up->sizes().slice(0, x->dim() - 1)) ||
      at::autocast::is_autocast_enabled(x->device().type()))
    return py::none();
  const at::Tensor alpha = vector_for(tensor(alpha_), *x, /*allow_scalar=*/true);
  if (!alpha.defined()) return py::none();
  const at::Tensor seed_mlp = new_seed(p_mlp, *x);  // drawn first, as the general path does
  const at::Tensor seed = new_seed(p, *x);
  return wrap(ops::gated_linear_residual().call(*x, *gate_up, *weight, alpha, act, p_mlp,
                                                seed_mlp, p, seed));
}

py::object linear_bias_act_dropout(py::handle inp_, py::handle weight_, py::handle bias_,
                                   py::handle activation, py::handle p_, py::handle training) {
  const at::Tensor *inp = tensor(inp_), *weight = tensor(weight_);
  const auto [bias_ok, bias_in] = optional_tensor(bias_);
  const double p = probability(p_, training);
  std::string act;
  if (p < 0 || !bias_ok || !is_gemm(inp, weight, bias_in) || !activation_of(activation, &act))
    return py::none();
  const at::Tensor h = at::matmul(*inp, weight->t());
  if (bias_in == nullptr) return wrap(call_bias_act(h, std::nullopt, act, p));
  const at::Tensor bias = vector_for(bias_in, inp->scalar_type(), inp->device(), weight->size(0),
                                     /*allow_scalar=*/false);
  if (!bias.defined()) return py::none();
  return wrap(call_bias_act(h, bias, act, p));
}

py::object rezero_fc(py::handle x_, py::handle weight_, py::handle bias_, py::handle alpha_,
                     py::handle activation, py::handle p_, py::handle training) {
  const at::Tensor *x = tensor(x_), *weight = tensor(weight_);
  const auto [bias_ok, bias] = optional_tensor(bias_);
  const double p = probability(p_, training);
  std::string act;
  if (!x || p < 0 || !bias_ok || !activation_of(activation, &act) ||
      !is_gemm(x, weight, bias) || !is_data(*x) || weight->size(0) != weight->size(1))
    return py::none();
  const at::Tensor alpha = vector_for(tensor(alpha_), *x, /*allow_scalar=*/true);
  if (!alpha.defined()) return py::none();
  const OptTensor b = bias ? OptTensor(*bias) : std::nullopt;
  return wrap(std::get<0>(ops::rezero_fc().call(*x, *weight, b, alpha, act, p, new_seed(p, *x))));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rezero_kernels' compiled ops (registered on import) and their eager entry points";
  m.def("residual", &residual);
  m.def("bias_act_dropout", &bias_act_dropout);
  m.def("gated_act_dropout", &gated_act_dropout);
  m.def("rezero_linear", &rezero_linear);
  m.def("rezero_gated_linear", &rezero_gated_linear);
  m.def("linear_bias_act_dropout", &linear_bias_act_dropout);
  m.def("rezero_fc", &rezero_fc);
  m.def("new_seed", [](double p, const at::Tensor& like) { return wrap(new_seed(p, like)); },
        "the seed the entry points draw (for tests)");
}

}  // namespace rezero
