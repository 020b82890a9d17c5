"""Parity with k-diffusion 0.1.1 (``k_diffusion/sampling.py``) in float64, same noise.

k-diffusion's sampling module is loaded by file path with two stubs: its package-relative
``utils`` (only ``append_dims`` is used) and, when absent, ``torchsde`` / ``torchdiffeq`` (used
only by the Brownian-tree noise sampler and ``log_likelihood``, neither called here). scipy is
real: ``sample_lms`` integrates its coefficients with ``scipy.integrate.quad``. The test is
skipped when k-diffusion's source is not found; get it with
``pip install --no-deps k-diffusion==0.1.1.post1`` (nothing else is installed) or point
``VDMPP_KDIFFUSION_SAMPLING`` at a ``sampling.py``.

Noise: every k-diffusion call gets ``noise_sampler = lambda s, s_next: randn(gen)``, vdmpp the
same-seeded generator, so both see one stream of tensors in call order.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch

import vdmpp.samplers as S

F64 = torch.float64


def _sampling_path() -> Path | None:
    env = os.environ.get("VDMPP_KDIFFUSION_SAMPLING")
    if env:
        return Path(env)
    try:
        spec = importlib.util.find_spec("k_diffusion")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations))) / "sampling.py"
    return p if p.is_file() else None


def _load():
    path = _sampling_path()
    if path is None:
        pytest.skip("k-diffusion not found: pip install --no-deps k-diffusion==0.1.1.post1")
    pytest.importorskip("scipy.integrate", reason="k-diffusion's sample_lms needs scipy")
    pkg = types.ModuleType("_kdiff")
    pkg.__path__ = []
    utils = types.ModuleType("_kdiff.utils")

    def append_dims(x, target_dims):
        return x[(...,) + (None,) * (target_dims - x.ndim)]

    utils.append_dims = append_dims
    pkg.utils = utils
    stubs = {"_kdiff": pkg, "_kdiff.utils": utils}
    for name, attr in (("torchsde", "BrownianTree"), ("torchdiffeq", "odeint")):
        if importlib.util.find_spec(name) is None:
            m = types.ModuleType(name)
            setattr(m, attr, None)
            stubs[name] = m
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location("_kdiff.sampling", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    except Exception as e:  # pragma: no cover - an incompatible k-diffusion
        pytest.skip(f"k-diffusion's sampling.py at {path} cannot be loaded: {e!r}")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return mod


@pytest.fixture(scope="module")
def K():
    return _load()


def mixture_denoiser():
    """Exact D(x; σ) of a 2-D three-component Gaussian mixture (nonlinear in x)."""
    pi = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    m = torch.tensor([[-1.0, 0.5], [1.0, 1.0], [0.0, -1.5]], dtype=F64)
    sk = torch.tensor([0.3, 0.2, 0.4], dtype=F64)

    def D(x, sigma):
        sg2 = sigma.to(F64).reshape(-1, 1) ** 2
        var = sk[None] ** 2 + sg2
        sq = ((x[:, None, :] - m[None]) ** 2).sum(-1)
        w = torch.softmax(torch.log(pi)[None] - torch.log(var) - 0.5 * sq / var, dim=1)
        comp = m[None] + (sk[None] ** 2 / var)[..., None] * (x[:, None, :] - m[None])
        return (w[..., None] * comp).sum(1)

    return D


D = mixture_denoiser()
NOISE = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=F64)


def _gen(seed=11):
    return torch.Generator().manual_seed(seed)


def _ns(gen):
    return lambda s, s_next: torch.randn(NOISE.shape, generator=gen, dtype=F64)


def _grid(n=12):
    return S.karras_sigmas(n, sigma_min=0.01, sigma_max=20.0)


# (vdmpp name, k-diffusion function, options, stochastic)
ROWS = [
    ("euler", "sample_euler", {}, False),
    ("heun", "sample_heun", {}, False),
    ("euler_ancestral", "sample_euler_ancestral", {"eta": 0.8, "s_noise": 1.01}, True),
    ("dpm_2", "sample_dpm_2", {}, False),
    ("dpm_2_ancestral", "sample_dpm_2_ancestral", {"eta": 1.0, "s_noise": 0.99}, True),
    ("lms", "sample_lms", {"order": 4}, False),
    ("lms", "sample_lms", {"order": 2}, False),
    ("dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral", {"eta": 0.7}, True),
    ("dpmpp_2m", "sample_dpmpp_2m", {}, False),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {"eta": 1.0, "solver_type": "midpoint"}, True),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {"eta": 0.5, "solver_type": "heun"}, True),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", {"eta": 1.0, "s_noise": 1.02}, True),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", {"eta": 0.0}, True),
]


@pytest.mark.parametrize(("name", "kname", "opts", "stochastic"), ROWS)
def test_same_samples_as_k_diffusion(K, name, kname, opts, stochastic):
    sigmas = _grid()
    kw = dict(opts)
    if stochastic:
        kw["noise_sampler"] = _ns(_gen())
    ref = getattr(K, kname)(D, NOISE * sigmas[0], sigmas, disable=True, **kw)
    x = S.SAMPLERS[name].fn(D, NOISE, sigmas, generator=_gen(), **opts)
    torch.testing.assert_close(x, ref, rtol=1e-11, atol=1e-11)


def test_dpmpp_sde_with_the_matching_brownian_noise_sampler(K):
    """vdmpp's dpmpp_sde draws the Brownian increments of [σ_s, σ] and [σ_{i+1}, σ_s]; a
    k-diffusion noise_sampler built from the same two draws per step gives the same samples."""
    sigmas, r = _grid(), 0.4
    gen = _gen()
    state = {}

    def brownian(s, s_to):
        s, s_to = float(s), float(s_to)
        e = torch.randn(NOISE.shape, generator=gen, dtype=F64)
        if state.get("from") == s:  # second call of the step: W(σ_to) − W(σ) = A + B
            s_mid, e1 = state.pop("mid"), state.pop("e1")
            state.pop("from")
            return (math.sqrt(s - s_mid) * e1 + math.sqrt(s_mid - s_to) * e) / math.sqrt(s - s_to)
        state.update({"from": s, "mid": s_to, "e1": e})
        return e

    ref = K.sample_dpmpp_sde(D, NOISE * sigmas[0], sigmas, disable=True, eta=0.9, r=r,
                             noise_sampler=brownian)  # fmt: skip
    x = S.dpmpp_sde(D, NOISE, sigmas, eta=0.9, r=r, generator=_gen())
    torch.testing.assert_close(x, ref, rtol=1e-11, atol=1e-11)
    # eta = 0: deterministic, no noise sampler involved
    ref0 = K.sample_dpmpp_sde(D, NOISE * sigmas[0], sigmas, disable=True, eta=0.0, r=r,
                              noise_sampler=_ns(_gen()))  # fmt: skip
    torch.testing.assert_close(S.dpmpp_sde(D, NOISE, sigmas, eta=0.0, r=r), ref0,
                               rtol=1e-11, atol=1e-11)  # fmt: skip


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")
@pytest.mark.parametrize("order", [2, 3])
def test_dpm_adaptive_same_steps_as_k_diffusion(K, order):
    # dyadic tolerances and float64 bounds: k-diffusion turns atol/rtol into float32 tensors
    # and torch.tensor(sigma_max) into float32 unless given a float64 tensor
    lo, hi = torch.tensor(0.01, dtype=F64), torch.tensor(20.0, dtype=F64)
    kw = dict(order=order, rtol=2.0**-5, atol=2.0**-8)
    ref, kinfo = K.sample_dpm_adaptive(D, NOISE * 20.0, lo, hi, disable=True, return_info=True,
                                       **kw)  # fmt: skip
    x, info = S.dpm_adaptive(D, NOISE, sigma_min=0.01, sigma_max=20.0, return_info=True, **kw)
    torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-10)
    assert info.steps == kinfo["steps"] and info.rejected > 0  # the retry path is exercised
    assert (info.accepted, info.rejected) == (kinfo["n_accept"], kinfo["n_reject"])
    assert kinfo["nfe"] == order * info.steps  # k-diffusion counts `order` per attempt …
    assert info.nfe == order * info.steps - info.rejected  # … vdmpp reuses D(x; σ_s) on retry


def test_lms_coefficients_match_scipy_quad(K):
    ts = _grid(10).tolist()
    for order in (1, 2, 3, 4):
        for i in range(order - 1, len(ts) - 1):
            ref = [K.linear_multistep_coeff(order, ts, i, j) for j in range(order)]
            ours = S.lms_coefficients(ts, i, order)
            assert ours == pytest.approx(ref, rel=1e-12, abs=1e-12)


def test_ancestral_step_matches(K):
    for a, b, eta in [(10.0, 5.0, 1.0), (1.0, 0.3, 0.5), (2.0, 1.9, 3.0), (0.5, 0.0, 1.0)]:
        ref = K.get_ancestral_step(torch.tensor(a, dtype=F64), torch.tensor(b, dtype=F64), eta)
        assert S.ancestral_step(a, b, eta) == pytest.approx([float(v) for v in ref], rel=1e-14)
