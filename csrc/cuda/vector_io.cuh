// The kernels move data in chunks of kChunk<T> elements per thread: whole 128-bit vectors when
// the pointers allow it, element by element otherwise and at the ragged end.
#pragma once
#include <cstdint>

#include "types.cuh"

namespace rezero::cuda {

// Elements per thread per step: one 128-bit vector, but at least 4 (one Philox call's worth),
// so double takes two vectors.
template <class T> constexpr int kChunk = 16 / sizeof(T) < 4 ? 4 : static_cast<int>(16 / sizeof(T));

template <class T, int N> struct alignas(16) Pack { T v[N]; };

// out[j] = p[j] for j < valid (0 beyond).  vector: p is 16-byte aligned and valid == N.
template <int N, class T>
__device__ __forceinline__ void load_chunk(const T* __restrict__ p, math_t<T> (&out)[N],
                                           int valid, bool vector) {
  static_assert(N * sizeof(T) % 16 == 0, "a chunk is whole 128-bit vectors");
  if (vector) {
    const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = to_math(pk.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = j < valid ? to_math(p[j]) : math_t<T>(0);
  }
}

template <int N, class T>
__device__ __forceinline__ void store_chunk(T* __restrict__ p, const math_t<T> (&in)[N],
                                            int valid, bool vector) {
  if (vector) {
    Pack<T, N> pk;
#pragma unroll
    for (int j = 0; j < N; ++j) pk.v[j] = from_math<T>(in[j]);
    *reinterpret_cast<Pack<T, N>*>(p) = pk;
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (j < valid) p[j] = from_math<T>(in[j]);
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// kChunk of dt's C++ type.
inline int chunk_of(DType dt) {
  switch (dt) {
    case DType::kFloat32: return kChunk<float>;
    case DType::kFloat64: return kChunk<double>;
    case DType::kBFloat16: return kChunk<__nv_bfloat16>;
    case DType::kFloat16: return kChunk<__half>;
  }
  return 4;
}

}  // namespace rezero::cuda
