// The dropout rule of ../philox.h inside the kernels: the launcher's DropoutParams as a kernel
// argument (the seed stays in device memory) and the keep bits of a chunk of elements.
#pragma once
#include <cstdint>

#include "../philox.h"
#include "launchers.h"  // DropoutParams

namespace rezero::cuda {

// What the kernels get from the host: the seed stays in device memory.
struct DropoutArgs {
  const int64_t* seed;   // [key, counter_base]; read only when dropout is on
  uint32_t threshold;    // keep iff the Philox word < threshold
  double scale;          // 1 / (1 - p)
};

inline DropoutArgs make_dropout_args(const DropoutParams& p) {
  DropoutArgs d{p.seed, 0xFFFFFFFFu, 1.0};
  if (p.p > 0.0) {
    d.threshold = rezero::dropout_threshold(p.p);
    d.scale = 1.0 / (1.0 - p.p);
  }
  return d;
}

// The generator state a thread needs, read from the seed once per thread.
struct PhiloxKey {
  uint32_t key[2];
  uint32_t base_lo, base_hi;
  uint32_t threshold;
};

__device__ __forceinline__ PhiloxKey load_philox_key(const DropoutArgs& d) {
  const uint64_t key = static_cast<uint64_t>(d.seed[0]);
  const uint64_t base = static_cast<uint64_t>(d.seed[1]);
  PhiloxKey k;
  k.key[0] = static_cast<uint32_t>(key);
  k.key[1] = static_cast<uint32_t>(key >> 32);
  k.base_lo = static_cast<uint32_t>(base);
  k.base_hi = static_cast<uint32_t>(base >> 32);
  k.threshold = d.threshold;
  return k;
}

// Bit j (j < N) of the result: is element i0 + j kept?  One Philox4x32-10 call per group of
// four elements (group g = element / 4 is the counter, word element % 4 decides), exactly the
// rule of rezero::dropout_keep.  kAligned4: i0 % 4 == 0 is known, so N / 4 calls suffice.
template <int N, bool kAligned4>
__host__ __device__ __forceinline__ uint32_t keep_bits(uint64_t i0, const PhiloxKey& k) {
  static_assert(N % 4 == 0 && N <= 16, "chunks are whole Philox groups");
  constexpr int kGroups = kAligned4 ? N / 4 : N / 4 + 1;
  const uint64_t g0 = i0 >> 2;
  const int off = kAligned4 ? 0 : static_cast<int>(i0 & 3);
  uint32_t bits = 0;
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
    if (kAligned4 || g < N / 4 || off != 0) {
      const uint64_t c = g0 + g;
      uint32_t ctr[4] = {static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32), k.base_lo,
                         k.base_hi};
      rezero::philox4x32_10(ctr, k.key);
#pragma unroll
      for (int w = 0; w < 4; ++w)
        bits |= static_cast<uint32_t>(ctr[w] < k.threshold) << (4 * g + w);
    }
  }
  return bits >> off;
}

}  // namespace rezero::cuda
