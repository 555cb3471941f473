// How the CPU kernels walk a contiguous tensor: as rows of `width` elements (the channel count
// when a per-channel vector is involved, else a fixed width), grouped into fixed blocks of rows
// that threads take whole.  Reductions write one partial per block and add the partials in
// block order, so results do not depend on the number of threads.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "variant.h"

namespace rezero::cpu::CPU_CAPABILITY {

constexpr int64_t kTile = 1024;        // elements per inner piece (scratch buffers stay in L1)
constexpr int64_t kFlatWidth = 8192;   // row width when no per-channel vector is involved
constexpr int64_t kBlockElems = 1 << 16;

struct RowLayout {
  int64_t numel, width, rows, rows_per_block, blocks;

  static RowLayout make(int64_t numel, int64_t channels, bool per_channel) {
    RowLayout l{};
    l.numel = numel;
    l.width = per_channel ? std::max<int64_t>(channels, 1) : kFlatWidth;
    l.rows = (numel + l.width - 1) / l.width;
    l.rows_per_block = std::max<int64_t>(1, kBlockElems / l.width);
    l.blocks = (l.rows + l.rows_per_block - 1) / l.rows_per_block;
    return l;
  }
};

// body(block, first_row, end_row) for every block, blocks spread over threads.
template <class Body>
void parallel_blocks(const RowLayout& l, const Body& body) {
  at::parallel_for(0, l.blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      body(b, b * l.rows_per_block, std::min(l.rows, (b + 1) * l.rows_per_block));
  });
}

// body(flat_index, length, column) for pieces of at most kTile elements of rows [r0, r1).
template <class Body>
void for_pieces(const RowLayout& l, int64_t r0, int64_t r1, const Body& body) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t row_begin = r * l.width, row_end = std::min(l.numel, row_begin + l.width);
    for (int64_t s = row_begin; s < row_end; s += kTile)
      body(s, std::min(kTile, row_end - s), s - row_begin);
  }
}

// out[k] = sum over blocks of partials[block * len + k], added in block order.
template <typename M, typename Out>
void sum_partials(const std::vector<M>& partials, int64_t blocks, int64_t len, Out* out) {
  for (int64_t k = 0; k < len; ++k) {
    M s = 0;
    for (int64_t b = 0; b < blocks; ++b) s += partials[b * len + k];
    out[k] = static_cast<Out>(s);
  }
}

// Calls f(std::integral_constant<bool, flag>{}) so one template serves both values of flag.
template <class F>
auto bool_dispatch(bool flag, const F& f) {
  return flag ? f(std::true_type{}) : f(std::false_type{});
}

// Calls f(T{}) for T the C++ type of dtype st (float, double, BFloat16, Half).
template <class F>
void dispatch_float_types(at::ScalarType st, const F& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "rezero_kernels",
                                  [&] { f(scalar_t{}); });
}

}  // namespace rezero::cpu::CPU_CAPABILITY
