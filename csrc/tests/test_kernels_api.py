"""The custom-op contract: opcheck, torch.compile, the can_use predicate, errors, loading."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import vdmpp.kernels as K
from vdmpp.kernels import reference as R

HAS_CUDA = torch.cuda.is_available() and K.has_kernel("heun_step", "cuda")
OPS = torch.ops.vdmpp


def _t(*shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(device)


# --- opcheck ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_opcheck_heun_step_and_churn(device, dtype):
    for shape in [(5,), (2, 3, 7, 9), (0, 4)]:
        x, d1, d2 = (_t(*shape, dtype=dtype, device=device, seed=s) for s in range(3))
        torch.library.opcheck(OPS.heun_step.default, (x, d1, d2, 2.0, 1.5))
        torch.library.opcheck(OPS.heun_step.default, (x, d1, None, 2.0, 0.0))
        torch.library.opcheck(OPS.churn.default, (x, d1, 1.0, 1.25, 1.007))


@pytest.mark.parametrize("n", [0, 1, 300])
def test_kernels_opcheck_adaptive_ema_update(device, n):
    ema = torch.rand(16, device=device) + 0.5
    cdf = torch.zeros(17, device=device)
    lam, value = _t(n, device=device) * 8, _t(n, device=device, seed=1).abs()
    torch.library.opcheck(OPS.adaptive_ema_update.default, (ema, cdf, lam, value, 0.9, -20.0, 20.0))


@pytest.mark.parametrize("n", [0, 1, 300])
def test_kernels_opcheck_adaptive_pair(device, n):
    stats = torch.rand(2, 16, device=device)
    lam, value = _t(n, device=device) * 8, _t(n, device=device, seed=1).abs()
    torch.library.opcheck(OPS.adaptive_bin_stats.default, (stats, lam, value, -20.0, 20.0))
    ema = torch.rand(16, device=device) + 0.5
    cdf = torch.zeros(17, device=device)
    stats[1] = torch.arange(16, device=device) % 3  # some bins not hit
    torch.library.opcheck(OPS.adaptive_apply_stats.default, (ema, cdf, stats, 0.9))


def test_kernels_opcheck_channels_last(device):
    """One dense non-row-major layout (same strides on every operand) is served flat."""
    x, d1, d2 = (
        _t(2, 3, 5, 7, device=device, seed=s).contiguous(memory_format=torch.channels_last)
        for s in range(3)
    )
    torch.library.opcheck(OPS.heun_step.default, (x, d1, d2, 2.0, 1.5))
    torch.library.opcheck(OPS.churn.default, (x, d1, 1.0, 1.25, 1.007))
    out = K.heun_step(x, d1, d2, 2.0, 1.5)
    assert out.stride() == x.stride()  # the result keeps the layout
    assert torch.equal(out.contiguous(), K.heun_step(x.contiguous(), d1.contiguous(),
                                                     d2.contiguous(), 2.0, 1.5))  # fmt: skip


# --- torch.compile ----------------------------------------------------------------------------
def test_kernels_torch_compile_fullgraph_cpu():
    torch._dynamo.reset()

    def step(x, d1, d2, noise, ema, cdf, lam, value, ema2, cdf2):
        x_hat = K.churn(x, noise, 1.0, 1.2, 1.0)
        x_next = K.heun_step(x_hat, d1, None, 1.2, 0.8)
        x_corr = K.heun_step(x_hat, d1, d2, 1.2, 0.8)
        K.adaptive_ema_update(ema, cdf, lam, value, 0.9, -20.0, 20.0)
        stats = ema2.new_zeros(2, ema2.shape[0])
        K.adaptive_bin_stats(stats, lam, value, -20.0, 20.0)
        K.adaptive_apply_stats(ema2, cdf2, stats, 0.9)
        return x_next * 2, x_corr, stats

    x, d1, d2, noise = (_t(2, 3, 5, 7, seed=s) for s in range(4))
    lam, value = _t(64, seed=5) * 6, _t(64, seed=6).abs()
    ema_e, cdf_e = torch.ones(20), torch.linspace(0, 1, 21)
    ema_c, cdf_c = ema_e.clone(), cdf_e.clone()
    e2_e, c2_e, e2_c, c2_c = ema_e.clone(), cdf_e.clone(), ema_e.clone(), cdf_e.clone()
    eager = step(x, d1, d2, noise, ema_e, cdf_e, lam, value, e2_e, c2_e)
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    got = compiled(x, d1, d2, noise, ema_c, cdf_c, lam, value, e2_c, c2_c)
    for a, b in zip(got, eager):
        assert torch.equal(a, b)
    assert torch.equal(ema_c, ema_e) and torch.equal(cdf_c, cdf_e)  # mutation kept
    assert torch.equal(e2_c, e2_e) and torch.equal(c2_c, c2_e) and torch.equal(e2_c, ema_c)


# --- can_use ----------------------------------------------------------------------------------
def test_kernels_can_use_predicate(monkeypatch):
    monkeypatch.delenv("VDMPP_KERNELS", raising=False)
    x = _t(2, 3)
    assert K.available() and K.has_kernel("heun_step", "cpu")
    assert K.can_use("heun_step", x) and K.can_use("heun_step", x, x, None)
    assert K.can_use("churn", x.bfloat16(), x.bfloat16())
    assert not K.can_use("heun_step", x.double())  # float64 stays on the reference
    assert not K.can_use("heun_step", x.half())
    assert not K.can_use("heun_step", x.t())  # not row-major / channels_last
    x4 = _t(2, 3, 4, 5)
    cl = x4.contiguous(memory_format=torch.channels_last)
    assert K.can_use("heun_step", cl, cl.clone(memory_format=torch.preserve_format))
    assert not K.can_use("heun_step", x4, cl)  # two layouts: the reference
    assert not K.can_use("heun_step", x4[:, :, ::2])  # a strided view
    assert not K.can_use("heun_step", x4, x4.half())  # float16 operand
    assert K.can_use("heun_step", x.bfloat16(), x, x)  # float32/bf16 mix: as the reference
    assert not K.can_use("heun_step", x, x.double())  # any other dtype in the mix
    assert not K.can_use("heun_step", x, _t(3, 2))  # shape mix
    assert not K.can_use("heun_step", x.to("meta"))  # no kernel for the device
    assert not K.can_use("no_such_op", x)
    assert not K.can_use("heun_step")
    assert not K.can_use("heun_step", x.requires_grad_())
    with torch.no_grad():
        assert K.can_use("heun_step", x)
    ema = torch.ones(10)
    assert K.can_use("adaptive_bin_stats", torch.zeros(2, 10), _t(5), _t(5))
    assert not K.can_use("adaptive_bin_stats", torch.zeros(3, 10), _t(5))
    assert not K.can_use("adaptive_bin_stats", torch.zeros(2, 10).double(), _t(5))
    assert K.can_use("adaptive_apply_stats", ema, torch.zeros(11), torch.zeros(2, 10))
    assert not K.can_use("adaptive_apply_stats", ema, torch.zeros(11), torch.zeros(2, 9))
    assert not K.can_use("adaptive_apply_stats", ema, torch.zeros(11))
    assert K.can_use("adaptive_ema_update", ema, _t(5))
    assert K.can_use("adaptive_ema_update", ema, _t(5).bfloat16())
    assert not K.can_use("adaptive_ema_update", ema.double(), _t(5))
    assert not K.can_use("adaptive_ema_update", torch.ones(2, 5), _t(5))
    monkeypatch.setenv("VDMPP_KERNELS", "0")
    assert not K.can_use("heun_step", _t(2, 3))
    assert K.has_kernel("heun_step", "cpu") == K.has_kernel("churn", "cpu")


# --- bad input --------------------------------------------------------------------------------
def test_kernels_heun_bad_input_errors():
    x = _t(4, 5)
    with pytest.raises(RuntimeError, match="denoised must be float32 or bfloat16, got Double"):
        K.heun_step(x, x.double(), None, 1.0, 0.5)
    with pytest.raises(RuntimeError, match="must be float32 or bfloat16"):
        K.heun_step(x.double(), x.double(), None, 1.0, 0.5)
    with pytest.raises(RuntimeError, match="must be float32 or bfloat16"):
        K.heun_step(x.long(), x.long(), None, 1.0, 0.5)
    assert torch.equal(K.heun_step(x.t(), x.t(), None, 1.0, 0.5),  # one dense layout: served
                       R.heun_step(x.t(), x.t(), None, 1.0, 0.5))  # fmt: skip
    with pytest.raises(RuntimeError, match="must be dense"):
        K.heun_step(x[:, ::2], x[:, ::2], None, 1.0, 0.5)
    with pytest.raises(RuntimeError, match="denoised_next must have the memory layout of x_hat"):
        K.heun_step(x, x, _t(5, 4).t(), 1.0, 0.5)
    with pytest.raises(RuntimeError, match="shape"):
        K.heun_step(x, _t(5, 4), None, 1.0, 0.5)
    with pytest.raises(RuntimeError, match="t_hat must be finite and != 0"):
        K.heun_step(x, x, None, 0.0, 0.5)
    with pytest.raises(RuntimeError, match="correction needs a finite t_next != 0"):
        K.heun_step(x, x, x, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="t_hat >= t"):
        K.churn(x, x, 2.0, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="noise must be float32 or bfloat16, got Half"):
        K.churn(x, x.half(), 1.0, 2.0, 1.0)


def test_kernels_adaptive_pair_bad_input_errors():
    stats, lam, val = torch.zeros(2, 8), _t(6), _t(6).abs()
    with pytest.raises(RuntimeError, match=r"stats must be \[2, bins\]"):
        K.adaptive_bin_stats(torch.zeros(8), lam, val, -20, 20)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        K.adaptive_bin_stats(stats.double(), lam, val, -20, 20)
    with pytest.raises(RuntimeError, match="equal shape"):
        K.adaptive_bin_stats(stats, lam, val[:5], -20, 20)
    with pytest.raises(RuntimeError, match="logsnr_min < logsnr_max"):
        K.adaptive_bin_stats(stats, lam, val, 1, 1)
    ema, cdf = torch.ones(8), torch.zeros(9)
    with pytest.raises(RuntimeError, match=r"stats must be \[2, bins\] = \[2, 8\]"):
        K.adaptive_apply_stats(ema, cdf, torch.zeros(2, 7), 0.9)
    with pytest.raises(RuntimeError, match=r"cdf must be 1-D \[bins \+ 1\]"):
        K.adaptive_apply_stats(ema, torch.zeros(8), stats, 0.9)
    with pytest.raises(RuntimeError, match="decay must lie in"):
        K.adaptive_apply_stats(ema, cdf, stats, 0.0)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        K.adaptive_apply_stats(ema, cdf, stats.bfloat16(), 0.9)


def test_kernels_adaptive_ops_refuse_inputs_that_require_grad():
    """No derivative: an input that requires grad is an error, not a silent detach."""
    stats = torch.zeros(2, 8)
    val = _t(6).abs().requires_grad_()
    with pytest.raises(RuntimeError, match="not implemented"):
        K.adaptive_bin_stats(stats, _t(6), val, -20, 20)


def test_kernels_kernel_image_probe_cpu():
    assert OPS.kernel_image_ok(torch.empty(0)) is True and K.device_ok("cpu")
    assert not K.device_ok("meta")


def test_kernels_device_without_a_usable_image_falls_back_with_one_warning(monkeypatch):
    """A CUDA device the build has no kernel image for (simulated: the probe says False) is
    refused by device_ok / can_use with one warning, cached per device: callers stay on the
    reference instead of failing at launch ("no kernel image is available")."""
    import warnings

    monkeypatch.setattr(K, "_DEVICE_OK", {})
    probes = []

    class _Probe:
        def kernel_image_ok(self, t):
            probes.append(t.device)
            return False

    monkeypatch.setattr(torch, "ops", type("Ops", (), {"vdmpp": _Probe()})())
    monkeypatch.setattr(torch, "empty", lambda *a, device=None, **kw: torch.zeros(0).to("meta"))
    with pytest.warns(RuntimeWarning, match="cannot run on cuda:3.*TORCH_CUDA_ARCH_LIST"):
        assert not K.device_ok("cuda:3")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not K.device_ok("cuda:3")  # cached: no second probe, no second warning
    assert len(probes) == 1


def test_kernels_device_probe_failure_is_a_fallback_not_a_crash(monkeypatch):
    """Without any CUDA runtime (this CPU-only torch) the probe raises: still False + warning."""
    monkeypatch.setattr(K, "_DEVICE_OK", {})
    if torch.cuda.is_available():
        pytest.skip("a CUDA runtime is present")
    with pytest.warns(RuntimeWarning, match="cannot run on cuda"):
        assert not K.device_ok("cuda")


def test_kernels_adaptive_bad_input_errors():
    ema, cdf, lam, val = torch.ones(8), torch.zeros(9), _t(6), _t(6).abs()
    upd = lambda *a, **kw: K.adaptive_ema_update(*a, **kw)
    with pytest.raises(RuntimeError, match=r"cdf must be 1-D \[bins \+ 1\]"):
        upd(ema, torch.zeros(8), lam, val, 0.9, -20, 20)
    with pytest.raises(RuntimeError, match="must be float32 buffers"):
        upd(ema.double(), cdf.double(), lam, val, 0.9, -20, 20)
    with pytest.raises(RuntimeError, match="equal shape"):
        upd(ema, cdf, lam, val[:5], 0.9, -20, 20)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        upd(ema, cdf, lam.double(), val, 0.9, -20, 20)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        upd(ema, cdf, _t(6, 2)[:, 0], val, 0.9, -20, 20)
    with pytest.raises(RuntimeError, match="decay must lie in"):
        upd(ema, cdf, lam, val, 1.0, -20, 20)
    with pytest.raises(RuntimeError, match="logsnr_min < logsnr_max"):
        upd(ema, cdf, lam, val, 0.9, 20, -20)
    with pytest.raises(ValueError, match="logsnr contains NaN"):
        upd(ema, cdf, torch.tensor([float("nan")]), torch.ones(1), 0.9, -20, 20)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA kernels")
def test_kernels_device_mix_errors():
    x = _t(4, 5)
    with pytest.raises(RuntimeError, match="device"):
        K.heun_step(x.cuda(), x, None, 1.0, 0.5)
    with pytest.raises(RuntimeError, match="device"):
        K.adaptive_ema_update(torch.ones(4, device="cuda"), torch.zeros(5), x[0], x[0], 0.9, -1, 1)


# --- loading ----------------------------------------------------------------------------------
def test_kernels_package_survives_a_broken_extension():
    """If _C cannot load, the import still works, warns once with the reason, and can_use is
    False everywhere (the libraries then stay on their references)."""
    code = textwrap.dedent(
        """
        import sys, warnings
        class Broken:
            def find_spec(self, name, path=None, target=None):
                if name == "vdmpp.kernels._C":
                    raise ImportError("simulated: undefined symbol _ZN3c10")
        sys.meta_path.insert(0, Broken())
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import torch, vdmpp.kernels as K
        msgs = [str(x.message) for x in w if "vdmpp.kernels" in str(x.message)]
        assert len(msgs) == 1 and "simulated: undefined symbol" in msgs[0], msgs
        assert not K.available() and not K.can_use("heun_step", torch.ones(3))
        assert not K.has_kernel("heun_step", "cpu")
        print("ok")
        """
    )
    env = dict(os.environ)
    src = str(Path(K.__file__).resolve().parents[2])  # the dir holding vdmpp/ for this install
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_kernels_reference_module_is_the_samplers_formula():
    """The package's own references are the ones the kernels are tested against."""
    x, d1, d2 = (_t(3, 4, seed=s) for s in range(3))
    assert torch.equal(R.heun_step(x, d1, d2, 2.0, 1.0), K.heun_step(x, d1, d2, 2.0, 1.0))
