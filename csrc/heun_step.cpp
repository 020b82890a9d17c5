// CPU kernels of vdmpp::heun_step and vdmpp::churn (EDM, EDM, Alg. 1/2).
//
// Each output element is computed in float32 in exactly the order of the PyTorch reference
// (vdmpp.samplers._step), and the build disables FMA contraction (-ffp-contract=off), so float32
// and bfloat16 results are bit-identical to the reference on CPU.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "checks.h"
#include "float_io.h"

namespace vdmpp {
namespace {

constexpr int64_t kGrain = 32768;

// The inner loops take __restrict__ pointers to one chunk so the compiler vectorises them; on
// x86-64 GCC also builds AVX-512 and AVX2 clones picked at load time (ifunc). Division stays a
// true IEEE division and nothing is contracted into an FMA, so every clone is bit-identical.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define VDMPP_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define VDMPP_CPU_CLONES
#endif

template <typename Raw, bool kCorrect>
VDMPP_CPU_CLONES void heun_chunk(const Raw* __restrict__ x, const Raw* __restrict__ d1,
                                 const Raw* __restrict__ d2, Raw* __restrict__ out, int64_t n,
                                 float t_hat, float t_next, float h) {
  using IO = FloatIO<Raw>;
  for (int64_t i = 0; i < n; ++i) {
    const float xv = IO::load(x[i]);
    const float d_cur = (xv - IO::load(d1[i])) / t_hat;
    if constexpr (kCorrect) {
      const float x_e = xv + h * d_cur;
      const float d_prime = (x_e - IO::load(d2[i])) / t_next;
      out[i] = IO::store(xv + h * (0.5f * d_cur + 0.5f * d_prime));
    } else {
      out[i] = IO::store(xv + h * d_cur);
    }
  }
}

template <typename Raw>
VDMPP_CPU_CLONES void churn_chunk(const Raw* __restrict__ x, const Raw* __restrict__ noise,
                                  Raw* __restrict__ out, int64_t n, float scale) {
  using IO = FloatIO<Raw>;
  for (int64_t i = 0; i < n; ++i) out[i] = IO::store(IO::load(x[i]) + scale * IO::load(noise[i]));
}

template <typename Raw, bool kCorrect>
void heun_cpu_loop(const Raw* x, const Raw* d1, const Raw* d2, Raw* out, int64_t n, float t_hat,
                   float t_next, float h) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    heun_chunk<Raw, kCorrect>(x + begin, d1 + begin, kCorrect ? d2 + begin : nullptr,
                              out + begin, end - begin, t_hat, t_next, h);
  });
}

template <typename Raw>
void churn_cpu_loop(const Raw* x, const Raw* noise, Raw* out, int64_t n, float scale) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    churn_chunk<Raw>(x + begin, noise + begin, out + begin, end - begin, scale);
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
  if (denoised_next.has_value()) {
    const auto* d2 = static_cast<const Raw*>(denoised_next->const_data_ptr());
    heun_cpu_loop<Raw, true>(x, d1, d2, o, n, t_hat, t_next, h);
  } else {
    heun_cpu_loop<Raw, false>(x, d1, nullptr, o, n, t_hat, t_next, h);
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
    churn_cpu_loop<float>(x.const_data_ptr<float>(), noise.const_data_ptr<float>(),
                          out.mutable_data_ptr<float>(), x.numel(), s);
  } else {
    churn_cpu_loop<uint16_t>(static_cast<const uint16_t*>(x.const_data_ptr()),
                             static_cast<const uint16_t*>(noise.const_data_ptr()),
                             static_cast<uint16_t*>(out.mutable_data_ptr()), x.numel(), s);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vdmpp, CPU, m) {
  m.impl("heun_step", &heun_step_cpu);
  m.impl("churn", &churn_cpu);
}

}  // namespace vdmpp
