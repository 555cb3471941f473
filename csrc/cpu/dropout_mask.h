// Vectorised generation of the dropout rule of ../philox.h for a contiguous range of elements.
#pragma once
#include <cstdint>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__BMI2__)
#include <immintrin.h>
#endif

#include "../philox.h"
#include "row_loop.h"

namespace rezero::cpu {

struct Dropout {
  bool enabled = false;
  uint64_t key = 0, counter_base = 0;
  uint32_t threshold = 0xFFFFFFFFu;
  double scale = 1.0;
};

constexpr int64_t kGroup = 64;  // elements per keep-bit word: 16 counters x 4 words

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__BMI2__)
// hi and lo 32 bits of a * m in every 32-bit lane.
inline void mul_hi_lo(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

// Bit e of the result: is element 64 * group + e kept?  (16 Philox streams in one register.)
inline uint64_t keep_bits(uint64_t group, const Dropout& d) {
  const uint64_t first = group * 16;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(first)), lane);
  // first is a multiple of 16, so the low word cannot wrap inside the group
  __m512i c1 = _mm512_set1_epi32(static_cast<int>(first >> 32));
  __m512i c2 = _mm512_set1_epi32(static_cast<int>(d.counter_base));
  __m512i c3 = _mm512_set1_epi32(static_cast<int>(d.counter_base >> 32));
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  uint32_t k0 = static_cast<uint32_t>(d.key), k1 = static_cast<uint32_t>(d.key >> 32);
  for (int r = 0; r < kPhiloxRounds; ++r) {
    __m512i hi0, lo0, hi1, lo1;
    mul_hi_lo(c0, m0, hi0, lo0);
    mul_hi_lo(c2, m1, hi1, lo1);
    c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(k0)));
    c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(k1)));
    c1 = lo1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  const __m512i t = _mm512_set1_epi32(static_cast<int>(d.threshold));
  // word w of counter l is element 4 * l + w: interleave the four 16-bit lane masks
  return _pdep_u64(_mm512_cmplt_epu32_mask(c0, t), 0x1111111111111111ull) |
         _pdep_u64(_mm512_cmplt_epu32_mask(c1, t), 0x2222222222222222ull) |
         _pdep_u64(_mm512_cmplt_epu32_mask(c2, t), 0x4444444444444444ull) |
         _pdep_u64(_mm512_cmplt_epu32_mask(c3, t), 0x8888888888888888ull);
}
#else
inline uint64_t keep_bits(uint64_t group, const Dropout& d) {
  const uint32_t key[2] = {static_cast<uint32_t>(d.key), static_cast<uint32_t>(d.key >> 32)};
  uint64_t bits = 0;
  for (uint64_t l = 0; l < 16; ++l) {
    const uint64_t c = group * 16 + l;
    uint32_t ctr[4] = {static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32),
                       static_cast<uint32_t>(d.counter_base),
                       static_cast<uint32_t>(d.counter_base >> 32)};
    philox4x32_10(ctr, key);
    for (int w = 0; w < 4; ++w) bits |= static_cast<uint64_t>(ctr[w] < d.threshold) << (4 * l + w);
  }
  return bits;
}
#endif

template <typename M>
inline void expand_bits(M* __restrict m, uint64_t bits, M scale) {
  for (int64_t e = 0; e < kGroup; ++e) m[e] = ((bits >> e) & 1) ? scale : M(0);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__BMI2__)
template <>
inline void expand_bits<float>(float* __restrict m, uint64_t bits, float scale) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int k = 0; k < 4; ++k)
    _mm512_store_ps(m + 16 * k, _mm512_maskz_mov_ps(static_cast<__mmask16>(bits >> (16 * k)), s));
}
#endif

// Scratch for dropout_scales: room for the whole groups around a piece of kTile elements.
template <typename M>
struct ScaleBuffer {
  alignas(64) M data[kTile + 2 * kGroup];
};

// Returns m with m[j] = scale if element flat + j is kept, else 0, for j < n <= kTile
// (m points into buf).
template <typename M>
inline const M* dropout_scales(ScaleBuffer<M>& buf, int64_t flat, int64_t n, const Dropout& d) {
  const int64_t g0 = flat / kGroup, g1 = (flat + n - 1) / kGroup;
  const M scale = static_cast<M>(d.scale);
  for (int64_t g = g0; g <= g1; ++g)
    expand_bits(buf.data + (g - g0) * kGroup, keep_bits(static_cast<uint64_t>(g), d), scale);
  return buf.data + (flat - g0 * kGroup);
}

}  // namespace rezero::cpu
