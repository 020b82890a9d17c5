"""The elementwise references (``churn``, ``heun_step``) and the ``vdmpp.kernels`` dispatch.

A fake ``vdmpp.kernels`` module stands in for the extension to test the dispatch; when the real
extension is importable, its ops are also compared with the references here.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types
import warnings

import pytest
import torch

from vdmpp.samplers import _step, edm_stochastic, euler, heun, karras_sigmas
from vdmpp.samplers._step import churn, heun_step

F64 = torch.float64


def denoiser(x, sigma):
    return 0.1 + 0.25 / (0.25 + sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2) * (x - 0.1)


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.delenv("VDMPP_KERNELS", raising=False)
    _step._reset_kernels_cache()
    yield
    _step._reset_kernels_cache()


def test_reference_semantics_float64():
    g = torch.Generator().manual_seed(0)
    x, n, d1, d2 = (torch.randn(4, 5, generator=g, dtype=F64) for _ in range(4))
    t, t_hat, t_next = 2.0, 2.5, 1.25
    torch.testing.assert_close(
        churn(x, n, t, t_hat, 1.007), x + math.sqrt(t_hat**2 - t**2) * 1.007 * n
    )
    d = (x - d1) / t_hat
    x_e = x + (t_next - t_hat) * d
    torch.testing.assert_close(heun_step(x, d1, None, t_hat, t_next), x_e, rtol=0, atol=0)
    d_prime = (x_e - d2) / t_next
    expect = x + (t_next - t_hat) * (0.5 * d + 0.5 * d_prime)
    torch.testing.assert_close(heun_step(x, d1, d2, t_hat, t_next), expect, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_half_precision_is_computed_in_float32(dtype):
    g = torch.Generator().manual_seed(1)
    x, n, d1, d2 = (torch.randn(64, generator=g).to(dtype) for _ in range(4))
    out = heun_step(x, d1, d2, 3.0, 2.0)
    ref = heun_step(x.float(), d1.float(), d2.float(), 3.0, 2.0).to(dtype)
    assert out.dtype == dtype and torch.equal(out, ref)
    c = churn(x, n, 1.0, 1.2, 1.0)
    assert c.dtype == dtype and torch.equal(c, churn(x.float(), n.float(), 1.0, 1.2, 1.0).to(dtype))


def _fake_kernels(can_use=True):
    calls = []
    mod = types.ModuleType("vdmpp.kernels")

    def _can_use(op, *ts):
        calls.append(("can_use", op))
        return can_use

    def _churn(*args):
        calls.append(("churn",))
        return churn(*args)

    def _heun_step(*args):
        calls.append(("heun_step", args[2] is None))
        return heun_step(*args)

    mod.can_use, mod.churn, mod.heun_step = _can_use, _churn, _heun_step
    return mod, calls


def _run(**kw):
    noise = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0))
    return edm_stochastic(
        denoiser, noise, karras_sigmas(6), churn=5.0, generator=torch.Generator().manual_seed(1),
        return_info=True, **kw,
    )  # fmt: skip


def test_auto_uses_kernels_when_importable(monkeypatch):
    mod, calls = _fake_kernels()
    monkeypatch.setitem(sys.modules, "vdmpp.kernels", mod)
    x, info = _run()
    assert info.kernels and ("churn",) in calls
    assert calls.count(("heun_step", True)) == 6 and calls.count(("heun_step", False)) == 5
    _step._reset_kernels_cache()
    ref, ref_info = _run(use_kernels=False)
    assert not ref_info.kernels and torch.equal(x, ref)


def test_env_var_and_flag_force_reference(monkeypatch):
    mod, calls = _fake_kernels()
    monkeypatch.setitem(sys.modules, "vdmpp.kernels", mod)
    monkeypatch.setenv("VDMPP_KERNELS", "0")
    assert not _run()[1].kernels and not calls
    monkeypatch.setenv("VDMPP_KERNELS", "1")
    assert _run()[1].kernels
    monkeypatch.delenv("VDMPP_KERNELS")
    calls.clear()
    assert not _run(use_kernels=False)[1].kernels and not calls


def test_can_use_false_falls_back_or_errors_when_forced(monkeypatch):
    mod, calls = _fake_kernels(can_use=False)
    monkeypatch.setitem(sys.modules, "vdmpp.kernels", mod)
    assert not _run()[1].kernels
    assert all(c[0] == "can_use" for c in calls)
    with pytest.raises(RuntimeError, match="cannot serve"):
        _run(use_kernels=True)


def test_missing_kernels_is_silent_unless_forced(monkeypatch):
    monkeypatch.setitem(sys.modules, "vdmpp.kernels", None)  # import raises ImportError
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _run()[1].kernels
    with pytest.raises(RuntimeError, match="not importable"):
        _run(use_kernels=True)
    monkeypatch.setenv("VDMPP_KERNELS", "1")
    with pytest.raises(RuntimeError, match="VDMPP_KERNELS"):
        heun(denoiser, torch.randn(2, 3), karras_sigmas(3))


def test_broken_kernels_warn_once(monkeypatch):
    class Broken:
        def find_spec(self, name, path=None, target=None):
            if name == "vdmpp.kernels":
                raise OSError("undefined symbol: _ZN2at6Tensor")
            return None

    monkeypatch.delitem(sys.modules, "vdmpp.kernels", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    with pytest.warns(RuntimeWarning, match="undefined symbol"):
        assert not _run()[1].kernels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        euler(denoiser, torch.randn(2, 3), karras_sigmas(3))  # cached: no second warning


def _real_kernels():
    try:
        return importlib.import_module("vdmpp.kernels")
    except Exception:
        return None


@pytest.mark.skipif(importlib.util.find_spec("vdmpp") is None or _real_kernels() is None,
                    reason="vdmpp.kernels is not installed")  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_real_kernels_match_reference(dtype, device):
    K = _real_kernels()
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU")
    g = torch.Generator().manual_seed(2)
    x, n, d1, d2 = (torch.randn(2, 3, 17, 9, generator=g).to(device, dtype) for _ in range(4))
    if not K.can_use("heun_step", x):
        pytest.skip(f"kernels do not serve {dtype} on {device}")
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(K.churn(x, n, 1.5, 2.0, 1.003), churn(x, n, 1.5, 2.0, 1.003), **tol)
    for dn in (None, d2):
        torch.testing.assert_close(
            K.heun_step(x, d1, dn, 2.0, 1.25), heun_step(x, d1, dn, 2.0, 1.25), **tol
        )
