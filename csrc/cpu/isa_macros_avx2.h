// The ISA macros of AVX2 (+FMA, F16C, BMI, LZCNT, POPCNT) for a translation unit compiled with
// `#pragma GCC target(...)` of at least those (heun_kernels_avx2.cpp, heun_kernels_avx512.cpp).
#pragma once
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
