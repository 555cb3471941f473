// The op schemas: declared once here; each device registers its kernels for them
// (csrc/cpu/*.cpp for CPU, csrc/cuda/binding.cpp for CUDA, linear_residual.cpp,
// gated_linear.cpp and rezero_fc.cpp for both);
// autograd.cpp registers their autograd, rezero_kernels/compiled_ops.py their fake (meta)
// kernels, and fast_path.cpp is the Python module rezero_kernels._C (the eager entry points).
//
// Conventions every kernel can rely on (rezero_kernels/compiled_ops.py makes them hold):
//  * data tensors are contiguous, of one dtype (float32, float64, bfloat16 or float16), viewed
//    as (rows, C) with C the last dimension;
//  * alpha and bias of the elementwise ops are contiguous vectors of length 1 or C in the
//    "math" dtype (float32, or float64 for float64 data); gradients of them come back in it;
//  * seed is an int64 tensor [key, counter_base] on the data's device: dropout element i is
//    kept iff Philox4x32-10(key, counter = counter_base * 2^64 + i / 4)[i % 4] < (1-p) * 2^32;
//  * p in [0, 1); p == 0 takes the no-dropout path and never reads seed (the callers pass an
//    empty tensor, or from C++ an undefined one);
//  * bias may be None: no bias (nothing is allocated for it);
//  * output_mask says which gradients a backward op returns (the others come back undefined)
//    and skips the work only they need: a GEMM, or a reduction (grad_alpha, grad_bias).
// op_checks.h states these conventions once, as predicates and as checks.
#include <torch/library.h>

TORCH_LIBRARY(rezero_kernels, m) {
  m.def("residual(Tensor x, Tensor fx, Tensor alpha, float p, Tensor seed) -> Tensor");
  // The same written over fx, CPU only: linear_residual's epilogue on its own GEMM result, which
  // nothing else holds (a fresh CPU buffer is page-faulted in; CUDA's caching allocator's is not).
  m.def("residual_into_fx(Tensor x, Tensor(a!) fx, Tensor alpha, float p, Tensor seed) -> ()");
  // grad_fx is computed whenever either gradient is asked for; fx is read only for grad_alpha.
  m.def("residual_backward(Tensor grad, Tensor fx, Tensor alpha, float p, Tensor seed,"
        " bool[2] output_mask) -> (Tensor grad_fx, Tensor grad_alpha)");
  m.def("bias_act_dropout(Tensor h, Tensor? bias, str activation, float p, Tensor seed)"
        " -> Tensor");
  // grad_bias: the column sums of grad_h (also without a bias: what a bias would receive).
  m.def("bias_act_dropout_backward(Tensor grad, Tensor h, Tensor? bias, str activation, float p,"
        " Tensor seed, bool[2] output_mask) -> (Tensor grad_h, Tensor grad_bias)");
  // gate_up holds [g | u] on its last dimension (2 H); y = dropout(act(g) * u) has H there, and
  // dropout element i is the i-th element of y.  Backward keeps gate_up alone and returns the
  // gradient of all of it: [grad * m * u * act'(g) | grad * m * act(g)].
  m.def("gated_act_dropout(Tensor gate_up, str activation, float p, Tensor seed) -> Tensor");
  m.def("gated_act_dropout_backward(Tensor grad, Tensor gate_up, str activation, float p,"
        " Tensor seed) -> Tensor");
  // y = x + alpha * dropout(gated_act_dropout(gate_up) @ weight^T) (gated_linear.cpp): a gated
  // MLP's tail; backward recomputes the hidden from gate_up.  seed_mlp is the hidden's dropout.
  m.def("gated_linear_residual(Tensor x, Tensor gate_up, Tensor weight, Tensor alpha,"
        " str activation, float p_mlp, Tensor seed_mlp, float p, Tensor seed) -> Tensor");
  m.def("gated_linear_residual_backward(Tensor grad, Tensor gate_up, Tensor weight,"
        " Tensor alpha, str activation, float p_mlp, Tensor seed_mlp, float p, Tensor seed,"
        " bool[3] output_mask) -> (Tensor grad_gate_up, Tensor grad_weight, Tensor grad_alpha)");
  m.def("linear_residual(Tensor x, Tensor inp, Tensor weight, Tensor bias, Tensor alpha, float p,"
        " Tensor seed) -> Tensor");
  // y and what backward keeps (rezero_fc.cpp): act(F) where act' is a function of it (identity,
  // relu), else the GEMM's output (F, or x @ weight^T when the activation adds the bias).
  m.def("rezero_fc(Tensor x, Tensor weight, Tensor? bias, Tensor alpha, str activation, float p,"
        " Tensor seed) -> (Tensor y, Tensor kept)");
  m.def("rezero_fc_backward(Tensor grad, Tensor x, Tensor weight, Tensor? bias, Tensor alpha,"
        " Tensor kept, str activation, float p, Tensor seed, bool[4] output_mask)"
        " -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_alpha)");
  m.def("linear_residual_backward(Tensor grad, Tensor inp, Tensor weight, Tensor bias,"
        " Tensor alpha, float p, Tensor seed, bool[4] output_mask)"
        " -> (Tensor grad_inp, Tensor grad_weight, Tensor grad_bias, Tensor grad_alpha)");
}
