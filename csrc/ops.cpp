// The op schemas: declared once here; each device registers its kernels for them
// (csrc/cpu/*.cpp for CPU, csrc/cuda/binding.cpp for CUDA, linear_residual.cpp and
// rezero_fc.cpp for both);
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
//    empty tensor).
// op_checks.h states these conventions once, as predicates and as checks.
#include <torch/library.h>

TORCH_LIBRARY(rezero_kernels, m) {
  m.def("residual(Tensor x, Tensor fx, Tensor alpha, float p, Tensor seed) -> Tensor");
  m.def("residual_backward(Tensor grad, Tensor fx, Tensor alpha, float p, Tensor seed)"
        " -> (Tensor grad_fx, Tensor grad_alpha)");
  m.def("bias_act_dropout(Tensor h, Tensor bias, str activation, float p, Tensor seed) -> Tensor");
  m.def("bias_act_dropout_backward(Tensor grad, Tensor h, Tensor bias, str activation, float p,"
        " Tensor seed) -> (Tensor grad_h, Tensor grad_bias)");
  m.def("linear_residual(Tensor x, Tensor inp, Tensor weight, Tensor bias, Tensor alpha, float p,"
        " Tensor seed) -> Tensor");
  // y and what backward keeps of F = x @ weight^T + bias (act(F) for relu, else F).
  m.def("rezero_fc(Tensor x, Tensor weight, Tensor bias, Tensor alpha, str activation, float p,"
        " Tensor seed) -> (Tensor y, Tensor kept)");
  m.def("rezero_fc_backward(Tensor grad, Tensor x, Tensor weight, Tensor alpha, Tensor kept,"
        " str activation, float p, Tensor seed, bool[4] output_mask)"
        " -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_alpha)");
  // output_mask: which of the four gradients to compute (the others come back undefined).
  m.def("linear_residual_backward(Tensor grad, Tensor inp, Tensor weight, Tensor bias,"
        " Tensor alpha, float p, Tensor seed, bool[4] output_mask)"
        " -> (Tensor grad_inp, Tensor grad_weight, Tensor grad_bias, Tensor grad_alpha)");
}
