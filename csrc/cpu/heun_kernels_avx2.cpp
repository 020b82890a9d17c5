// cpu/heun_kernels.h with AVX2 (chosen at run time only on CPUs that have it: heun_step.cpp).
// FMA stays enabled as an instruction set for ATen's headers, but the build's -ffp-contract=off
// keeps the compiler from fusing our separate multiplies and adds.
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
// g++ does not define the ISA macros for #pragma GCC target (gcc does); the headers (sleef.h,
// ATen's vec) select their code by them.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __BMI__
#define __BMI__ 1
#endif
#ifndef __BMI2__
#define __BMI2__ 1
#endif
#ifndef __LZCNT__
#define __LZCNT__ 1
#endif
#ifndef __POPCNT__
#define __POPCNT__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define VDMPP_KERNELS_FN kernels_avx2
#include "heun_kernels.h"
#endif
