// Host-side setup shared by the CPU and the CUDA kernels of the vdmpp ops: the adaptive binning
// parameters, the deterministic fixed-point bin sums, the launch geometry of the elementwise
// kernels (grid size, 16-byte-aligned vector body between scalar head and tail, the grid-stride
// loop) and, through checks.h, the dtype/layout checks.
//
// The functions marked VDMPP_HD compile for both sides: the CUDA kernels call them on the device,
// and the CPU kernels plus the `vdmpp::_debug_*` ops (debug_ops.cpp) call them on the host, so
// the CPU tests exercise exactly the code the GPU runs (tests/test_kernels_params.py).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "checks.h"

#if defined(__CUDACC__)
#define VDMPP_HD __host__ __device__ __forceinline__
#else
#define VDMPP_HD inline
#endif

namespace vdmpp {

// --- adaptive schedule (VDM++ App. F/H) -------------------------------------------------------
struct AdaptiveParams {
  float lmin, width, last;  // bin k = clamp(floor((λ - lmin) / width), 0, last)
  float a, b;               // ema <- a * ema + b * mean on hit bins (a = decay, b = 1 - decay)
  int bins;
};

// Every value in float32 as the PyTorch reference (vdmpp.schedules.Adaptive) computes it: the
// width (λmax - λmin) / bins and 1 - decay in double (Python floats), then rounded to float32.
inline AdaptiveParams make_adaptive_params(int64_t bins, double decay, double logsnr_min,
                                           double logsnr_max) {
  TORCH_CHECK(bins >= 1 && bins <= (int64_t{1} << 24), "vdmpp: bins must lie in [1, 2^24], got ",
              bins);
  AdaptiveParams p{};
  p.lmin = static_cast<float>(logsnr_min);
  p.width = static_cast<float>((logsnr_max - logsnr_min) / static_cast<double>(bins));
  p.last = static_cast<float>(bins - 1);
  p.a = static_cast<float>(decay);
  p.b = static_cast<float>(1.0 - decay);
  p.bins = static_cast<int>(bins);
  return p;
}

// The bin of a finite λ. One subtraction and one IEEE division (nothing an FMA could contract),
// so host and device agree bit for bit.
VDMPP_HD int bin_of(float l, const AdaptiveParams& p) {
  float q = floorf((l - p.lmin) / p.width);
  q = fminf(fmaxf(q, 0.0f), p.last);
  return static_cast<int>(q);
}

VDMPP_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// --- deterministic bin sums: fixed point ------------------------------------------------------
// The CUDA kernels sum each bin's values in parallel with atomics, whose order changes from run
// to run. To make the result independent of that order, every value is first turned into an
// int64 multiple of a per-bin quantum 2^(e - F), and only integers are added: integer addition
// is associative and commutative, so any order (any thread schedule, any grid) gives the same
// bits. e is a bound on the bin's magnitudes (|v| < 2^e for every value in the bin), taken from
// the largest float exponent seen in the bin — a max, also order-independent; F = 62 - ceil(log2
// n) leaves room for n terms: |Σ| < n * 2^F <= 2^62, no overflow. Each term is rounded once, to
// half a quantum, so a bin's sum is off by at most n * 2^(e - F - 1); as the bin's largest
// magnitude is >= 2^(e - 1), that is a relative error below n * 2^-F <= 2^-(62 - 2 ceil(log2 n))
// of the largest |v| (of the sum itself for non-negative values such as w(λ)·loss): 2^-34 at
// n = 16384, far below float32's 2^-24 (tests: test_kernels_params.py, a float64 oracle).

// F for a batch of n values.
VDMPP_HD int fixed_frac_bits(int64_t n) {
  int lg = 0;
  while (lg < 62 && (int64_t{1} << lg) < n) ++lg;  // ceil(log2(max(n, 1)))
  return 62 - lg;
}

// The biased float32 exponent field of |v| (0 for zero and subnormals): atomicMax'ed per bin.
VDMPP_HD int biased_exponent(float v) { return static_cast<int>((float_bits(v) >> 23) & 0xFFu); }

// e with |v| < 2^e for every finite v whose biased exponent is at most `be_max`.
VDMPP_HD int exponent_bound(int be_max) { return (be_max > 1 ? be_max : 1) - 126; }

// v in units of the bin's quantum 2^(e - F), rounded to nearest (ties to even). Exact scaling
// by a power of two in double (24 significant bits, no overflow: |result| < 2^F).
VDMPP_HD long long to_fixed(float v, int be_max, int frac_bits) {
  const double scaled = ldexp(static_cast<double>(v), frac_bits - exponent_bound(be_max));
#if defined(__CUDA_ARCH__)
  return __double2ll_rn(scaled);
#else
  return std::llrint(scaled);
#endif
}

// A bin's fixed-point sum back to a real number (double; the kernels round it to float32).
VDMPP_HD double from_fixed(long long sum, int be_max, int frac_bits) {
  return ldexp(static_cast<double>(sum), exponent_bound(be_max) - frac_bits);
}

// --- launch geometry of the adaptive kernels --------------------------------------------------
constexpr int kAdaptiveThreads = 1024;
constexpr int64_t kAdaptiveMaxBins = 2048;          // shared memory: 2048 * (8 + 4 + 4) = 32 KiB
constexpr int64_t kAdaptiveSingleBlockMax = 16384;  // one block (one launch) up to this batch
constexpr int64_t kAdaptiveMaxParts = 128;          // blocks of the multi-block path

// Blocks of the multi-block path for a batch of n (a function of n alone, no device query).
inline int adaptive_parts(int64_t n) {
  const int64_t per_block = 4 * kAdaptiveThreads;
  const int64_t want = (n + per_block - 1) / per_block;
  return static_cast<int>(want < 1 ? 1 : (want > kAdaptiveMaxParts ? kAdaptiveMaxParts : want));
}

// --- launch geometry of the elementwise kernels (heun_step, churn) ----------------------------
constexpr int kElementwiseThreads = 256;
constexpr int kElementwiseBlocksPerSm = 8;

// Enough resident blocks to fill the device; the grid-stride loop covers the rest.
inline int grid_for(int64_t work_items, int threads, int sm_count, int blocks_per_sm) {
  const int64_t want = (work_items + threads - 1) / threads;
  const int64_t cap = static_cast<int64_t>(sm_count > 0 ? sm_count : 1) * blocks_per_sm;
  return static_cast<int>(want < 1 ? 1 : (want < cap ? want : cap));
}

// Elements [0, head) and [head + n_vec * width, n) are done one by one; the `n_vec` packs of
// `width` elements in between with one 16-byte load/store per operand each. The vector body
// starts at the first 16-byte boundary, so a view at an offset (x[1:]) still takes 16-byte
// accesses, provided every operand has the same misalignment (else: width 1, all scalar).
struct ElementwisePlan {
  int64_t n, head, n_vec;
  int width, grid, threads;
};

// misalign[i]: (address of operand i) mod 16, in bytes.
inline ElementwisePlan plan_elementwise(int64_t n, int elem_size, const int* misalign,
                                        int n_operands, int sm_count,
                                        int blocks_per_sm = kElementwiseBlocksPerSm,
                                        int threads = kElementwiseThreads) {
  TORCH_CHECK(n >= 0 && (elem_size == 2 || elem_size == 4), "vdmpp: bad elementwise plan");
  ElementwisePlan p{n, 0, 0, 1, 1, threads};
  bool same = n_operands > 0 && misalign[0] % elem_size == 0;
  for (int i = 1; i < n_operands && same; ++i) same = misalign[i] == misalign[0];
  if (same) {
    const int w = 16 / elem_size;
    int64_t head = ((16 - misalign[0]) % 16) / elem_size;
    head = head < n ? head : n;
    p.head = head;
    p.n_vec = (n - head) / w;
    p.width = w;
  }
  const int64_t scalar = n - p.n_vec * p.width;
  p.grid = grid_for(p.n_vec > scalar ? p.n_vec : scalar, threads, sm_count, blocks_per_sm);
  return p;
}

// The kernels' loop, shared with the host emulation: thread `tid` of `stride` threads calls
// vec(e) for the packs starting at element e = head + i * width (i = tid, tid + stride, ...) and
// one(e) for its share of the head and tail elements. Every element once, for any grid.
template <typename Vec, typename One>
VDMPP_HD void elementwise_loop(const ElementwisePlan& p, int64_t tid, int64_t stride, Vec&& vec,
                               One&& one) {
  for (int64_t i = tid; i < p.n_vec; i += stride) vec(p.head + i * p.width);
  const int64_t tail = p.head + p.n_vec * p.width;
  const int64_t n_scalar = p.head + (p.n - tail);
  for (int64_t j = tid; j < n_scalar; j += stride) one(j < p.head ? j : tail + (j - p.head));
}

}  // namespace vdmpp
