// Input checks shared by the CPU and CUDA kernels of the vdmpp ops (header only, no CUDA).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace vdmpp {

inline bool is_supported_float(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16;
}

// `t` is an elementwise operand next to `ref`: same device, shape and strides (so one flat loop
// over memory serves any dense layout, e.g. channels_last), float32 or bfloat16. Its dtype may
// differ from ref's: mixed operands are computed as the reference does (each upcast to float32,
// the result cast to ref's dtype), see `all_same_dtype`.
inline void check_operand(const char* op, const at::Tensor& ref, const char* ref_name,
                          const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device(), "; move them to one device");
  TORCH_CHECK(is_supported_float(t), op, ": ", name, " must be float32 or bfloat16, got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " has shape ", t.sizes(), " but ",
              ref_name, " has shape ", ref.sizes());
  TORCH_CHECK(t.strides() == ref.strides(), op, ": ", name, " must have the memory layout of ",
              ref_name, " (same strides; call .contiguous() on both first), got strides ",
              t.strides(), " and ", ref.strides());
}

inline void check_elementwise_first(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_supported_float(t), op, ": ", name, " must be float32 or bfloat16, got ",
              t.scalar_type());
  TORCH_CHECK(t.is_non_overlapping_and_dense(), op, ": ", name,
              " must be dense (contiguous in some dimension order; call .contiguous() first)");
}

inline bool all_same_dtype(const at::Tensor& a, const at::Tensor& b,
                           const c10::optional<at::Tensor>& c = c10::nullopt) {
  return a.scalar_type() == b.scalar_type() && (!c || c->scalar_type() == a.scalar_type());
}

inline at::Tensor as_float(const at::Tensor& t) { return t.to(at::kFloat); }

// heun_step(x_hat, denoised, denoised_next?, t_hat, t_next): all operands alike, t_hat != 0 and,
// for the correction, t_next != 0 (the sampler's last step to t = 0 is an Euler step).
inline void check_heun_step(const at::Tensor& x_hat, const at::Tensor& denoised,
                            const c10::optional<at::Tensor>& denoised_next, double t_hat,
                            double t_next) {
  constexpr const char* op = "vdmpp::heun_step";
  check_elementwise_first(op, x_hat, "x_hat");
  check_operand(op, x_hat, "x_hat", denoised, "denoised");
  if (denoised_next.has_value()) {
    check_operand(op, x_hat, "x_hat", *denoised_next, "denoised_next");
    TORCH_CHECK(t_next != 0.0 && std::isfinite(t_next), op,
                ": the 2nd-order correction needs a finite t_next != 0, got ", t_next,
                " (take an Euler step, denoised_next=None, to t = 0)");
  }
  TORCH_CHECK(t_hat != 0.0 && std::isfinite(t_hat), op, ": t_hat must be finite and != 0, got ",
              t_hat);
  TORCH_CHECK(std::isfinite(t_next), op, ": t_next must be finite, got ", t_next);
}

// churn(x, noise, t, t_hat, s_noise): returns the scale sqrt(t_hat^2 - t^2) * s_noise, computed
// in double exactly as the Python reference does (math.sqrt(t_hat*t_hat - t*t) * s_noise).
inline double check_churn(const at::Tensor& x, const at::Tensor& noise, double t, double t_hat,
                          double s_noise) {
  constexpr const char* op = "vdmpp::churn";
  check_elementwise_first(op, x, "x");
  check_operand(op, x, "x", noise, "noise");
  const double var = t_hat * t_hat - t * t;
  TORCH_CHECK(var >= 0.0, op, ": needs t_hat >= t >= 0 (the noise level only goes up), got t=", t,
              ", t_hat=", t_hat);
  TORCH_CHECK(std::isfinite(var) && std::isfinite(s_noise), op,
              ": t, t_hat and s_noise must be finite");
  return std::sqrt(var) * s_noise;
}

// adaptive_ema_update(ema, cdf, logsnr, value, decay, logsnr_min, logsnr_max).
inline void check_adaptive(const at::Tensor& ema, const at::Tensor& cdf, const at::Tensor& logsnr,
                           const at::Tensor& value, double decay, double logsnr_min,
                           double logsnr_max) {
  constexpr const char* op = "vdmpp::adaptive_ema_update";
  TORCH_CHECK(ema.dim() == 1 && ema.numel() >= 1, op, ": ema must be 1-D [bins], got shape ",
              ema.sizes());
  TORCH_CHECK(cdf.dim() == 1 && cdf.numel() == ema.numel() + 1, op,
              ": cdf must be 1-D [bins + 1] = [", ema.numel() + 1, "], got shape ", cdf.sizes());
  TORCH_CHECK(ema.scalar_type() == at::kFloat && cdf.scalar_type() == at::kFloat, op,
              ": ema and cdf must be float32 buffers, got ", ema.scalar_type(), " and ",
              cdf.scalar_type());
  TORCH_CHECK(ema.is_contiguous() && cdf.is_contiguous(), op,
              ": ema and cdf must be contiguous");
  TORCH_CHECK(logsnr.dim() == 1 && logsnr.sizes() == value.sizes(), op,
              ": logsnr and value must be 1-D of equal shape, got ", logsnr.sizes(), " and ",
              value.sizes());
  TORCH_CHECK(is_supported_float(logsnr) && is_supported_float(value), op,
              ": logsnr and value must be float32 or bfloat16, got ", logsnr.scalar_type(),
              " and ", value.scalar_type());
  TORCH_CHECK(logsnr.is_contiguous() && value.is_contiguous(), op,
              ": logsnr and value must be contiguous");
  for (const at::Tensor* t : {&cdf, &logsnr, &value}) {
    TORCH_CHECK(t->device() == ema.device(), op, ": all tensors must be on ", ema.device(),
                " (the device of ema), got one on ", t->device());
  }
  TORCH_CHECK(decay > 0.0 && decay < 1.0, op, ": decay must lie in (0, 1), got ", decay);
  TORCH_CHECK(std::isfinite(logsnr_min) && std::isfinite(logsnr_max) && logsnr_min < logsnr_max,
              op, ": need finite logsnr_min < logsnr_max, got ", logsnr_min, ", ", logsnr_max);
}

// adaptive_bin_stats(stats, logsnr, value, logsnr_min, logsnr_max): stats [2, bins] float32.
inline void check_bin_stats(const at::Tensor& stats, const at::Tensor& logsnr,
                            const at::Tensor& value, double logsnr_min, double logsnr_max) {
  constexpr const char* op = "vdmpp::adaptive_bin_stats";
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 2 && stats.size(1) >= 1, op,
              ": stats must be [2, bins] (row 0 sums, row 1 counts), got shape ", stats.sizes());
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.is_contiguous(), op,
              ": stats must be a contiguous float32 tensor, got ", stats.scalar_type());
  TORCH_CHECK(logsnr.dim() == 1 && logsnr.sizes() == value.sizes(), op,
              ": logsnr and value must be 1-D of equal shape, got ", logsnr.sizes(), " and ",
              value.sizes());
  TORCH_CHECK(is_supported_float(logsnr) && is_supported_float(value), op,
              ": logsnr and value must be float32 or bfloat16, got ", logsnr.scalar_type(),
              " and ", value.scalar_type());
  TORCH_CHECK(logsnr.is_contiguous() && value.is_contiguous(), op,
              ": logsnr and value must be contiguous");
  for (const at::Tensor* t : {&logsnr, &value}) {
    TORCH_CHECK(t->device() == stats.device(), op, ": all tensors must be on ", stats.device(),
                " (the device of stats), got one on ", t->device());
  }
  TORCH_CHECK(std::isfinite(logsnr_min) && std::isfinite(logsnr_max) && logsnr_min < logsnr_max,
              op, ": need finite logsnr_min < logsnr_max, got ", logsnr_min, ", ", logsnr_max);
}

// adaptive_apply_stats(ema, cdf, stats, decay): ema [bins], cdf [bins + 1], stats [2, bins].
inline void check_apply_stats(const at::Tensor& ema, const at::Tensor& cdf,
                              const at::Tensor& stats, double decay) {
  constexpr const char* op = "vdmpp::adaptive_apply_stats";
  TORCH_CHECK(ema.dim() == 1 && ema.numel() >= 1, op, ": ema must be 1-D [bins], got shape ",
              ema.sizes());
  TORCH_CHECK(cdf.dim() == 1 && cdf.numel() == ema.numel() + 1, op,
              ": cdf must be 1-D [bins + 1] = [", ema.numel() + 1, "], got shape ", cdf.sizes());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 2 && stats.size(1) == ema.numel(), op,
              ": stats must be [2, bins] = [2, ", ema.numel(), "], got shape ", stats.sizes());
  for (const at::Tensor* t : {&ema, &cdf, &stats}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), op,
                ": ema, cdf and stats must be contiguous float32 tensors, got ",
                t->scalar_type());
    TORCH_CHECK(t->device() == ema.device(), op, ": all tensors must be on ", ema.device(),
                " (the device of ema), got one on ", t->device());
  }
  TORCH_CHECK(decay > 0.0 && decay < 1.0, op, ": decay must lie in (0, 1), got ", decay);
}

}  // namespace vdmpp
