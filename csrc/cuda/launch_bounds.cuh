// The block size of every kernel here and the blocks per SM each kernel's __launch_bounds__
// asks for, which sets its register budget; the launch geometry (launch.cuh) uses the same
// numbers.
#pragma once
#include <type_traits>

namespace rezero::cuda {

constexpr int kThreads = 256;        // threads per block, every kernel here
constexpr int kMinBlocksPerSM = 4;   // __launch_bounds__ guarantee; the grid is one wave of these

// The blocks per SM a kernel's __launch_bounds__ asks for, which caps its registers at
// 65536 / (kThreads * blocks): 4 blocks leave 64 registers, enough for most instantiations.
// float64 maths (two registers a value; erf and exp in double) and the column kernel's 16-bit
// dropout path (8 elements, up to three Philox calls per chunk) spill at 64: float64 gets the
// policy's kFloat64Blocks (2: 128 registers; gelu's derivative, 1), the 16-bit column dropout
// path 2.  The launch geometry uses the same number; tests/test_cuda_compile.py fails on any
// spill.
template <class T, class Op, bool kDropout, bool kColumns>
constexpr int min_blocks_per_sm() {
  if (std::is_same_v<T, double>) return Op::kFloat64Blocks;
  if (kColumns && kDropout && sizeof(T) == 2) return 2;
  return kMinBlocksPerSM;
}

}  // namespace rezero::cuda
