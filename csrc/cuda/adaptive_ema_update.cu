// CUDA kernels of vdmpp::adaptive_ema_update and of the data-parallel pair
// vdmpp::adaptive_bin_stats / vdmpp::adaptive_apply_stats (VDM++, Kingma & Gao 2023, App. F/H).
//
// No host sync and CUDA-graph capturable. Batches up to kSingleBlockMax take ONE launch: a
// single block builds a shared-memory histogram (per-bin sum in double, count), applies the EMA
// to the hit bins and scans the cdf. Larger batches take two launches: every block writes its
// partial histogram to a workspace (no memset needed), then one block reduces the partials in a
// fixed order and finalises. Non-finite λ (NaN included) or value are masked, not errors.
//
// Sums are accumulated in double, so results agree with the CPU kernel (float32 sums in batch
// order) to float32 rounding of the per-bin mean; the cdf scan is in double as on CPU.
//
// adaptive_bin_stats: the same histogram (one launch up to kSingleBlockMax, else partials +
// a fixed-order reduction), added into the float32 [2, bins] accumulator. adaptive_apply_stats:
// one single-block launch, EMA of the hit bins from [sums; counts] and the cdf scan.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>

#include "../checks.h"

namespace vdmpp {
namespace cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxBins = 2048;  // 2048 * (8 + 4) B = 24 KiB of shared memory
constexpr int64_t kSingleBlockMax = 16384;
constexpr int64_t kMaxPartials = 128;

struct Params {
  float lmin, width, last;  // bin k = clamp(floor((λ - lmin) / width), 0, last)
  float a, b;               // ema <- a * ema + b * mean on hit bins
  int bins;
};

__device__ __forceinline__ void zero_hist(double* s_sum, unsigned* s_cnt, int bins) {
  for (int k = threadIdx.x; k < bins; k += blockDim.x) {
    s_sum[k] = 0.0;
    s_cnt[k] = 0u;
  }
}

// Accumulate elements begin + threadIdx.x, ... (step `step`) into the block's histogram.
__device__ __forceinline__ void accumulate(const float* __restrict__ lam,
                                           const float* __restrict__ val, int64_t n,
                                           int64_t begin, int64_t step, const Params& p,
                                           double* s_sum, unsigned* s_cnt) {
  for (int64_t i = begin + threadIdx.x; i < n; i += step) {
    const float l = lam[i];
    const float v = val[i];
    if (!isfinite(l) || !isfinite(v)) continue;
    float q = floorf(__fdiv_rn(__fsub_rn(l, p.lmin), p.width));
    q = fminf(fmaxf(q, 0.0f), p.last);
    const int k = static_cast<int>(q);
    atomicAdd(&s_sum[k], static_cast<double>(v));
    atomicAdd(&s_cnt[k], 1u);
  }
}

// The whole block: cdf = [0, cumsum(s_val) / total, ..., 1] from s_val[k] = max(ema_k, FLT_MIN)
// (FLT_MIN keeps the total > 0, as on CPU). Expects s_val complete (caller syncs).
__device__ void scan_cdf(float* __restrict__ cdf, const double* s_val, int bins) {
  __shared__ double warp_total[kWarps];
  // Each thread owns a contiguous run of bins; block-wide exclusive scan of the run totals.
  const int per = (bins + blockDim.x - 1) / blockDim.x;
  const int start = min(static_cast<int>(threadIdx.x) * per, bins);
  const int stop = min(start + per, bins);
  double local = 0.0;
  for (int j = start; j < stop; ++j) local += s_val[j];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  double incl = local;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const double up = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += up;
  }
  double excl = __shfl_up_sync(0xffffffffu, incl, 1);
  if (lane == 0) excl = 0.0;
  if (lane == 31) warp_total[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int nwarps = blockDim.x / 32;
    double t = lane < nwarps ? warp_total[lane] : 0.0;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const double up = __shfl_up_sync(0xffffffffu, t, off);
      if (lane >= off) t += up;
    }
    if (lane < nwarps) warp_total[lane] = t;  // inclusive prefix over warps
  }
  __syncthreads();
  if (warp > 0) excl += warp_total[warp - 1];
  const float total = static_cast<float>(warp_total[blockDim.x / 32 - 1]);
  double run = excl;
  for (int j = start; j < stop; ++j) {
    run += s_val[j];
    if (j + 1 < bins) cdf[j + 1] = __fdiv_rn(static_cast<float>(run), total);
  }
  if (threadIdx.x == 0) {
    cdf[0] = 0.0f;
    cdf[bins] = 1.0f;
  }
}

// EMA of one bin with `count` hits of mean `mean`; returns the bin's scan value.
__device__ __forceinline__ double ema_bin(float* __restrict__ ema, int k, bool hit, float mean,
                                          const Params& p) {
  float e = ema[k];
  if (hit) {
    e = __fadd_rn(__fmul_rn(p.a, e), __fmul_rn(p.b, mean));
    ema[k] = e;
  }
  return static_cast<double>(isnan(e) ? e : fmaxf(e, FLT_MIN));
}

// The whole block: EMA on hit bins, then the cdf scan. Expects the histogram complete in shared
// memory (caller syncs); reuses s_sum for the scan.
__device__ void finalize(float* __restrict__ ema, float* __restrict__ cdf, double* s_sum,
                         const unsigned* s_cnt, const Params& p) {
  for (int k = threadIdx.x; k < p.bins; k += blockDim.x) {
    const bool hit = s_cnt[k] > 0u;
    const float mean =
        hit ? __fdiv_rn(static_cast<float>(s_sum[k]), static_cast<float>(s_cnt[k])) : 0.0f;
    s_sum[k] = ema_bin(ema, k, hit, mean, p);
  }
  __syncthreads();
  scan_cdf(cdf, s_sum, p.bins);
}

__global__ void __launch_bounds__(kThreads)
    adaptive_fused_kernel(float* __restrict__ ema, float* __restrict__ cdf,
                          const float* __restrict__ lam, const float* __restrict__ val, int64_t n,
                          Params p) {
  extern __shared__ double smem[];
  double* s_sum = smem;
  unsigned* s_cnt = reinterpret_cast<unsigned*>(s_sum + p.bins);
  zero_hist(s_sum, s_cnt, p.bins);
  __syncthreads();
  accumulate(lam, val, n, 0, blockDim.x, p, s_sum, s_cnt);
  __syncthreads();
  finalize(ema, cdf, s_sum, s_cnt, p);
}

__global__ void __launch_bounds__(kThreads)
    adaptive_partial_kernel(const float* __restrict__ lam, const float* __restrict__ val,
                            int64_t n, Params p, double* __restrict__ part_sum,
                            unsigned* __restrict__ part_cnt) {
  extern __shared__ double smem[];
  double* s_sum = smem;
  unsigned* s_cnt = reinterpret_cast<unsigned*>(s_sum + p.bins);
  zero_hist(s_sum, s_cnt, p.bins);
  __syncthreads();
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  accumulate(lam, val, n, static_cast<int64_t>(blockIdx.x) * blockDim.x, step, p, s_sum, s_cnt);
  __syncthreads();
  const int64_t row = static_cast<int64_t>(blockIdx.x) * p.bins;
  for (int k = threadIdx.x; k < p.bins; k += blockDim.x) {
    part_sum[row + k] = s_sum[k];
    part_cnt[row + k] = s_cnt[k];
  }
}

__global__ void __launch_bounds__(kThreads)
    adaptive_finalize_kernel(float* __restrict__ ema, float* __restrict__ cdf,
                             const double* __restrict__ part_sum,
                             const unsigned* __restrict__ part_cnt, int parts, Params p) {
  extern __shared__ double smem[];
  double* s_sum = smem;
  unsigned* s_cnt = reinterpret_cast<unsigned*>(s_sum + p.bins);
  for (int k = threadIdx.x; k < p.bins; k += blockDim.x) {
    double s = 0.0;
    unsigned c = 0u;
    for (int g = 0; g < parts; ++g) {  // fixed order: deterministic
      s += part_sum[static_cast<int64_t>(g) * p.bins + k];
      c += part_cnt[static_cast<int64_t>(g) * p.bins + k];
    }
    s_sum[k] = s;
    s_cnt[k] = c;
  }
  __syncthreads();
  finalize(ema, cdf, s_sum, s_cnt, p);
}

// adaptive_bin_stats, one launch: histogram of the batch, added into stats [2, bins].
__global__ void __launch_bounds__(kThreads)
    bin_stats_fused_kernel(float* __restrict__ stats, const float* __restrict__ lam,
                           const float* __restrict__ val, int64_t n, Params p) {
  extern __shared__ double smem[];
  double* s_sum = smem;
  unsigned* s_cnt = reinterpret_cast<unsigned*>(s_sum + p.bins);
  zero_hist(s_sum, s_cnt, p.bins);
  __syncthreads();
  accumulate(lam, val, n, 0, blockDim.x, p, s_sum, s_cnt);
  __syncthreads();
  for (int k = threadIdx.x; k < p.bins; k += blockDim.x) {
    stats[k] = __fadd_rn(stats[k], static_cast<float>(s_sum[k]));
    stats[p.bins + k] = __fadd_rn(stats[p.bins + k], static_cast<float>(s_cnt[k]));
  }
}

// adaptive_bin_stats for large batches: reduce the partial histograms in a fixed order.
__global__ void __launch_bounds__(kThreads)
    bin_stats_reduce_kernel(float* __restrict__ stats, const double* __restrict__ part_sum,
                            const unsigned* __restrict__ part_cnt, int parts, int bins) {
  for (int k = threadIdx.x; k < bins; k += blockDim.x) {
    double s = 0.0;
    unsigned c = 0u;
    for (int g = 0; g < parts; ++g) {
      s += part_sum[static_cast<int64_t>(g) * bins + k];
      c += part_cnt[static_cast<int64_t>(g) * bins + k];
    }
    stats[k] = __fadd_rn(stats[k], static_cast<float>(s));
    stats[bins + k] = __fadd_rn(stats[bins + k], static_cast<float>(c));
  }
}

// adaptive_apply_stats: one block, EMA of the hit bins from [sums; counts], then the cdf scan.
__global__ void __launch_bounds__(kThreads)
    apply_stats_kernel(float* __restrict__ ema, float* __restrict__ cdf,
                       const float* __restrict__ stats, Params p) {
  extern __shared__ double smem[];
  for (int k = threadIdx.x; k < p.bins; k += blockDim.x) {
    const float sum = stats[k];
    const float cnt = stats[p.bins + k];
    const bool hit = cnt > 0.0f;
    const float mean = __fdiv_rn(sum, fmaxf(cnt, 1.0f));  // as sums / counts.clamp_min(1)
    smem[k] = ema_bin(ema, k, hit, mean, p);
  }
  __syncthreads();
  scan_cdf(cdf, smem, p.bins);
}

Params make_params(int64_t bins, double decay, double logsnr_min, double logsnr_max) {
  const Params p = make_params(bins, decay, logsnr_min, logsnr_max);
  return p;
}

void adaptive_ema_update_cuda(at::Tensor& ema, at::Tensor& cdf, const at::Tensor& logsnr,
                              const at::Tensor& value, double decay, double logsnr_min,
                              double logsnr_max) {
  constexpr const char* op = "vdmpp::adaptive_ema_update";
  check_adaptive(ema, cdf, logsnr, value, decay, logsnr_min, logsnr_max);
  TORCH_CHECK(ema.is_cuda(), op, ": CUDA kernel got a ", ema.device(), " tensor");
  const int64_t bins = ema.numel();
  TORCH_CHECK(bins <= kMaxBins, op, ": the CUDA kernel supports at most ", kMaxBins,
              " bins, got ", bins);
  const c10::cuda::CUDAGuard guard(ema.device());
  // bf16 inputs are upcast first (one extra launch each); float32 is read in place.
  const at::Tensor lam = logsnr.scalar_type() == at::kFloat ? logsnr : logsnr.to(at::kFloat);
  const at::Tensor val = value.scalar_type() == at::kFloat ? value : value.to(at::kFloat);
  const int64_t n = lam.numel();

  const Params p = make_params(bins, decay, logsnr_min, logsnr_max);
  const size_t smem = static_cast<size_t>(bins) * (sizeof(double) + sizeof(unsigned));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  float* e = ema.mutable_data_ptr<float>();
  float* c = cdf.mutable_data_ptr<float>();
  const float* lp = lam.const_data_ptr<float>();
  const float* vp = val.const_data_ptr<float>();

  if (n <= kSingleBlockMax) {
    adaptive_fused_kernel<<<1, kThreads, smem, stream>>>(e, c, lp, vp, n, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int parts = static_cast<int>(
      std::min<int64_t>(kMaxPartials, (n + 4 * kThreads - 1) / (4 * kThreads)));
  const at::Tensor part_sum = at::empty({parts, bins}, ema.options().dtype(at::kDouble));
  const at::Tensor part_cnt = at::empty({parts, bins}, ema.options().dtype(at::kInt));
  auto* ps = static_cast<double*>(part_sum.mutable_data_ptr());
  auto* pc = static_cast<unsigned*>(part_cnt.mutable_data_ptr());
  adaptive_partial_kernel<<<parts, kThreads, smem, stream>>>(lp, vp, n, p, ps, pc);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  adaptive_finalize_kernel<<<1, kThreads, smem, stream>>>(e, c, ps, pc, parts, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void adaptive_bin_stats_cuda(at::Tensor& stats, const at::Tensor& logsnr,
                             const at::Tensor& value, double logsnr_min, double logsnr_max) {
  constexpr const char* op = "vdmpp::adaptive_bin_stats";
  check_bin_stats(stats, logsnr, value, logsnr_min, logsnr_max);
  TORCH_CHECK(stats.is_cuda(), op, ": CUDA kernel got a ", stats.device(), " tensor");
  const int64_t bins = stats.size(1);
  TORCH_CHECK(bins <= kMaxBins, op, ": the CUDA kernel supports at most ", kMaxBins,
              " bins, got ", bins);
  const c10::cuda::CUDAGuard guard(stats.device());
  const at::Tensor lam = logsnr.scalar_type() == at::kFloat ? logsnr : logsnr.to(at::kFloat);
  const at::Tensor val = value.scalar_type() == at::kFloat ? value : value.to(at::kFloat);
  const int64_t n = lam.numel();
  const Params p = make_params(bins, 0.5, logsnr_min, logsnr_max);  // decay unused here
  const size_t smem = static_cast<size_t>(bins) * (sizeof(double) + sizeof(unsigned));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  float* st = stats.mutable_data_ptr<float>();
  const float* lp = lam.const_data_ptr<float>();
  const float* vp = val.const_data_ptr<float>();
  if (n <= kSingleBlockMax) {
    bin_stats_fused_kernel<<<1, kThreads, smem, stream>>>(st, lp, vp, n, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int parts = static_cast<int>(
      std::min<int64_t>(kMaxPartials, (n + 4 * kThreads - 1) / (4 * kThreads)));
  const at::Tensor part_sum = at::empty({parts, bins}, stats.options().dtype(at::kDouble));
  const at::Tensor part_cnt = at::empty({parts, bins}, stats.options().dtype(at::kInt));
  auto* ps = static_cast<double*>(part_sum.mutable_data_ptr());
  auto* pc = static_cast<unsigned*>(part_cnt.mutable_data_ptr());
  adaptive_partial_kernel<<<parts, kThreads, smem, stream>>>(lp, vp, n, p, ps, pc);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  bin_stats_reduce_kernel<<<1, kThreads, 0, stream>>>(st, ps, pc, parts, p.bins);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void adaptive_apply_stats_cuda(at::Tensor& ema, at::Tensor& cdf, const at::Tensor& stats,
                               double decay) {
  constexpr const char* op = "vdmpp::adaptive_apply_stats";
  check_apply_stats(ema, cdf, stats, decay);
  TORCH_CHECK(ema.is_cuda(), op, ": CUDA kernel got a ", ema.device(), " tensor");
  const int64_t bins = ema.numel();
  TORCH_CHECK(bins <= kMaxBins, op, ": the CUDA kernel supports at most ", kMaxBins,
              " bins, got ", bins);
  const c10::cuda::CUDAGuard guard(ema.device());
  const Params p = make_params(bins, decay, 0.0, 1.0);  // the binning is unused here
  const size_t smem = static_cast<size_t>(bins) * sizeof(double);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  apply_stats_kernel<<<1, kThreads, smem, stream>>>(ema.mutable_data_ptr<float>(),
                                                    cdf.mutable_data_ptr<float>(),
                                                    stats.const_data_ptr<float>(), p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Does this translation unit's code have an image that runs on the current device?
// cudaFuncGetAttributes fails with cudaErrorInvalidDeviceFunction / NoKernelImageForDevice when
// neither SASS for the device nor PTX it can JIT was built in. No launch, no sync.
bool adaptive_kernel_image_ok() {
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, apply_stats_kernel);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // a non-sticky error: clear it so later calls do not see it
    return false;
  }
  return true;
}

}  // namespace cuda

TORCH_LIBRARY_IMPL(vdmpp, CUDA, m) {
  m.impl("adaptive_ema_update", &cuda::adaptive_ema_update_cuda);
  m.impl("adaptive_bin_stats", &cuda::adaptive_bin_stats_cuda);
  m.impl("adaptive_apply_stats", &cuda::adaptive_apply_stats_cuda);
}

}  // namespace vdmpp
