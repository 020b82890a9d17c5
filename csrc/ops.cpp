// vdmpp-kernels: schemas of the `vdmpp` torch custom ops (one TORCH_LIBRARY for the namespace).
// CPU kernels: heun_step.cpp, adaptive_ema_update.cpp; CUDA kernels: cuda/*.cu. A CPU-only
// build simply has no CUDA kernel registered (ask the dispatcher before relying on one).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import vdmpp.kernels._C` loads this shared library, whose static initialisers register the
// ops with the dispatcher; the Python module itself is empty (no pybind11 needed).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(vdmpp, m) {
  // EDM (seed 003) Alg. 1/2: Euler step (denoised_next = None) or 2nd-order correction from t_hat
  // to t_next, reading x_hat, D(x_hat; t_hat) and D(x_e; t_next) once each.
  m.def(
      "heun_step(Tensor x_hat, Tensor denoised, Tensor? denoised_next, float t_hat, "
      "float t_next) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Alg. 2 lines 5-6: x_hat = x + sqrt(t_hat^2 - t^2) * s_noise * noise.
  m.def("churn(Tensor x, Tensor noise, float t, float t_hat, float s_noise) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // VDM++ (seed 000) App. F/H: bin logsnr, average this step's value per bin, EMA on the hit
  // bins of `ema` and refresh the normalised cumulative density `cdf`, in place.
  m.def(
      "adaptive_ema_update(Tensor(a!) ema, Tensor(b!) cdf, Tensor logsnr, Tensor value, "
      "float decay, float logsnr_min, float logsnr_max) -> ()",
      {at::Tag::pt2_compliant_tag});
}
