// The interface between heun_step.cpp and the per-instruction-set builds of cpu/heun_kernels.h.
#pragma once

#include <cstdint>

namespace vdmpp {
namespace cpu {

struct HeunKernels {
  void (*heun_f32_correct)(const float*, const float*, const float*, float*, int64_t, float,
                           float, float);
  void (*heun_f32_euler)(const float*, const float*, const float*, float*, int64_t, float, float,
                         float);
  void (*heun_bf16_correct)(const uint16_t*, const uint16_t*, const uint16_t*, uint16_t*,
                            int64_t, float, float, float);
  void (*heun_bf16_euler)(const uint16_t*, const uint16_t*, const uint16_t*, uint16_t*, int64_t,
                          float, float, float);
  void (*churn_f32)(const float*, const float*, float*, int64_t, float);
  void (*churn_bf16)(const uint16_t*, const uint16_t*, uint16_t*, int64_t, float);
};

HeunKernels kernels_default();
HeunKernels kernels_avx2();    // x86-64 only
HeunKernels kernels_avx512();  // x86-64 only

}  // namespace cpu
}  // namespace vdmpp
