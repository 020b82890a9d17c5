// The CPU loops of vdmpp::heun_step and vdmpp::churn, explicitly vectorised with at::vec. This
// header is compiled once per instruction set (heun_kernels_{default,avx2,avx512}.cpp, each
// defining CPU_CAPABILITY first, as ATen's own kernels are): at::vec lives in an inline
// namespace named after CPU_CAPABILITY, so the three builds do not collide, and heun_step.cpp
// picks one at run time from what the CPU supports.
//
// Bit-equality with the reference (vdmpp.samplers._step / vdmpp.kernels.reference): every
// element is computed in float32 with the reference's operations in the reference's order —
// one IEEE op per PyTorch op: (x - d1) / t_hat, x + h * d, (x_e - d2) / t_next,
// x + h * (0.5 * d + 0.5 * d') — as separate vector mul/add/sub/div instructions. The build
// passes -ffp-contract=off, so the compiler fuses no multiply-add into an FMA (which would round
// once instead of twice); bfloat16 is widened exactly and rounded back to nearest-even, NaN kept.
//
// Only raw pointers cross this interface: no at::Tensor and nothing else of ATen's inline code
// is instantiated here under the wider instruction sets.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <cstdint>

#include "../float_io.h"
#include "heun_kernels_api.h"

namespace vdmpp {
namespace cpu {
namespace CPU_CAPABILITY {

using Vf = at::vec::Vectorized<float>;

struct Consts {
  Vf t_hat, t_next, h, half;
  float s_t_hat, s_t_next, s_h;
};

template <bool kCorrect>
inline Vf heun_vec(const Vf& x, const Vf& d1, const Vf& d2, const Consts& c) {
  const Vf d_cur = (x - d1) / c.t_hat;
  if constexpr (kCorrect) {
    const Vf x_e = x + c.h * d_cur;
    const Vf d_prime = (x_e - d2) / c.t_next;
    return x + c.h * (c.half * d_cur + c.half * d_prime);
  } else {
    return x + c.h * d_cur;
  }
}

template <bool kCorrect>
inline float heun_one(float x, float d1, float d2, const Consts& c) {
  const float d_cur = (x - d1) / c.s_t_hat;
  if constexpr (kCorrect) {
    const float x_e = x + c.s_h * d_cur;
    const float d_prime = (x_e - d2) / c.s_t_next;
    return x + c.s_h * (0.5f * d_cur + 0.5f * d_prime);
  } else {
    return x + c.s_h * d_cur;
  }
}

inline Consts consts(float t_hat, float t_next, float h) {
  return Consts{Vf(t_hat), Vf(t_next), Vf(h), Vf(0.5f), t_hat, t_next, h};
}

template <bool kCorrect>
void heun_f32(const float* x, const float* d1, const float* d2, float* out, int64_t n,
              float t_hat, float t_next, float h) {
  const Consts c = consts(t_hat, t_next, h);
  constexpr int64_t W = Vf::size();
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {  // two vectors per trip: more loads in flight
    for (int64_t j = i; j < i + 2 * W; j += W) {
      const Vf b = kCorrect ? Vf::loadu(d2 + j) : Vf(0.0f);
      heun_vec<kCorrect>(Vf::loadu(x + j), Vf::loadu(d1 + j), b, c).store(out + j);
    }
  }
  for (; i < n; ++i) out[i] = heun_one<kCorrect>(x[i], d1[i], kCorrect ? d2[i] : 0.0f, c);
}

template <bool kCorrect>
void heun_bf16(const uint16_t* x, const uint16_t* d1, const uint16_t* d2, uint16_t* out,
               int64_t n, float t_hat, float t_next, float h) {
  using Vb = at::vec::Vectorized<c10::BFloat16>;
  using IO = FloatIO<uint16_t>;
  const Consts c = consts(t_hat, t_next, h);
  constexpr int64_t W = Vb::size();  // 2 float vectors
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    auto [x0, x1] = at::vec::convert_to_float<c10::BFloat16>(Vb::loadu(x + i));
    auto [a0, a1] = at::vec::convert_to_float<c10::BFloat16>(Vb::loadu(d1 + i));
    Vf b0(0.0f), b1(0.0f);
    if constexpr (kCorrect) std::tie(b0, b1) = at::vec::convert_to_float<c10::BFloat16>(Vb::loadu(d2 + i));
    const Vf r0 = heun_vec<kCorrect>(x0, a0, b0, c);
    const Vf r1 = heun_vec<kCorrect>(x1, a1, b1, c);
    at::vec::convert_from_float<c10::BFloat16>(r0, r1).store(out + i);
  }
  for (; i < n; ++i) {
    const float b = kCorrect ? IO::load(d2[i]) : 0.0f;
    out[i] = IO::store(heun_one<kCorrect>(IO::load(x[i]), IO::load(d1[i]), b, c));
  }
}

void churn_f32(const float* x, const float* noise, float* out, int64_t n, float scale) {
  const Vf s(scale);
  constexpr int64_t W = Vf::size();
  int64_t i = 0;
  for (; i + W <= n; i += W) (Vf::loadu(x + i) + s * Vf::loadu(noise + i)).store(out + i);
  for (; i < n; ++i) out[i] = x[i] + scale * noise[i];
}

void churn_bf16(const uint16_t* x, const uint16_t* noise, uint16_t* out, int64_t n, float scale) {
  using Vb = at::vec::Vectorized<c10::BFloat16>;
  using IO = FloatIO<uint16_t>;
  const Vf s(scale);
  constexpr int64_t W = Vb::size();
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    auto [x0, x1] = at::vec::convert_to_float<c10::BFloat16>(Vb::loadu(x + i));
    auto [e0, e1] = at::vec::convert_to_float<c10::BFloat16>(Vb::loadu(noise + i));
    at::vec::convert_from_float<c10::BFloat16>(x0 + s * e0, x1 + s * e1).store(out + i);
  }
  for (; i < n; ++i) out[i] = IO::store(IO::load(x[i]) + scale * IO::load(noise[i]));
}

}  // namespace CPU_CAPABILITY

// This capability's entry points, for heun_step.cpp's table.
HeunKernels VDMPP_KERNELS_FN() {
  namespace k = CPU_CAPABILITY;
  return HeunKernels{&k::heun_f32<true>,  &k::heun_f32<false>, &k::heun_bf16<true>,
                     &k::heun_bf16<false>, &k::churn_f32,      &k::churn_bf16};
}

}  // namespace cpu
}  // namespace vdmpp
