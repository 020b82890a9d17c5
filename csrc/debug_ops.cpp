// vdmpp::_debug_* ops: the host-side setup the CUDA kernels use (params.h), run on the CPU so
// that CPU-only tests check it (tests/test_kernels_params.py). Not part of the public API.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "params.h"

namespace vdmpp {
namespace {

// [lmin, width, last, a, b, bins] as make_adaptive_params sets them for the CUDA kernels.
std::vector<double> debug_adaptive_params(int64_t bins, double decay, double logsnr_min,
                                          double logsnr_max) {
  const AdaptiveParams p = make_adaptive_params(bins, decay, logsnr_min, logsnr_max);
  // Widened one at a time through a volatile: g++ 12's SLP vectoriser drops the float rounding
  // of paired (double)(float)x conversions at -O2/-O3 (seen here), which would hide the values.
  const float fields[5] = {p.lmin, p.width, p.last, p.a, p.b};
  std::vector<double> out;
  for (const float f : fields) {
    const volatile float kept = f;
    out.push_back(static_cast<double>(kept));
  }
  out.push_back(static_cast<double>(p.bins));
  return out;
}

ElementwisePlan plan_from(int64_t n, int64_t elem_size, const std::vector<int64_t>& misalign,
                          int64_t sm_count, int64_t blocks_per_sm) {
  std::vector<int> mis(misalign.begin(), misalign.end());
  return plan_elementwise(n, static_cast<int>(elem_size), mis.data(), static_cast<int>(mis.size()),
                          static_cast<int>(sm_count), static_cast<int>(blocks_per_sm));
}

// [head, n_vec, width, grid, threads, trips]: the launch of heun_step / churn for n elements of
// elem_size bytes whose operands sit at `misalign` bytes past a 16-byte boundary, on a device
// with sm_count multiprocessors. trips: iterations of the longer grid-stride loop per thread.
std::vector<int64_t> debug_elementwise_plan(int64_t n, int64_t elem_size,
                                            std::vector<int64_t> misalign, int64_t sm_count,
                                            int64_t blocks_per_sm) {
  const ElementwisePlan p = plan_from(n, elem_size, misalign, sm_count, blocks_per_sm);
  const int64_t stride = static_cast<int64_t>(p.grid) * p.threads;
  const int64_t scalar = p.n - p.n_vec * p.width;
  const int64_t longest = p.n_vec > scalar ? p.n_vec : scalar;
  return {p.head, p.n_vec, p.width, p.grid, p.threads, (longest + stride - 1) / stride};
}

// How often each element is visited when every thread of that launch runs the kernels' loop
// (elementwise_loop); a vector access that is not 16-byte aligned is an error.
at::Tensor debug_elementwise_coverage(int64_t n, int64_t elem_size, std::vector<int64_t> misalign,
                                      int64_t sm_count, int64_t blocks_per_sm) {
  const ElementwisePlan p = plan_from(n, elem_size, misalign, sm_count, blocks_per_sm);
  at::Tensor counts = at::zeros({n}, at::kInt);
  int32_t* c = counts.mutable_data_ptr<int32_t>();
  const int64_t stride = static_cast<int64_t>(p.grid) * p.threads;
  const int64_t base = misalign.empty() ? 0 : misalign[0];
  for (int64_t tid = 0; tid < stride; ++tid) {
    elementwise_loop(
        p, tid, stride,
        [&](int64_t e) {
          TORCH_CHECK((base + e * elem_size) % 16 == 0, "unaligned vector access at ", e);
          for (int j = 0; j < p.width; ++j) ++c[e + j];
        },
        [&](int64_t e) { ++c[e]; });
  }
  return counts;
}

// [2, bins] float64: the per-bin sums (fixed point, as the CUDA kernels add them) and counts of
// the finite (λ, value) pairs, visiting the batch forwards or backwards (the sums must not care).
at::Tensor debug_fixed_bin_sums(const at::Tensor& logsnr, const at::Tensor& value, int64_t bins,
                                double logsnr_min, double logsnr_max, bool reverse) {
  TORCH_CHECK(logsnr.dim() == 1 && logsnr.sizes() == value.sizes() && logsnr.device().is_cpu(),
              "vdmpp::_debug_fixed_bin_sums: 1-D CPU logsnr and value of one shape");
  const at::Tensor lam_t = logsnr.to(at::kFloat).contiguous();
  const at::Tensor val_t = value.to(at::kFloat).contiguous();
  const float* lam = lam_t.const_data_ptr<float>();
  const float* val = val_t.const_data_ptr<float>();
  const int64_t n = lam_t.numel();
  const AdaptiveParams p = make_adaptive_params(bins, 0.5, logsnr_min, logsnr_max);
  const int frac = fixed_frac_bits(n);
  std::vector<int> be(bins, 0);
  std::vector<long long> sum(bins, 0);
  std::vector<int64_t> cnt(bins, 0);
  auto at_ = [&](int64_t i) { return reverse ? n - 1 - i : i; };
  for (int64_t j = 0; j < n; ++j) {  // pass 1: the per-bin exponent bound (a max) and count
    const int64_t i = at_(j);
    if (!std::isfinite(lam[i]) || !std::isfinite(val[i])) continue;
    const int k = bin_of(lam[i], p);
    be[k] = std::max(be[k], biased_exponent(val[i]));
    ++cnt[k];
  }
  for (int64_t j = 0; j < n; ++j) {  // pass 2: integer sums
    const int64_t i = at_(j);
    if (!std::isfinite(lam[i]) || !std::isfinite(val[i])) continue;
    const int k = bin_of(lam[i], p);
    sum[k] += to_fixed(val[i], be[k], frac);
  }
  at::Tensor out = at::empty({2, bins}, at::kDouble);
  double* o = out.mutable_data_ptr<double>();
  for (int64_t k = 0; k < bins; ++k) {
    o[k] = from_fixed(sum[k], be[k], frac);
    o[bins + k] = static_cast<double>(cnt[k]);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vdmpp, m) {
  m.def(
      "_debug_adaptive_params(int bins, float decay, float logsnr_min, float logsnr_max) -> "
      "float[]",
      TORCH_FN(debug_adaptive_params));
  m.def(
      "_debug_elementwise_plan(int n, int elem_size, int[] misalign, int sm_count, "
      "int blocks_per_sm) -> int[]",
      TORCH_FN(debug_elementwise_plan));
  m.def(
      "_debug_elementwise_coverage(int n, int elem_size, int[] misalign, int sm_count, "
      "int blocks_per_sm) -> Tensor",
      TORCH_FN(debug_elementwise_coverage));
  m.def(
      "_debug_fixed_bin_sums(Tensor logsnr, Tensor value, int bins, float logsnr_min, "
      "float logsnr_max, bool reverse=False) -> Tensor",
      TORCH_FN(debug_fixed_bin_sums));
}

}  // namespace vdmpp
