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


# --- per-call dispatch: any denoiser output layout / dtype ------------------------------------
def _as_kind(d, kind):
    if kind == "channels_last":
        return d.contiguous(memory_format=torch.channels_last)
    if kind == "float16":
        return d.half()
    if kind == "float64":
        return d.double()
    if kind == "non_contiguous":  # same shape, transposed storage
        return d.transpose(-1, -2).contiguous().transpose(-1, -2)
    return d


KINDS = ["contiguous", "channels_last", "float16", "float64", "non_contiguous"]


def _kind_denoiser(kind):
    return lambda x, sigma: _as_kind(denoiser(x, sigma), kind)


def _sample(name, D, noise, use_kernels):
    kw = {"churn": 20.0, "s_noise": 1.003} if name == "edm_stochastic" else {}
    sampler = {"heun": heun, "edm_stochastic": edm_stochastic}[name]
    return sampler(
        D, noise, karras_sigmas(7), generator=torch.Generator().manual_seed(5),
        use_kernels=use_kernels, return_info=True, **kw,
    )  # fmt: skip


@pytest.mark.skipif(_real_kernels() is None, reason="vdmpp.kernels is not installed")
@pytest.mark.parametrize("name", ["heun", "edm_stochastic"])
@pytest.mark.parametrize("kind", KINDS)
def test_real_kernels_serve_any_denoiser_output(monkeypatch, name, kind):
    """Kernels on: a channels_last / float16 / float64 / non-contiguous D(x) no longer makes
    vdmpp::heun_step raise; the steps it cannot serve take the reference (same bits on CPU)."""
    K = _real_kernels()
    served = []
    real = K.heun_step
    monkeypatch.setattr(K, "heun_step", lambda *a: served.append(1) or real(*a))
    noise = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(0))
    D = _kind_denoiser(kind)
    x_k, info_k = _sample(name, D, noise, True)
    n_fused = len(served)
    x_r, info_r = _sample(name, D, noise, False)
    assert info_k.kernels and not info_r.kernels and len(served) == n_fused
    assert torch.equal(x_k, x_r) and x_k.dtype == noise.dtype
    # what qualifies is fused: a float32 D(x) in x's layout; the others take the reference
    assert n_fused == (info_k.nfe if kind in ("contiguous",) else 0)


@pytest.mark.skipif(_real_kernels() is None, reason="vdmpp.kernels is not installed")
@pytest.mark.parametrize("name", ["heun", "edm_stochastic"])
def test_real_kernels_channels_last_sample_qualifies_for_free(monkeypatch, name):
    """A channels_last sample and a denoiser that keeps the layout: every step is fused (one
    dense layout is one flat loop), and the result equals the reference's bit for bit."""
    K = _real_kernels()
    served = []
    real = K.heun_step
    monkeypatch.setattr(K, "heun_step", lambda *a: served.append(1) or real(*a))
    noise = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(0))
    noise = noise.contiguous(memory_format=torch.channels_last)
    D = _kind_denoiser("channels_last")
    x_k, info = _sample(name, D, noise, None)
    assert len(served) == info.nfe and info.kernels
    x_r, _ = _sample(name, D, noise, False)
    assert torch.equal(x_k, x_r)


@pytest.mark.parametrize("kind", KINDS)
def test_dispatch_asks_per_call_with_every_operand(monkeypatch, kind):
    """The fake extension serves only float32 operands of one layout (as the real one): each
    call is decided on its own tensors, the sample equals the reference run."""
    calls = []
    mod = types.ModuleType("vdmpp.kernels")

    def can_use(op, *ts):
        ts = [t for t in ts if t is not None]
        calls.append(("can_use", op, len(ts)))
        return all(t.dtype == torch.float32 and t.stride() == ts[0].stride() for t in ts)

    def fused_heun(*a):
        calls.append(("heun_step",))
        return heun_step(*a)

    mod.can_use, mod.churn, mod.heun_step = can_use, churn, fused_heun
    monkeypatch.setitem(sys.modules, "vdmpp.kernels", mod)
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    x, info = heun(_kind_denoiser(kind), noise, karras_sigmas(5), return_info=True)
    asked = [c for c in calls if c[:2] == ("can_use", "heun_step")]
    assert asked[0][2] == 1  # once for the sample (use_kernels=None: auto) ...
    asked = asked[1:]  # ... then once per step call (Euler: 2 operands, correction: 3)
    assert len(asked) == info.nfe and sorted({c[2] for c in asked}) == [2, 3]
    fused = calls.count(("heun_step",))
    assert fused == (info.nfe if kind == "contiguous" else 0)
    _step._reset_kernels_cache()
    ref = heun(_kind_denoiser(kind), noise, karras_sigmas(5), use_kernels=False)
    assert torch.equal(x, ref)


# --- the reference correction reuses the Euler step's d and x_e -------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_reference_correction_reuses_euler_intermediate_bitwise(monkeypatch, dtype):
    g = torch.Generator().manual_seed(7)
    x, d1, d2 = (torch.randn(4, 33, generator=g).to(dtype) for _ in range(3))
    full = []
    monkeypatch.setattr(_step, "heun_step", lambda *a: full.append(1) or heun_step(*a))
    _, step = _step._ops(False)
    x_e = step(x, d1, None, 2.5, 1.5)
    out = step(x, d1, d2, 2.5, 1.5)
    assert not full  # the correction reused (d, x_e): no full re-derivation
    assert torch.equal(x_e, heun_step(x, d1, None, 2.5, 1.5))
    assert torch.equal(out, heun_step(x, d1, d2, 2.5, 1.5))
    # x_e written in between (e.g. by a denoiser working in place): recomputed from x̂ and D₁
    x_e2 = step(x, d1, None, 2.5, 1.5)
    if x_e2.dtype == _step._compute_dtype(dtype):
        x_e2.add_(1.0)
    out2 = step(x, d1, d2, 2.5, 1.5)
    assert torch.equal(out2, heun_step(x, d1, d2, 2.5, 1.5))
    assert len(full) == (1 if x_e2.dtype == _step._compute_dtype(dtype) else 0)


# --- the cheap finite check --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_all_finite_equals_isfinite_all(dtype):
    g = torch.Generator().manual_seed(8)
    for trial in range(30):
        t = torch.randn(5, 7, 3, generator=g).to(dtype)
        if trial % 3:
            i = int(torch.randint(t.numel(), (1,), generator=g))
            t.view(-1)[i] = [float("nan"), float("inf"), -float("inf")][trial % 3]
        assert _step.all_finite(t) == bool(torch.isfinite(t).all()), trial
    big = torch.full((64,), torch.finfo(dtype).max, dtype=dtype)  # finite, but its sum overflows
    assert _step.all_finite(big) and _step.all_finite(torch.cat([big, -big]))
    both = torch.tensor([float("inf"), -float("inf")], dtype=dtype)  # inf − inf = NaN: caught
    assert not _step.all_finite(both)
    assert _step.all_finite(torch.empty(0, dtype=dtype))


# --- the finite check runs once per step, and still names the evaluation ----------------------
@pytest.mark.parametrize("name", ["heun", "edm_stochastic", "euler"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("use_kernels", [False, None])
def test_deferred_check_names_the_failing_evaluation(name, bad, use_kernels):
    """A non-finite value in exactly one denoiser output, for every evaluation k: the error
    names evaluation k, its step and σ, as an eager per-output check would."""
    sampler = {"heun": heun, "edm_stochastic": edm_stochastic, "euler": euler}[name]
    kw = {"churn": 10.0, "generator": torch.Generator().manual_seed(0)}
    kw = kw if name == "edm_stochastic" else {}
    noise = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))
    nfe = sampler(denoiser, noise, karras_sigmas(5), return_info=True, **kw)[1].nfe
    for k in range(1, nfe + 1):
        seen = []

        def D(x, sigma, k=k, seen=seen):
            seen.append(float(sigma[0]))
            out = denoiser(x, sigma)
            if len(seen) == k:
                out = out.clone()
                out[1, 2, 3] = bad
            return out

        if name == "edm_stochastic":
            kw["generator"] = torch.Generator().manual_seed(0)
        with pytest.raises(FloatingPointError, match=rf"evaluation {k}\)") as err:
            sampler(D, noise, karras_sigmas(5), use_kernels=use_kernels, **kw)
        assert f"sigma={seen[k - 1]:g}" in str(err.value)
        assert len(seen) <= k + 1  # raised by the end of the step that consumed it


def test_deferred_check_reports_overflow_in_the_step():
    """A finite (float32) denoiser output whose step overflows the float16 sample: an error
    naming the step (the per-output check passed it silently)."""
    noise = torch.randn(2, 8, generator=torch.Generator().manual_seed(2)).half()
    far = lambda x, sigma: x.float() - 6e4 * sigma.view(-1, 1).float()  # finite in float32
    with pytest.raises(FloatingPointError, match=r"step 0 .*overflow in the step"):
        euler(far, noise, [80.0, 10.0])
    assert torch.isinf(euler(far, noise, [80.0, 10.0], check_finite=False)).all()
