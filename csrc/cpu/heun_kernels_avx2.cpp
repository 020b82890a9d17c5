// cpu/heun_kernels.h with AVX2 (chosen at run time only on CPUs that have it: heun_step.cpp).
// FMA stays enabled as an instruction set for ATen's headers, but the build's -ffp-contract=off
// keeps the compiler from fusing our separate multiplies and adds.
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#include "isa_macros_avx2.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define VDMPP_KERNELS_FN kernels_avx2
#include "heun_kernels.h"
#endif
