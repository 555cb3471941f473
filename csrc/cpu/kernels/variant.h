// Everything in this directory is compiled once per instruction-set variant (../kernels.h), with
// CPU_CAPABILITY naming the variant and the namespace rezero::cpu::CPU_CAPABILITY that keeps
// each variant's functions apart.  Every file here includes this header before any other.
#pragma once
#if !defined(CPU_CAPABILITY)
#error "csrc/cpu/kernels/ is compiled once per CPU variant, with -DCPU_CAPABILITY=<variant>"
#endif

// ATen's vector classes (at::vec, in namespace at::vec::CPU_CAPABILITY) pick their
// implementation from the CPU_CAPABILITY_AVX2/AVX512 macros that torch's own build sets per
// kernel file; an extension must set them itself, or it gets the portable one.  They follow the
// instruction set the compiler flags of this variant enable.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#endif
