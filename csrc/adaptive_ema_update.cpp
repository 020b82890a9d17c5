// CPU kernel of vdmpp::adaptive_ema_update (VDM++, seed 000, App. F/H).
//
// Matches vdmpp.schedules.Adaptive.bin_stats + apply_stats bit for bit: the per-bin sums are
// accumulated in float32 in batch order (as index_add_ does), the EMA is (decay*ema) +
// ((1-decay)*mean) in float32, and the cumulative sum runs in double (as CPU cumsum does) before
// normalising in float32. The batch pass is deliberately sequential: it keeps the sums in the
// reference's order, and the batch of one training step (10^2..10^4) takes microseconds.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "checks.h"

namespace vdmpp {
namespace {

void adaptive_ema_update_cpu(at::Tensor& ema, at::Tensor& cdf, const at::Tensor& logsnr,
                             const at::Tensor& value, double decay, double logsnr_min,
                             double logsnr_max) {
  constexpr const char* op = "vdmpp::adaptive_ema_update";
  check_adaptive(ema, cdf, logsnr, value, decay, logsnr_min, logsnr_max);
  TORCH_CHECK(ema.device().is_cpu(), op, ": CPU kernel got a ", ema.device(), " tensor");
  const at::Tensor lam_t = logsnr.scalar_type() == at::kFloat ? logsnr : logsnr.to(at::kFloat);
  const at::Tensor val_t = value.scalar_type() == at::kFloat ? value : value.to(at::kFloat);
  const float* lam = lam_t.const_data_ptr<float>();
  const float* val = val_t.const_data_ptr<float>();
  const int64_t n = lam_t.numel();
  const int64_t bins = ema.numel();

  // Bin k = clamp(floor((λ - λmin) / Δ), 0, bins - 1), in float32 like the reference.
  const float lmin = static_cast<float>(logsnr_min);
  const float width = static_cast<float>((logsnr_max - logsnr_min) / static_cast<double>(bins));
  const float last = static_cast<float>(bins - 1);
  std::vector<float> sums(bins, 0.0f), counts(bins, 0.0f);
  for (int64_t i = 0; i < n; ++i) {
    const float l = lam[i];
    // ValueError in Python, like Adaptive.bin_stats on CPU.
    TORCH_CHECK_VALUE(!std::isnan(l), op, ": logsnr contains NaN (first at index ", i, ")");
    const float v = val[i];
    if (!std::isfinite(l) || !std::isfinite(v)) continue;  // ignored, as in the reference
    const float q = std::floor((l - lmin) / width);
    const auto k = static_cast<int64_t>(std::min(std::max(q, 0.0f), last));
    sums[k] += v;
    counts[k] += 1.0f;
  }

  // EMA on the hit bins, then cdf = [0, cumsum(max(ema, 0)) / total, ..., exactly 1].
  float* e = ema.mutable_data_ptr<float>();
  float* c = cdf.mutable_data_ptr<float>();
  const float a = static_cast<float>(decay);
  const float b = static_cast<float>(1.0 - decay);
  for (int64_t k = 0; k < bins; ++k) {
    if (counts[k] > 0.0f) {
      const float mean = sums[k] / counts[k];
      const float kept = a * e[k];
      const float moved = b * mean;
      e[k] = kept + moved;
    }
  }
  std::vector<float> cum(bins);
  double run = 0.0;
  for (int64_t k = 0; k < bins; ++k) {
    const float m = e[k];
    run += static_cast<double>(std::isnan(m) ? m : std::max(m, 0.0f));
    cum[k] = static_cast<float>(run);
  }
  const float total = cum[bins - 1];
  c[0] = 0.0f;
  for (int64_t k = 0; k + 1 < bins; ++k) c[k + 1] = cum[k] / total;
  c[bins] = 1.0f;
}

}  // namespace

TORCH_LIBRARY_IMPL(vdmpp, CPU, m) { m.impl("adaptive_ema_update", &adaptive_ema_update_cpu); }

}  // namespace vdmpp
