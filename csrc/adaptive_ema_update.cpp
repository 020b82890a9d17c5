// CPU kernels of vdmpp::adaptive_ema_update, vdmpp::adaptive_bin_stats and
// vdmpp::adaptive_apply_stats (VDM++, Kingma & Gao 2023, App. F/H; eq. 136).
//
// Match vdmpp.schedules.Adaptive.bin_stats + apply_stats bit for bit: the per-bin sums are
// accumulated in float32 in batch order (as index_add_ does), the EMA is (decay*ema) +
// ((1-decay)*mean) in float32, and the cumulative sum runs in double (as CPU cumsum does) before
// normalising in float32. The batch pass is deliberately sequential: it keeps the sums in the
// reference's order, and the batch of one training step (10^2..10^4) takes microseconds.
//
// Data parallelism: adaptive_bin_stats adds one micro-batch's [sums; counts] into a [2, bins]
// accumulator (sum-reducible: all-reduce it), adaptive_apply_stats then runs the EMA and the
// CDF refresh from the reduced statistics. adaptive_ema_update is the two in one call.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "params.h"

namespace vdmpp {
namespace {

// Per-bin float32 sums and counts of one batch, in batch order (index_add_'s order).
void bin_batch(const at::Tensor& logsnr, const at::Tensor& value, int64_t bins,
               double logsnr_min, double logsnr_max, const char* op, std::vector<float>& sums,
               std::vector<float>& counts) {
  const at::Tensor lam_t = logsnr.scalar_type() == at::kFloat ? logsnr : logsnr.to(at::kFloat);
  const at::Tensor val_t = value.scalar_type() == at::kFloat ? value : value.to(at::kFloat);
  const float* lam = lam_t.const_data_ptr<float>();
  const float* val = val_t.const_data_ptr<float>();
  const int64_t n = lam_t.numel();
  // Bin k = clamp(floor((λ - λmin) / Δ), 0, bins - 1), in float32 like the reference; the same
  // parameters and binning (params.h) as the CUDA kernels.
  const AdaptiveParams p = make_adaptive_params(bins, 0.5, logsnr_min, logsnr_max);
  sums.assign(bins, 0.0f);
  counts.assign(bins, 0.0f);
  for (int64_t i = 0; i < n; ++i) {  // NaN λ first: nothing is written when it raises
    // ValueError in Python, like Adaptive.bin_stats on CPU.
    TORCH_CHECK_VALUE(!std::isnan(lam[i]), op, ": logsnr contains NaN (first at index ", i, ")");
  }
  for (int64_t i = 0; i < n; ++i) {
    const float l = lam[i];
    const float v = val[i];
    if (!std::isfinite(l) || !std::isfinite(v)) continue;  // ignored, as in the reference
    const int k = bin_of(l, p);
    sums[k] += v;
    counts[k] += 1.0f;
  }
}

// EMA on the hit bins (counts > 0; mean = sum / max(count, 1)), then
// cdf = [0, cumsum(max(ema, FLT_MIN)) / total, ..., exactly 1]. The floor FLT_MIN (the smallest
// normal float) keeps Σ > 0, so an EMA decayed to 0 everywhere gives the uniform schedule, not
// 0/0; next to any ordinary bin it vanishes in the double cumulative sum.
void ema_and_cdf(float* e, float* c, const float* sums, const float* counts, int64_t bins,
                 double decay) {
  const AdaptiveParams p = make_adaptive_params(bins, decay, 0.0, 1.0);  // a, b only
  const float a = p.a;
  const float b = p.b;
  for (int64_t k = 0; k < bins; ++k) {
    if (counts[k] > 0.0f) {
      const float mean = sums[k] / std::max(counts[k], 1.0f);
      const float kept = a * e[k];
      const float moved = b * mean;
      e[k] = kept + moved;
    }
  }
  std::vector<float> cum(bins);
  double run = 0.0;
  for (int64_t k = 0; k < bins; ++k) {
    const float m = e[k];
    run += static_cast<double>(std::isnan(m) ? m : std::max(m, FLT_MIN));
    cum[k] = static_cast<float>(run);
  }
  const float total = cum[bins - 1];
  c[0] = 0.0f;
  for (int64_t k = 0; k + 1 < bins; ++k) c[k + 1] = cum[k] / total;
  c[bins] = 1.0f;
}

void adaptive_ema_update_cpu(at::Tensor& ema, at::Tensor& cdf, const at::Tensor& logsnr,
                             const at::Tensor& value, double decay, double logsnr_min,
                             double logsnr_max) {
  constexpr const char* op = "vdmpp::adaptive_ema_update";
  check_adaptive(ema, cdf, logsnr, value, decay, logsnr_min, logsnr_max);
  TORCH_CHECK(ema.device().is_cpu(), op, ": CPU kernel got a ", ema.device(), " tensor");
  const int64_t bins = ema.numel();
  std::vector<float> sums, counts;
  bin_batch(logsnr, value, bins, logsnr_min, logsnr_max, op, sums, counts);
  ema_and_cdf(ema.mutable_data_ptr<float>(), cdf.mutable_data_ptr<float>(), sums.data(),
              counts.data(), bins, decay);
}

void adaptive_bin_stats_cpu(at::Tensor& stats, const at::Tensor& logsnr, const at::Tensor& value,
                            double logsnr_min, double logsnr_max) {
  constexpr const char* op = "vdmpp::adaptive_bin_stats";
  check_bin_stats(stats, logsnr, value, logsnr_min, logsnr_max);
  TORCH_CHECK(stats.device().is_cpu(), op, ": CPU kernel got a ", stats.device(), " tensor");
  const int64_t bins = stats.size(1);
  std::vector<float> sums, counts;
  bin_batch(logsnr, value, bins, logsnr_min, logsnr_max, op, sums, counts);
  // stats += [sums; counts]: the reference's `stats += bin_stats(...)` (this batch from zero).
  float* s = stats.mutable_data_ptr<float>();
  for (int64_t k = 0; k < bins; ++k) {
    s[k] += sums[k];
    s[bins + k] += counts[k];
  }
}

void adaptive_apply_stats_cpu(at::Tensor& ema, at::Tensor& cdf, const at::Tensor& stats,
                              double decay) {
  constexpr const char* op = "vdmpp::adaptive_apply_stats";
  check_apply_stats(ema, cdf, stats, decay);
  TORCH_CHECK(ema.device().is_cpu(), op, ": CPU kernel got a ", ema.device(), " tensor");
  const int64_t bins = ema.numel();
  const float* s = stats.const_data_ptr<float>();
  ema_and_cdf(ema.mutable_data_ptr<float>(), cdf.mutable_data_ptr<float>(), s, s + bins, bins,
              decay);
}

}  // namespace

TORCH_LIBRARY_IMPL(vdmpp, CPU, m) {
  m.impl("adaptive_ema_update", &adaptive_ema_update_cpu);
  m.impl("adaptive_bin_stats", &adaptive_bin_stats_cpu);
  m.impl("adaptive_apply_stats", &adaptive_apply_stats_cpu);
}

}  // namespace vdmpp
