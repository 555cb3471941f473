// at::vec with the widest instruction set this translation unit is compiled for.
// ATen's vector classes pick their implementation from CPU_CAPABILITY_* macros that torch's own
// build sets per kernel file; an extension must set them itself, or it gets the portable one.
// The Sleef functions the wide versions call are exported by libtorch_cpu.
#pragma once
#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
#endif
#include <ATen/cpu/vec/vec.h>
