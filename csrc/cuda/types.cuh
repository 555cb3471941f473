// The element types of the kernels: the C++ type of each DType (with_dtype), the math type it
// computes in (float, or double for float64 data) and the conversions between the two.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>

#include "launchers.h"  // DType

namespace rezero::cuda {

template <class T> struct MathOf { using type = float; };
template <> struct MathOf<double> { using type = double; };
template <class T> using math_t = typename MathOf<T>::type;

__device__ __forceinline__ float to_math(float v) { return v; }
__device__ __forceinline__ double to_math(double v) { return v; }
__device__ __forceinline__ float to_math(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_math(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T> __device__ __forceinline__ T from_math(math_t<T> v);
template <> __device__ __forceinline__ float from_math<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_math<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_math<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_math<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// f(T{}) for the C++ type of dt.
template <class F>
inline cudaError_t with_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat64: return f(double{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    case DType::kFloat16: return f(__half{});
  }
  return cudaErrorInvalidValue;
}

inline size_t math_size(DType dt) { return dt == DType::kFloat64 ? sizeof(double) : sizeof(float); }

}  // namespace rezero::cuda
