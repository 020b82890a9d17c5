// vdmpp-kernels: schemas of the `vdmpp` torch custom ops (one TORCH_LIBRARY for the namespace).
// CPU kernels: heun_step.cpp, adaptive_ema_update.cpp (the three adaptive ops); CUDA kernels:
// cuda/*.cu. A CPU-only build simply has no CUDA kernel registered (ask the dispatcher before
// relying on one).
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <Python.h>
#include <torch/library.h>

#include <vector>

extern "C" {
// `import vdmpp.kernels._C` loads this shared library, whose static initialisers register the
// ops with the dispatcher; the Python module itself is empty (no pybind11 needed).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(vdmpp, m) {
  // EDM (Karras et al. 2022) Alg. 1/2: Euler step (denoised_next = None) or 2nd-order correction from t_hat
  // to t_next, reading x_hat, D(x_hat; t_hat) and D(x_e; t_next) once each.
  m.def(
      "heun_step(Tensor x_hat, Tensor denoised, Tensor? denoised_next, float t_hat, "
      "float t_next) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Alg. 2 lines 5-6: x_hat = x + sqrt(t_hat^2 - t^2) * s_noise * noise.
  m.def("churn(Tensor x, Tensor noise, float t, float t_hat, float s_noise) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // VDM++ (Kingma & Gao 2023) App. F/H: bin logsnr, average this step's value per bin, EMA on the hit
  // bins of `ema` and refresh the normalised cumulative density `cdf`, in place.
  m.def(
      "adaptive_ema_update(Tensor(a!) ema, Tensor(b!) cdf, Tensor logsnr, Tensor value, "
      "float decay, float logsnr_min, float logsnr_max) -> ()",
      {at::Tag::pt2_compliant_tag});
  // The data-parallel pair (VDM++ App. H with the statistics all-reduced between the two):
  // add one batch's per-bin [sum of value; count] into `stats` [2, bins], in place ...
  m.def(
      "adaptive_bin_stats(Tensor(a!) stats, Tensor logsnr, Tensor value, float logsnr_min, "
      "float logsnr_max) -> ()",
      {at::Tag::pt2_compliant_tag});
  // ... then the EMA of the hit bins of `ema` from the (reduced) `stats` and the cdf refresh.
  m.def("adaptive_apply_stats(Tensor(a!) ema, Tensor(b!) cdf, Tensor stats, float decay) -> ()",
        {at::Tag::pt2_compliant_tag});
  // Whether the kernels of this build have an image (SASS or PTX) that runs on probe's device
  // (no launch, no sync): the loader asks once per device before dispatching to CUDA kernels.
  m.def("kernel_image_ok(Tensor probe) -> bool");
}

namespace {
bool kernel_image_ok_cpu(const at::Tensor&) { return true; }
}  // namespace

TORCH_LIBRARY_IMPL(vdmpp, CPU, m) { m.impl("kernel_image_ok", &kernel_image_ok_cpu); }

namespace {

// The mutable (Tensor(a!)) arguments of `op` on the stack, in schema order.
std::vector<at::Tensor> mutated_args(const c10::OperatorHandle& op, const torch::jit::Stack& st) {
  const auto& args = op.schema().arguments();
  const size_t n = args.size(), base = st.size() - n;
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < n; ++i) {
    const auto* alias = args[i].alias_info();
    if (alias != nullptr && alias->isWrite() && st[base + i].isTensor()) {
      out.push_back(st[base + i].toTensor());
    }
  }
  return out;
}

// Autograd: the adaptive ops update buffers and have no derivative. An input that requires grad
// is an error (not a silent detach); otherwise continue below Autograd, through ADInplaceOrView.
void no_grad_inplace_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet ks,
                              torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t n = args.size(), base = stack->size() - n;
  for (size_t i = 0; i < n; ++i) {
    const c10::IValue& v = (*stack)[base + i];
    TORCH_CHECK(!v.isTensor() || !v.toTensor().defined() || !v.toTensor().requires_grad(),
                op.schema().name(), ": derivative not implemented; argument '", args[i].name(),
                "' requires grad (these ops update buffers: pass detached tensors)");
  }
  at::AutoDispatchBelowAutograd guard;
  op.redispatchBoxed(ks & c10::after_autograd_keyset, stack);
}

// ADInplaceOrView: run the op, then bump the version counter of every tensor it mutated (what
// the generated in-place aten ops do), so autograd detects a saved tensor the op overwrote.
void bump_versions_inplace_or_view(const c10::OperatorHandle& op, c10::DispatchKeySet ks,
                                   torch::jit::Stack* stack) {
  std::vector<at::Tensor> mutated = mutated_args(op, *stack);
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (at::Tensor& t : mutated) t.unsafeGetTensorImpl()->bump_version();
}

constexpr const char* kInplaceOps[] = {"adaptive_ema_update", "adaptive_bin_stats",
                                       "adaptive_apply_stats"};

}  // namespace

TORCH_LIBRARY_IMPL(vdmpp, ADInplaceOrView, m) {
  for (const char* op : kInplaceOps) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&bump_versions_inplace_or_view>());
  }
}

TORCH_LIBRARY_IMPL(vdmpp, Autograd, m) {
  for (const char* op : kInplaceOps) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&no_grad_inplace_autograd>());
  }
}
