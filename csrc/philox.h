// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) and the
// dropout rule built on it.  Header-only, no torch includes, usable from host C++ and CUDA.
//
// Dropout element i (row-major index into the dropped tensor) with seed = [key, counter_base]:
//   bits = philox4x32_10(counter = {lo(i/4), hi(i/4), lo(counter_base), hi(counter_base)},
//                        key = {lo(key), hi(key)})[i % 4]
//   kept  iff bits < dropout_threshold(p);  kept values are scaled by 1 / (1 - p).
// Every backend built on this header (CPU, CUDA) therefore drops the same elements.
#pragma once
#include <cstdint>

#include "host_device.h"

namespace rezero {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

// One Philox round on (c0..c3) with key (k0, k1).
REZERO_HOST_DEVICE void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                                     uint32_t k0, uint32_t k1) {
  const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
  const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
  const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
  const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
  c1 = static_cast<uint32_t>(p1);
  c3 = static_cast<uint32_t>(p0);
  c0 = n0;
  c2 = n2;
}

// Philox4x32-10: ctr is overwritten by the four random words.
REZERO_HOST_DEVICE void philox4x32_10(uint32_t ctr[4], const uint32_t key[2]) {
  uint32_t k0 = key[0], k1 = key[1];
  for (int r = 0; r < kPhiloxRounds; ++r) {
    philox_round(ctr[0], ctr[1], ctr[2], ctr[3], k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// Random words below this are kept: min(2^32 - 1, floor((1 - p) * 2^32)).
REZERO_HOST_DEVICE uint32_t dropout_threshold(double p) {
  const double t = (1.0 - p) * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

// The scalar reference of the dropout rule: is element i kept?
REZERO_HOST_DEVICE bool dropout_keep(uint64_t i, uint64_t key, uint64_t counter_base,
                                     uint32_t threshold) {
  uint32_t ctr[4] = {static_cast<uint32_t>(i >> 2), static_cast<uint32_t>(i >> 34),
                     static_cast<uint32_t>(counter_base), static_cast<uint32_t>(counter_base >> 32)};
  const uint32_t k[2] = {static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32)};
  philox4x32_10(ctr, k);
  return ctr[i & 3] < threshold;
}

}  // namespace rezero
