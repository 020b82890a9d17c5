// CUDA kernels of vdmpp::heun_step and vdmpp::churn (EDM, Karras et al. 2022, Alg. 1/2).
//
// Operands share one dense memory layout (same strides: row-major, channels_last, ...), so the
// kernels loop over memory flat. Memory-bound elementwise: each thread moves 16 bytes per operand
// per iteration (float4 for float32, 8 x bf16), grid-stride, with scalar head and tail around the
// 16-byte-aligned body (all scalar when the operands' misalignments differ). Math in float32 with
// explicit _rn intrinsics (no FMA contraction): bit-equal to the CPU kernel and the reference.
// Index arithmetic is int64 throughout (tensors over 2^31 elements).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>

#include "../params.h"
#include "common.cuh"

namespace vdmpp {
namespace cuda {
namespace {

constexpr int kThreads = kElementwiseThreads;

struct HeunParams {
  float t_hat, t_next, h;
};

template <bool kCorrect>
__device__ __forceinline__ float heun_math(float x, float d1, float d2, const HeunParams& p) {
  const float d_cur = __fdiv_rn(__fsub_rn(x, d1), p.t_hat);
  if constexpr (kCorrect) {
    const float x_e = __fadd_rn(x, __fmul_rn(p.h, d_cur));
    const float d_prime = __fdiv_rn(__fsub_rn(x_e, d2), p.t_next);
    return __fadd_rn(x, __fmul_rn(p.h, __fadd_rn(__fmul_rn(0.5f, d_cur), __fmul_rn(0.5f, d_prime))));
  } else {
    return __fadd_rn(x, __fmul_rn(p.h, d_cur));
  }
}

// The launch's plan (params.h: plan_elementwise) gives a scalar head up to the first 16-byte
// boundary, n_vec packs of 16 bytes per operand, and a scalar tail; elementwise_loop is the
// grid-stride loop over both (the same code the CPU tests run through _debug_elementwise_coverage).
template <typename Raw, bool kCorrect>
__global__ void __launch_bounds__(kThreads)
    heun_step_kernel(const Raw* __restrict__ x, const Raw* __restrict__ d1,
                     const Raw* __restrict__ d2, Raw* __restrict__ out, ElementwisePlan plan,
                     HeunParams p) {
  using IO = FloatIO<Raw>;
  constexpr int W = Pack<Raw>::kWidth;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  elementwise_loop(
      plan, tid, stride,
      [&](int64_t e) {
        const Pack<Raw> xv = load_pack(x + e);
        const Pack<Raw> a = load_pack(d1 + e);
        Pack<Raw> b;
        if constexpr (kCorrect) b = load_pack(d2 + e);
        Pack<Raw> o;
#pragma unroll
        for (int j = 0; j < W; ++j) {
          const float bj = kCorrect ? IO::load(b.v[j]) : 0.0f;
          o.v[j] = IO::store(heun_math<kCorrect>(IO::load(xv.v[j]), IO::load(a.v[j]), bj, p));
        }
        store_pack(out + e, o);
      },
      [&](int64_t e) {
        const float bj = kCorrect ? IO::load(d2[e]) : 0.0f;
        out[e] = IO::store(heun_math<kCorrect>(IO::load(x[e]), IO::load(d1[e]), bj, p));
      });
}

template <typename Raw>
__global__ void __launch_bounds__(kThreads)
    churn_kernel(const Raw* __restrict__ x, const Raw* __restrict__ noise, Raw* __restrict__ out,
                 ElementwisePlan plan, float scale) {
  using IO = FloatIO<Raw>;
  constexpr int W = Pack<Raw>::kWidth;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  elementwise_loop(
      plan, tid, stride,
      [&](int64_t e) {
        const Pack<Raw> xv = load_pack(x + e);
        const Pack<Raw> ev = load_pack(noise + e);
        Pack<Raw> o;
#pragma unroll
        for (int j = 0; j < W; ++j) {
          o.v[j] = IO::store(__fadd_rn(IO::load(xv.v[j]), __fmul_rn(scale, IO::load(ev.v[j]))));
        }
        store_pack(out + e, o);
      },
      [&](int64_t e) {
        out[e] = IO::store(__fadd_rn(IO::load(x[e]), __fmul_rn(scale, IO::load(noise[e]))));
      });
}

// Multiprocessors of `device`, asked once per device and cached (no driver call per launch).
int sm_count(c10::DeviceIndex device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  const bool cached = device >= 0 && device < kMaxDevices;
  int sms = cached ? cache[device].load(std::memory_order_relaxed) : 0;
  if (sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    if (cached) cache[device].store(sms, std::memory_order_relaxed);
  }
  return sms;
}

int misalignment(const void* ptr) { return static_cast<int>(reinterpret_cast<uintptr_t>(ptr) & 15u); }

template <typename Raw>
void launch_heun(const at::Tensor& x_hat, const at::Tensor& denoised,
                 const c10::optional<at::Tensor>& denoised_next, at::Tensor& out,
                 const HeunParams& p) {
  const auto* x = static_cast<const Raw*>(x_hat.const_data_ptr());
  const auto* d1 = static_cast<const Raw*>(denoised.const_data_ptr());
  const Raw* d2 = denoised_next ? static_cast<const Raw*>(denoised_next->const_data_ptr())
                                : nullptr;
  auto* o = static_cast<Raw*>(out.mutable_data_ptr());
  const int mis[4] = {misalignment(x), misalignment(d1), misalignment(o),
                      d2 ? misalignment(d2) : misalignment(x)};
  const ElementwisePlan plan =
      plan_elementwise(x_hat.numel(), sizeof(Raw), mis, 4, sm_count(x_hat.device().index()));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (d2) {
    heun_step_kernel<Raw, true><<<plan.grid, kThreads, 0, stream>>>(x, d1, d2, o, plan, p);
  } else {
    heun_step_kernel<Raw, false><<<plan.grid, kThreads, 0, stream>>>(x, d1, d2, o, plan, p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Raw>
void launch_churn(const at::Tensor& x, const at::Tensor& noise, at::Tensor& out, float scale) {
  const auto* xp = static_cast<const Raw*>(x.const_data_ptr());
  const auto* ep = static_cast<const Raw*>(noise.const_data_ptr());
  auto* o = static_cast<Raw*>(out.mutable_data_ptr());
  const int mis[3] = {misalignment(xp), misalignment(ep), misalignment(o)};
  const ElementwisePlan plan =
      plan_elementwise(x.numel(), sizeof(Raw), mis, 3, sm_count(x.device().index()));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  churn_kernel<Raw><<<plan.grid, kThreads, 0, stream>>>(xp, ep, o, plan, scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor heun_step_cuda(const at::Tensor& x_hat, const at::Tensor& denoised,
                          const c10::optional<at::Tensor>& denoised_next, double t_hat,
                          double t_next) {
  check_heun_step(x_hat, denoised, denoised_next, t_hat, t_next);
  TORCH_CHECK(x_hat.is_cuda(), "vdmpp::heun_step: CUDA kernel got a ", x_hat.device(), " tensor");
  const c10::cuda::CUDAGuard guard(x_hat.device());
  if (!all_same_dtype(x_hat, denoised, denoised_next)) {  // as the reference: float32, cast back
    const c10::optional<at::Tensor> d2 =
        denoised_next ? c10::optional<at::Tensor>(as_float(*denoised_next)) : c10::nullopt;
    return heun_step_cuda(as_float(x_hat), as_float(denoised), d2, t_hat, t_next)
        .to(x_hat.scalar_type());
  }
  at::Tensor out = at::empty_like(x_hat);
  if (x_hat.numel() == 0) return out;
  const HeunParams p{static_cast<float>(t_hat), static_cast<float>(t_next),
                     static_cast<float>(t_next - t_hat)};
  if (x_hat.scalar_type() == at::kFloat) {
    launch_heun<float>(x_hat, denoised, denoised_next, out, p);
  } else {
    launch_heun<uint16_t>(x_hat, denoised, denoised_next, out, p);
  }
  return out;
}

at::Tensor churn_cuda(const at::Tensor& x, const at::Tensor& noise, double t, double t_hat,
                      double s_noise) {
  const double scale = check_churn(x, noise, t, t_hat, s_noise);
  TORCH_CHECK(x.is_cuda(), "vdmpp::churn: CUDA kernel got a ", x.device(), " tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  if (!all_same_dtype(x, noise)) {  // as the reference: float32, cast back
    return churn_cuda(as_float(x), as_float(noise), t, t_hat, s_noise).to(x.scalar_type());
  }
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  if (x.scalar_type() == at::kFloat) {
    launch_churn<float>(x, noise, out, static_cast<float>(scale));
  } else {
    launch_churn<uint16_t>(x, noise, out, static_cast<float>(scale));
  }
  return out;
}

}  // namespace

bool adaptive_kernel_image_ok();  // cuda/adaptive_ema_update.cu

namespace {

// vdmpp::kernel_image_ok: do the kernels of both CUDA translation units have an image for the
// probe's device? (The build compiles them for one arch list, so one kernel each suffices.)
bool kernel_image_ok_cuda(const at::Tensor& probe) {
  TORCH_CHECK(probe.is_cuda(), "vdmpp::kernel_image_ok: CUDA kernel got a ", probe.device(),
              " tensor");
  const c10::cuda::CUDAGuard guard(probe.device());
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, heun_step_kernel<float, true>);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // a non-sticky error: clear it so later calls do not see it
    return false;
  }
  return adaptive_kernel_image_ok();
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(vdmpp, CUDA, m) {
  m.impl("heun_step", &cuda::heun_step_cuda);
  m.impl("churn", &cuda::churn_cuda);
  m.impl("kernel_image_ok", &cuda::kernel_image_ok_cuda);
}

}  // namespace vdmpp
