// REZERO_HOST_DEVICE: a function for host and device code under nvcc, a plain inline one
// elsewhere, so the headers shared by the CPU and CUDA builds compile with both compilers.
#pragma once

#if defined(__CUDACC__)
#define REZERO_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define REZERO_HOST_DEVICE inline
#endif
