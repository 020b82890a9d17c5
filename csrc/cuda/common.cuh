// Shared device helpers of the vdmpp CUDA kernels: float32 / bfloat16 element access (bf16 read
// exactly, written with round-to-nearest-even like c10::BFloat16) and 16-byte vector packs.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace vdmpp {
namespace cuda {

template <typename Raw>
struct FloatIO;

template <>
struct FloatIO<float> {
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float f) { return f; }
};

template <>
struct FloatIO<uint16_t> {  // bfloat16 bits
  static __device__ __forceinline__ float load(uint16_t v) {
    return __uint_as_float(static_cast<uint32_t>(v) << 16);
  }
  static __device__ __forceinline__ uint16_t store(float f) {
    if (isnan(f)) return 0x7FC0;
    uint32_t u = __float_as_uint(f);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
  }
};

// kWidth elements of Raw in one 16-byte (128-bit) load/store.
template <typename Raw>
struct alignas(16) Pack {
  static constexpr int kWidth = 16 / sizeof(Raw);
  Raw v[kWidth];
};

// One 16-byte load/store at p, which must be 16-byte aligned (the plan's vector body is).
template <typename Raw>
__device__ __forceinline__ Pack<Raw> load_pack(const Raw* __restrict__ p) {
  Pack<Raw> out;
  *reinterpret_cast<uint4*>(&out) = __ldg(reinterpret_cast<const uint4*>(p));
  return out;
}

template <typename Raw>
__device__ __forceinline__ void store_pack(Raw* __restrict__ p, const Pack<Raw>& v) {
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&v);
}

}  // namespace cuda
}  // namespace vdmpp
