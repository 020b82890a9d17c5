// float32 / bfloat16 element access for the CPU kernels: bf16 is read exactly into float32 and
// written back with round-to-nearest-even (what `tensor.to(torch.bfloat16)` does), so a kernel
// that computes in the same order as the float32-upcast reference is bit-identical to it.
#pragma once

#include <cstdint>
#include <cstring>

namespace vdmpp {

template <typename Raw>
struct FloatIO;

template <>
struct FloatIO<float> {
  static inline float load(float v) { return v; }
  static inline float store(float f) { return f; }
};

template <>
struct FloatIO<uint16_t> {  // bfloat16 bits
  static inline float load(uint16_t v) {
    const uint32_t u = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  static inline uint16_t store(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    const auto rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return f != f ? static_cast<uint16_t>(0x7FC0) : rounded;  // branch-free: vectorises
  }
};

}  // namespace vdmpp
