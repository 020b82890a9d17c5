// cpu/heun_kernels.h with AVX-512 F/BW/VL/DQ (chosen at run time only on CPUs that have it).
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#include "isa_macros_avx2.h"  // + the AVX-512 ones:
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define VDMPP_KERNELS_FN kernels_avx512
#include "heun_kernels.h"
#endif
