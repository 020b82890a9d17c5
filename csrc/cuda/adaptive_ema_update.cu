// CUDA kernels of vdmpp::adaptive_ema_update and of the data-parallel pair
// vdmpp::adaptive_bin_stats / vdmpp::adaptive_apply_stats (VDM++, Kingma & Gao 2023, App. F/H).
//
// No host sync and CUDA-graph capturable. Batches up to kAdaptiveSingleBlockMax take ONE launch:
// a single block builds the per-bin histogram in shared memory, applies the EMA to the hit bins
// and scans the cdf. Larger batches take a zero-fill and three launches over a global [bins]
// workspace (exponent + count pass, sum pass, one finalising block). Non-finite λ (NaN
// included) or value are masked, not errors.
//
// Deterministic by construction: the per-bin sums are integers. Each value becomes an int64
// multiple of its bin's quantum 2^(e - F) (params.h: to_fixed), where e bounds the bin's
// magnitudes (from the largest float exponent in the bin: an atomicMax, whose result does not
// depend on order) and F = 62 - ceil(log2 n) rules out overflow. Integer addition is
// associative, so the atomics may land in any order, and the blocks of the large-batch path in
// any partition: the same inputs give the same bits on every run, on either path, for any grid.
// (The cdf scan and the EMA have a fixed operation order.) A bin sum is within 2^-34 relative
// of the exact sum at n = 16384 (params.h), i.e. exact after rounding to float32 but for ties.
//
// Warp-level aggregation: lanes of a warp whose elements fall into the same bin (found with
// __match_any_sync) combine their contributions with shuffles first, and one lane per bin does
// the shared-memory atomic, so a hot bin (early training: most λ in one bin) costs one atomic
// per warp instead of 32 serialised ones.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cfloat>

#include "../params.h"

namespace vdmpp {
namespace cuda {
namespace {

constexpr int kThreads = kAdaptiveThreads;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxBins = kAdaptiveMaxBins;
static_assert(kThreads % 32 == 0 && kWarps <= 32, "scan_cdf combines at most 32 warps");
// Shared memory of the histogram kernels: sums (8 B), exponents (4 B), counts (4 B) per bin.
constexpr size_t kHistBytesPerBin = sizeof(long long) + sizeof(int) + sizeof(unsigned);
static_assert(kMaxBins * kHistBytesPerBin <= 48 * 1024, "must fit the default 48 KiB");

using Params = AdaptiveParams;

struct Hist {  // one block's histogram in shared memory
  unsigned long long* sum;
  int* be;  // max biased exponent per bin
  unsigned* cnt;
};

__device__ __forceinline__ Hist hist_in(void* smem, int bins) {
  auto* sum = static_cast<unsigned long long*>(smem);
  int* be = reinterpret_cast<int*>(sum + bins);
  return Hist{sum, be, reinterpret_cast<unsigned*>(be + bins)};
}

__device__ __forceinline__ void zero_hist(const Hist& h, int bins) {
  for (int k = threadIdx.x; k < bins; k += blockDim.x) {
    h.sum[k] = 0ull;
    h.be[k] = 0;
    h.cnt[k] = 0u;
  }
}

// All lanes in `peers` (one bin's lanes of this warp) get the sum / max of x over them.
__device__ __forceinline__ long long peers_sum(unsigned peers, long long x) {
  long long total = 0;
  for (unsigned m = peers; m != 0u; m &= m - 1u) total += __shfl_sync(peers, x, __ffs(m) - 1);
  return total;
}
__device__ __forceinline__ int peers_max(unsigned peers, int x) {
  int best = x;
  for (unsigned m = peers; m != 0u; m &= m - 1u) best = max(best, __shfl_sync(peers, x, __ffs(m) - 1));
  return best;
}

// The warp-uniform loop over this block's share of the batch: elements begin + w*32 + lane,
// stepping by `step` (a multiple of 32), so every lane of a warp runs each trip (needed by
// __match_any_sync); lanes past n or with a non-finite pair take part with bin -1.
template <typename Body>
__device__ __forceinline__ void for_each_warp_tile(const float* __restrict__ lam,
                                                   const float* __restrict__ val, int64_t n,
                                                   int64_t begin, int64_t step, const Params& p,
                                                   Body&& body) {
  const int64_t first = begin + (threadIdx.x & ~31u);
  for (int64_t base = first; base < n; base += step) {
    const int64_t i = base + (threadIdx.x & 31u);
    float l = 0.0f, v = 0.0f;
    if (i < n) {
      l = lam[i];
      v = val[i];
    }
    const bool ok = i < n && isfinite(l) && isfinite(v);
    const int k = ok ? bin_of(l, p) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, k);
    body(k, v, peers, (__ffs(peers) - 1) == static_cast<int>(threadIdx.x & 31u));
  }
}

// Pass 1: per-bin max biased exponent and count.
__device__ __forceinline__ void hist_pass1(const Hist& h, const float* __restrict__ lam,
                                           const float* __restrict__ val, int64_t n,
                                           int64_t begin, int64_t step, const Params& p) {
  for_each_warp_tile(lam, val, n, begin, step, p, [&](int k, float v, unsigned peers, bool lead) {
    const int be = peers_max(peers, biased_exponent(v));
    if (lead && k >= 0) {
      atomicMax(&h.be[k], be);
      atomicAdd(&h.cnt[k], static_cast<unsigned>(__popc(peers)));
    }
  });
}

// Pass 2: per-bin integer sums, with the exponent bounds `be` (shared or global) complete.
__device__ __forceinline__ void hist_pass2(const Hist& h, const int* be,
                                           const float* __restrict__ lam,
                                           const float* __restrict__ val, int64_t n,
                                           int64_t begin, int64_t step, const Params& p,
                                           int frac) {
  for_each_warp_tile(lam, val, n, begin, step, p, [&](int k, float v, unsigned peers, bool lead) {
    const long long q = k >= 0 ? to_fixed(v, be[k], frac) : 0ll;
    const long long s = peers_sum(peers, q);
    if (lead && k >= 0) atomicAdd(&h.sum[k], static_cast<unsigned long long>(s));
  });
}

// A bin's float32 sum from its integer sum.
__device__ __forceinline__ float bin_sum(unsigned long long s, int be, int frac) {
  return static_cast<float>(from_fixed(static_cast<long long>(s), be, frac));
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

// The whole block: EMA on the hit bins from the complete histogram (caller syncs), then the cdf
// scan. The scan's values reuse the sums' slots (each thread reads its bins before writing).
__device__ void finalize(float* __restrict__ ema, float* __restrict__ cdf, const Hist& h,
                         const Params& p, int frac) {
  double* s_val = reinterpret_cast<double*>(h.sum);
  for (int k = threadIdx.x; k < p.bins; k += blockDim.x) {
    const unsigned c = h.cnt[k];
    const bool hit = c > 0u;
    // mean = sum / max(count, 1) in float32, as on CPU (counts are exact in float up to 2^24)
    const float mean = hit ? __fdiv_rn(bin_sum(h.sum[k], h.be[k], frac), static_cast<float>(c))
                           : 0.0f;
    s_val[k] = ema_bin(ema, k, hit, mean, p);
  }
  __syncthreads();
  scan_cdf(cdf, s_val, p.bins);
}

// stats [2, bins] += [sums; counts] of the complete histogram (caller syncs).
__device__ void add_stats(float* __restrict__ stats, const Hist& h, int bins, int frac) {
  for (int k = threadIdx.x; k < bins; k += blockDim.x) {
    stats[k] = __fadd_rn(stats[k], bin_sum(h.sum[k], h.be[k], frac));
    stats[bins + k] = __fadd_rn(stats[bins + k], static_cast<float>(h.cnt[k]));
  }
}

// One block over the whole batch (n <= kAdaptiveSingleBlockMax): the histogram in shared memory.
__device__ void block_hist(const Hist& h, const float* __restrict__ lam,
                           const float* __restrict__ val, int64_t n, const Params& p, int frac) {
  zero_hist(h, p.bins);
  __syncthreads();
  hist_pass1(h, lam, val, n, 0, blockDim.x, p);
  __syncthreads();
  hist_pass2(h, h.be, lam, val, n, 0, blockDim.x, p, frac);
  __syncthreads();
}

__global__ void __launch_bounds__(kThreads)
    adaptive_fused_kernel(float* __restrict__ ema, float* __restrict__ cdf,
                          const float* __restrict__ lam, const float* __restrict__ val, int64_t n,
                          Params p, int frac) {
  extern __shared__ unsigned long long smem_u64[];
  const Hist h = hist_in(smem_u64, p.bins);
  block_hist(h, lam, val, n, p, frac);
  finalize(ema, cdf, h, p, frac);
}

__global__ void __launch_bounds__(kThreads)
    bin_stats_fused_kernel(float* __restrict__ stats, const float* __restrict__ lam,
                           const float* __restrict__ val, int64_t n, Params p, int frac) {
  extern __shared__ unsigned long long smem_u64[];
  const Hist h = hist_in(smem_u64, p.bins);
  block_hist(h, lam, val, n, p, frac);
  add_stats(stats, h, p.bins, frac);
}

// Large batches, launch 1 of 3: each block's exponent bounds and counts, merged into the global
// (zero-filled) workspace with atomicMax / integer atomicAdd (order-independent).
__global__ void __launch_bounds__(kThreads)
    hist_exponent_kernel(const float* __restrict__ lam, const float* __restrict__ val, int64_t n,
                         Params p, Hist g) {
  extern __shared__ unsigned long long smem_u64[];
  const Hist h = hist_in(smem_u64, p.bins);
  zero_hist(h, p.bins);
  __syncthreads();
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  hist_pass1(h, lam, val, n, static_cast<int64_t>(blockIdx.x) * blockDim.x, step, p);
  __syncthreads();
  for (int k = threadIdx.x; k < p.bins; k += blockDim.x) {
    if (h.cnt[k] != 0u) {
      atomicMax(&g.be[k], h.be[k]);
      atomicAdd(&g.cnt[k], h.cnt[k]);
    }
  }
}

// Launch 2 of 3: integer sums with the global exponent bounds, merged with integer atomicAdd.
__global__ void __launch_bounds__(kThreads)
    hist_sum_kernel(const float* __restrict__ lam, const float* __restrict__ val, int64_t n,
                    Params p, int frac, Hist g) {
  extern __shared__ unsigned long long smem_u64[];
  const Hist h = hist_in(smem_u64, p.bins);
  for (int k = threadIdx.x; k < p.bins; k += blockDim.x) {
    h.sum[k] = 0ull;
    h.be[k] = g.be[k];
  }
  __syncthreads();
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  hist_pass2(h, h.be, lam, val, n, static_cast<int64_t>(blockIdx.x) * blockDim.x, step, p, frac);
  __syncthreads();
  for (int k = threadIdx.x; k < p.bins; k += blockDim.x) {
    if (h.sum[k] != 0ull) atomicAdd(&g.sum[k], h.sum[k]);
  }
}

// Launch 3 of 3 (one block): the global histogram into shared memory, then EMA + cdf ...
__global__ void __launch_bounds__(kThreads)
    adaptive_finalize_kernel(float* __restrict__ ema, float* __restrict__ cdf, Hist g, Params p,
                             int frac) {
  extern __shared__ unsigned long long smem_u64[];
  const Hist h = hist_in(smem_u64, p.bins);
  for (int k = threadIdx.x; k < p.bins; k += blockDim.x) {
    h.sum[k] = g.sum[k];
    h.be[k] = g.be[k];
    h.cnt[k] = g.cnt[k];
  }
  __syncthreads();
  finalize(ema, cdf, h, p, frac);
}

// ... or stats += the global histogram.
__global__ void __launch_bounds__(kThreads)
    bin_stats_finalize_kernel(float* __restrict__ stats, Hist g, int bins, int frac) {
  add_stats(stats, g, bins, frac);
}

// adaptive_apply_stats: one block, EMA of the hit bins from [sums; counts], then the cdf scan.
__global__ void __launch_bounds__(kThreads)
    apply_stats_kernel(float* __restrict__ ema, float* __restrict__ cdf,
                       const float* __restrict__ stats, Params p) {
  extern __shared__ double smem_f64[];
  for (int k = threadIdx.x; k < p.bins; k += blockDim.x) {
    const float sum = stats[k];
    const float cnt = stats[p.bins + k];
    const bool hit = cnt > 0.0f;
    const float mean = __fdiv_rn(sum, fmaxf(cnt, 1.0f));  // as sums / counts.clamp_min(1)
    smem_f64[k] = ema_bin(ema, k, hit, mean, p);
  }
  __syncthreads();
  scan_cdf(cdf, smem_f64, p.bins);
}

// The zero-filled global histogram of the large-batch path: sums int64 [bins], then exponents
// and counts int32 [bins] each, in one allocation (one fill launch; graph-capturable).
struct Workspace {
  at::Tensor storage;
  Hist hist;
};

Workspace make_workspace(const at::Tensor& like, int64_t bins) {
  Workspace w{at::zeros({2 * bins}, like.options().dtype(at::kLong)), {}};
  auto* base = static_cast<unsigned long long*>(w.storage.mutable_data_ptr());
  int* be = reinterpret_cast<int*>(base + bins);
  w.hist = Hist{base, be, reinterpret_cast<unsigned*>(be + bins)};
  return w;
}

// bf16 inputs are upcast first (one extra launch each); float32 is read in place.
at::Tensor as_f32(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
}

void check_bins(const char* op, int64_t bins) {
  TORCH_CHECK(bins <= kMaxBins, op, ": the CUDA kernel supports at most ", kMaxBins,
              " bins, got ", bins);
}

// The two histogram launches of the large-batch path into `w`.
void launch_hist(const float* lp, const float* vp, int64_t n, const Params& p, int frac,
                 const Workspace& w, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(p.bins) * kHistBytesPerBin;
  const int parts = adaptive_parts(n);
  hist_exponent_kernel<<<parts, kThreads, smem, stream>>>(lp, vp, n, p, w.hist);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  hist_sum_kernel<<<parts, kThreads, smem, stream>>>(lp, vp, n, p, frac, w.hist);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void adaptive_ema_update_cuda(at::Tensor& ema, at::Tensor& cdf, const at::Tensor& logsnr,
                              const at::Tensor& value, double decay, double logsnr_min,
                              double logsnr_max) {
  constexpr const char* op = "vdmpp::adaptive_ema_update";
  check_adaptive(ema, cdf, logsnr, value, decay, logsnr_min, logsnr_max);
  TORCH_CHECK(ema.is_cuda(), op, ": CUDA kernel got a ", ema.device(), " tensor");
  const int64_t bins = ema.numel();
  check_bins(op, bins);
  const c10::cuda::CUDAGuard guard(ema.device());
  const at::Tensor lam = as_f32(logsnr);
  const at::Tensor val = as_f32(value);
  const int64_t n = lam.numel();
  const Params p = make_adaptive_params(bins, decay, logsnr_min, logsnr_max);
  const int frac = fixed_frac_bits(n);
  const size_t smem = static_cast<size_t>(bins) * kHistBytesPerBin;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  float* e = ema.mutable_data_ptr<float>();
  float* c = cdf.mutable_data_ptr<float>();
  const float* lp = lam.const_data_ptr<float>();
  const float* vp = val.const_data_ptr<float>();
  if (n <= kAdaptiveSingleBlockMax) {
    adaptive_fused_kernel<<<1, kThreads, smem, stream>>>(e, c, lp, vp, n, p, frac);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const Workspace w = make_workspace(ema, bins);
  launch_hist(lp, vp, n, p, frac, w, stream);
  adaptive_finalize_kernel<<<1, kThreads, smem, stream>>>(e, c, w.hist, p, frac);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void adaptive_bin_stats_cuda(at::Tensor& stats, const at::Tensor& logsnr,
                             const at::Tensor& value, double logsnr_min, double logsnr_max) {
  constexpr const char* op = "vdmpp::adaptive_bin_stats";
  check_bin_stats(stats, logsnr, value, logsnr_min, logsnr_max);
  TORCH_CHECK(stats.is_cuda(), op, ": CUDA kernel got a ", stats.device(), " tensor");
  const int64_t bins = stats.size(1);
  check_bins(op, bins);
  const c10::cuda::CUDAGuard guard(stats.device());
  const at::Tensor lam = as_f32(logsnr);
  const at::Tensor val = as_f32(value);
  const int64_t n = lam.numel();
  const Params p = make_adaptive_params(bins, 0.5, logsnr_min, logsnr_max);  // decay unused
  const int frac = fixed_frac_bits(n);
  const size_t smem = static_cast<size_t>(bins) * kHistBytesPerBin;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  float* st = stats.mutable_data_ptr<float>();
  const float* lp = lam.const_data_ptr<float>();
  const float* vp = val.const_data_ptr<float>();
  if (n <= kAdaptiveSingleBlockMax) {
    bin_stats_fused_kernel<<<1, kThreads, smem, stream>>>(st, lp, vp, n, p, frac);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const Workspace w = make_workspace(stats, bins);
  launch_hist(lp, vp, n, p, frac, w, stream);
  bin_stats_finalize_kernel<<<1, kThreads, 0, stream>>>(st, w.hist, p.bins, frac);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void adaptive_apply_stats_cuda(at::Tensor& ema, at::Tensor& cdf, const at::Tensor& stats,
                               double decay) {
  constexpr const char* op = "vdmpp::adaptive_apply_stats";
  check_apply_stats(ema, cdf, stats, decay);
  TORCH_CHECK(ema.is_cuda(), op, ": CUDA kernel got a ", ema.device(), " tensor");
  const int64_t bins = ema.numel();
  check_bins(op, bins);
  const c10::cuda::CUDAGuard guard(ema.device());
  const Params p = make_adaptive_params(bins, decay, 0.0, 1.0);  // the binning is unused here
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
