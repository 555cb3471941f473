// What the CPU op bindings share: the argument checks of ../op_checks.h for CPU tensors and the
// dropout set-up.
#pragma once
#include <ATen/ATen.h>

#include "../op_checks.h"
#include "../philox.h"
#include "kernels.h"

namespace rezero::cpu {

inline Dropout make_dropout(double p, const at::Tensor& seed, const at::Tensor& data) {
  check_dropout(p, seed, data);
  Dropout d;
  if (p == 0.0) return d;
  const int64_t* s = seed.data_ptr<int64_t>();
  d.key = static_cast<uint64_t>(s[0]);
  d.counter_base = static_cast<uint64_t>(s[1]);
  d.enabled = true;
  d.threshold = dropout_threshold(p);
  d.scale = 1.0 / (1.0 - p);
  return d;
}

}  // namespace rezero::cpu
