// Vectorised generation of the dropout rule of ../../philox.h for a contiguous range of elements.
// The Philox rounds are written once, over the 32-bit lanes of the widest registers the variant
// has (Lanes: 16 with AVX-512, 8 with AVX2); without either, a scalar loop per counter.
#pragma once
#include "variant.h"

#include <cstdint>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "../../philox.h"
#include "../kernels.h"  // Dropout
#include "row_loop.h"

namespace rezero::cpu::CPU_CAPABILITY {

constexpr int64_t kGroup = 64;  // elements per keep-bit word: 16 counters x 4 words

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define REZERO_PHILOX_LANES 1
struct Lanes {
  using V = __m512i;
  static constexpr int kCount = 16;
  static V set1(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }
  static V iota(uint32_t first) {
    return _mm512_add_epi32(set1(first), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
                                                              12, 13, 14, 15));
  }
  static V xor3(V a, V b, V c) { return _mm512_xor_si512(_mm512_xor_si512(a, b), c); }
  // hi and lo 32 bits of a * m in every lane
  static void mul_hi_lo(V a, V m, V& hi, V& lo) {
    const V even = _mm512_mul_epu32(a, m);
    const V odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
    hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
    lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  }
  // bit l: lane l < t (unsigned)
  static uint64_t below(V v, V t) { return _mm512_cmplt_epu32_mask(v, t); }
};
#elif defined(__AVX2__)
#define REZERO_PHILOX_LANES 1
struct Lanes {
  using V = __m256i;
  static constexpr int kCount = 8;
  static V set1(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }
  static V iota(uint32_t first) {
    return _mm256_add_epi32(set1(first), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static V xor3(V a, V b, V c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
  static void mul_hi_lo(V a, V m, V& hi, V& lo) {
    const V even = _mm256_mul_epu32(a, m);
    const V odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
    hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  }
  // AVX2 compares signed only: flipping the sign bits of both sides makes it unsigned
  static uint64_t below(V v, V t) {
    const V sign = set1(0x80000000u);
    const V lt = _mm256_cmpgt_epi32(_mm256_xor_si256(t, sign), _mm256_xor_si256(v, sign));
    return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(lt)));
  }
};
#endif

// Bit l of m (l < 16) moved to bit 4 * l.  pdep only with AVX-512: AMD CPUs before Zen 3 (AVX2
// only) run it in microcode, hundreds of cycles.
inline uint64_t every_fourth_bit(uint64_t m) {
#if defined(__AVX512F__) && defined(__BMI2__)
  return _pdep_u64(m, 0x1111111111111111ull);
#else
  m = (m | (m << 24)) & 0x000000FF000000FFull;
  m = (m | (m << 12)) & 0x000F000F000F000Full;
  m = (m | (m << 6)) & 0x0303030303030303ull;
  return (m | (m << 3)) & 0x1111111111111111ull;
#endif
}

#if defined(REZERO_PHILOX_LANES)
// Bit e of the result: is element 64 * group + e kept?  (Lanes::kCount Philox streams at once.)
inline uint64_t keep_bits(uint64_t group, const Dropout& d) {
  using V = Lanes::V;
  uint64_t bits = 0;
  for (int part = 0; part < 16 / Lanes::kCount; ++part) {
    const uint64_t first = group * 16 + part * Lanes::kCount;
    // first is a multiple of kCount, so the low word cannot wrap inside the part
    V c0 = Lanes::iota(static_cast<uint32_t>(first));
    V c1 = Lanes::set1(static_cast<uint32_t>(first >> 32));
    V c2 = Lanes::set1(static_cast<uint32_t>(d.counter_base));
    V c3 = Lanes::set1(static_cast<uint32_t>(d.counter_base >> 32));
    const V m0 = Lanes::set1(kPhiloxM0), m1 = Lanes::set1(kPhiloxM1);
    uint32_t k0 = static_cast<uint32_t>(d.key), k1 = static_cast<uint32_t>(d.key >> 32);
    for (int r = 0; r < kPhiloxRounds; ++r) {  // philox_round of ../../philox.h, lane-wise
      V hi0, lo0, hi1, lo1;
      Lanes::mul_hi_lo(c0, m0, hi0, lo0);
      Lanes::mul_hi_lo(c2, m1, hi1, lo1);
      c0 = Lanes::xor3(hi1, c1, Lanes::set1(k0));
      c2 = Lanes::xor3(hi0, c3, Lanes::set1(k1));
      c1 = lo1;
      c3 = lo0;
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const V t = Lanes::set1(d.threshold);
    // word w of counter l is element 4 * l + w: interleave the four lane masks
    const uint64_t part_bits = every_fourth_bit(Lanes::below(c0, t)) |
                               every_fourth_bit(Lanes::below(c1, t)) << 1 |
                               every_fourth_bit(Lanes::below(c2, t)) << 2 |
                               every_fourth_bit(Lanes::below(c3, t)) << 3;
    bits |= part_bits << (4 * Lanes::kCount * part);
  }
  return bits;
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

#if defined(__AVX512F__)
template <>
inline void expand_bits<float>(float* __restrict m, uint64_t bits, float scale) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int k = 0; k < 4; ++k)
    _mm512_store_ps(m + 16 * k, _mm512_maskz_mov_ps(static_cast<__mmask16>(bits >> (16 * k)), s));
}
#elif defined(__AVX2__)
template <>
inline void expand_bits<float>(float* __restrict m, uint64_t bits, float scale) {
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256 s = _mm256_set1_ps(scale);
  for (int k = 0; k < 8; ++k) {
    const __m256i b =
        _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits >> (8 * k))), lane_bit);
    const __m256 keep = _mm256_castsi256_ps(_mm256_cmpeq_epi32(b, lane_bit));
    _mm256_store_ps(m + 8 * k, _mm256_and_ps(keep, s));
  }
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

}  // namespace rezero::cpu::CPU_CAPABILITY
