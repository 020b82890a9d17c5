// CPU kernels of vdmpp::heun_step and vdmpp::churn (EDM, Karras et al. 2022, Alg. 1/2).
//
// Each output element is computed in float32 in exactly the order of the PyTorch reference
// (vdmpp.samplers._step), and the build disables FMA contraction (-ffp-contract=off), so float32
// and bfloat16 results are bit-identical to the reference on CPU. The loops (cpu/heun_kernels.h)
// are vectorised with at::vec, built for AVX-512, AVX2 and any CPU and picked at run time; the
// work is split over threads with at::parallel_for.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "checks.h"
#include "cpu/heun_kernels_api.h"

namespace vdmpp {
namespace {

constexpr int64_t kGrain = 32768;

// The instruction set the loops run with: the widest this CPU has, or VDMPP_CPU_CAPABILITY
// (default / avx2 / avx512) if set to one it has; vdmpp::_debug_cpu_capability switches it for
// the tests, which check every variant against the reference bit for bit.
enum class Cap { kDefault, kAvx2, kAvx512 };

bool cpu_has(Cap c) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (c == Cap::kAvx512) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           cpu_has(Cap::kAvx2);
  }
  if (c == Cap::kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return c == Cap::kDefault;
}

const char* cap_name(Cap c) {
  return c == Cap::kAvx512 ? "avx512" : (c == Cap::kAvx2 ? "avx2" : "default");
}

bool parse_cap(const std::string& s, Cap* out) {
  for (Cap c : {Cap::kDefault, Cap::kAvx2, Cap::kAvx512}) {
    if (s == cap_name(c)) {
      *out = c;
      return true;
    }
  }
  return false;
}

Cap best_cap() {
  Cap c = cpu_has(Cap::kAvx512) ? Cap::kAvx512 : (cpu_has(Cap::kAvx2) ? Cap::kAvx2 : Cap::kDefault);
  const char* env = std::getenv("VDMPP_CPU_CAPABILITY");
  Cap want;
  if (env != nullptr && parse_cap(env, &want) && cpu_has(want)) c = want;
  return c;
}

std::atomic<int>& active_cap() {
  static std::atomic<int> cap{static_cast<int>(best_cap())};
  return cap;
}

cpu::HeunKernels kernels_for(Cap c) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (c == Cap::kAvx512) return cpu::kernels_avx512();
  if (c == Cap::kAvx2) return cpu::kernels_avx2();
#endif
  (void)c;
  return cpu::kernels_default();
}

const cpu::HeunKernels& kernels() {
  static const cpu::HeunKernels table[3] = {kernels_for(Cap::kDefault), kernels_for(Cap::kAvx2),
                                            kernels_for(Cap::kAvx512)};
  return table[active_cap().load(std::memory_order_relaxed)];
}

template <typename Raw, typename Fn>
void heun_cpu_loop(Fn fn, const Raw* x, const Raw* d1, const Raw* d2, Raw* out, int64_t n,
                   float t_hat, float t_next, float h) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    fn(x + begin, d1 + begin, d2 ? d2 + begin : nullptr, out + begin, end - begin, t_hat, t_next,
       h);
  });
}

template <typename Raw, typename Fn>
void churn_cpu_loop(Fn fn, const Raw* x, const Raw* noise, Raw* out, int64_t n, float scale) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    fn(x + begin, noise + begin, out + begin, end - begin, scale);
  });
}

template <typename Raw>
void heun_cpu_typed(const at::Tensor& x_hat, const at::Tensor& denoised,
                    const c10::optional<at::Tensor>& denoised_next, at::Tensor& out, float t_hat,
                    float t_next, float h) {
  const auto* x = static_cast<const Raw*>(x_hat.const_data_ptr());
  const auto* d1 = static_cast<const Raw*>(denoised.const_data_ptr());
  auto* o = static_cast<Raw*>(out.mutable_data_ptr());
  const int64_t n = x_hat.numel();
  const cpu::HeunKernels& k = kernels();
  const Raw* d2 =
      denoised_next.has_value() ? static_cast<const Raw*>(denoised_next->const_data_ptr()) : nullptr;
  if constexpr (std::is_same_v<Raw, float>) {
    heun_cpu_loop(d2 ? k.heun_f32_correct : k.heun_f32_euler, x, d1, d2, o, n, t_hat, t_next, h);
  } else {
    heun_cpu_loop(d2 ? k.heun_bf16_correct : k.heun_bf16_euler, x, d1, d2, o, n, t_hat, t_next, h);
  }
}

at::Tensor heun_step_cpu(const at::Tensor& x_hat, const at::Tensor& denoised,
                         const c10::optional<at::Tensor>& denoised_next, double t_hat,
                         double t_next) {
  check_heun_step(x_hat, denoised, denoised_next, t_hat, t_next);
  TORCH_CHECK(x_hat.device().is_cpu(), "vdmpp::heun_step: CPU kernel got a ", x_hat.device(),
              " tensor");
  if (!all_same_dtype(x_hat, denoised, denoised_next)) {  // as the reference: float32, cast back
    const c10::optional<at::Tensor> d2 =
        denoised_next ? c10::optional<at::Tensor>(as_float(*denoised_next)) : c10::nullopt;
    return heun_step_cpu(as_float(x_hat), as_float(denoised), d2, t_hat, t_next)
        .to(x_hat.scalar_type());
  }
  at::Tensor out = at::empty_like(x_hat);
  if (x_hat.numel() == 0) return out;
  // Python floats become float32 scalars in the reference (h = t_next - t_hat in double first).
  const float th = static_cast<float>(t_hat);
  const float tn = static_cast<float>(t_next);
  const float h = static_cast<float>(t_next - t_hat);
  if (x_hat.scalar_type() == at::kFloat) {
    heun_cpu_typed<float>(x_hat, denoised, denoised_next, out, th, tn, h);
  } else {
    heun_cpu_typed<uint16_t>(x_hat, denoised, denoised_next, out, th, tn, h);
  }
  return out;
}

at::Tensor churn_cpu(const at::Tensor& x, const at::Tensor& noise, double t, double t_hat,
                     double s_noise) {
  const double scale = check_churn(x, noise, t, t_hat, s_noise);
  TORCH_CHECK(x.device().is_cpu(), "vdmpp::churn: CPU kernel got a ", x.device(), " tensor");
  if (!all_same_dtype(x, noise)) {  // as the reference: float32, cast back
    return churn_cpu(as_float(x), as_float(noise), t, t_hat, s_noise).to(x.scalar_type());
  }
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const float s = static_cast<float>(scale);
  if (x.scalar_type() == at::kFloat) {
    churn_cpu_loop<float>(kernels().churn_f32, x.const_data_ptr<float>(),
                          noise.const_data_ptr<float>(), out.mutable_data_ptr<float>(), x.numel(),
                          s);
  } else {
    churn_cpu_loop<uint16_t>(kernels().churn_bf16, static_cast<const uint16_t*>(x.const_data_ptr()),
                             static_cast<const uint16_t*>(noise.const_data_ptr()),
                             static_cast<uint16_t*>(out.mutable_data_ptr()), x.numel(), s);
  }
  return out;
}

// vdmpp::_debug_cpu_capability(request): switch the loops to `request` ("" keeps the current
// one); returns the active one. Refuses an instruction set this CPU lacks.
std::string debug_cpu_capability(std::string request) {
  if (!request.empty()) {
    Cap c;
    TORCH_CHECK(parse_cap(request, &c), "vdmpp::_debug_cpu_capability: unknown '", request,
                "' (default, avx2 or avx512)");
    TORCH_CHECK(cpu_has(c), "vdmpp::_debug_cpu_capability: this CPU has no ", request);
    active_cap().store(static_cast<int>(c));
  }
  return cap_name(static_cast<Cap>(active_cap().load()));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vdmpp, m) {
  m.def("_debug_cpu_capability(str request) -> str", TORCH_FN(debug_cpu_capability));
}

TORCH_LIBRARY_IMPL(vdmpp, CPU, m) {
  m.impl("heun_step", &heun_step_cpu);
  m.impl("churn", &churn_cpu);
}

}  // namespace vdmpp
