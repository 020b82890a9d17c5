"""The fast samplers against ground truth (float64): convergence orders, distributions, NFE.

Data x₀ ~ N(μ, s²) per coordinate has the exact denoiser D(x; σ) = μ + s²/(s² + σ²)·(x − μ), and
the PF-ODE dx/dσ = (x − D)/σ keeps (x − μ)/√(s² + σ²) constant, so from x_T = noise·σ_max the
exact solution at any σ is x(σ) = μ + (x_T − μ)·√(s² + σ²)/√(s² + σ_max²). Each deterministic
solver's error at N steps against it gives its empirical order of convergence.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import vdmpp.samplers as S
from vdmpp.samplers import SAMPLERS, karras_sigmas

F64 = torch.float64
MU, SD = 0.3, 0.5


def gaussian_denoiser(mu=MU, s=SD):
    def D(x, sigma):
        sg = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return mu + s**2 / (s**2 + sg**2) * (x - mu)

    return D


def _noise(shape, seed=0, dtype=F64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def exact_pf_ode(noise, sigma_max, sigma, mu=MU, s=SD):
    x_t = noise * sigma_max
    return mu + (x_t - mu) * math.sqrt(s**2 + sigma**2) / math.sqrt(s**2 + sigma_max**2)


def mixture_denoiser():
    """Exact D(x; σ) of a 2-D three-component Gaussian mixture (nonlinear in x)."""
    pi = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    m = torch.tensor([[-1.0, 0.5], [1.0, 1.0], [0.0, -1.5]], dtype=F64)
    sk = torch.tensor([0.3, 0.2, 0.4], dtype=F64)

    def D(x, sigma):
        var = sk[None] ** 2 + sigma.to(F64).reshape(-1, 1) ** 2
        sq = ((x[:, None, :] - m[None]) ** 2).sum(-1)
        w = torch.softmax(torch.log(pi)[None] - torch.log(var) - 0.5 * sq / var, dim=1)
        comp = m[None] + (sk[None] ** 2 / var)[..., None] * (x[:, None, :] - m[None])
        return (w[..., None] * comp).sum(1)

    return D


# --- empirical order of convergence ------------------------------------------------------------
# One row per deterministic solver (the SDE ones with η = 0): (name, options, order, tolerance).
# Regime: EDM's grid σ_max = 80 → σ_min = 0.002 (ρ = 7), stopping at σ_min (no step to 0, whose
# D̂ would add a fixed bias), N = 32 … 128 (3M: 128 … 512, where it is asymptotic).
ORDER_ROWS = [
    ("euler", {}, 1, 0.1),
    ("ddim", {}, 1, 0.1),
    ("heun", {}, 2, 0.1),
    ("dpm_2", {}, 2, 0.1),
    ("lms", {"order": 4}, 3.5, 0.4),  # AB4 in σ: 3.3 → 3.8 over this range ("roughly ≥ 3")
    ("dpmpp_2s_ancestral", {"eta": 0.0}, 2, 0.1),
    ("dpmpp_sde", {"eta": 0.0}, 2, 0.1),
    ("dpmpp_2m", {}, 2, 0.1),
    ("dpmpp_2m_sde", {"eta": 0.0, "solver_type": "heun"}, 2, 0.15),
    # k-diffusion's (and DPM-Solver's) 3M weights the second divided difference D₂ ≈ h²D̂''/2
    # by φ₃, where a third-order step needs h²D̂'' (its local error is O(h³)): measured 1.9
    ("dpmpp_3m_sde", {"eta": 0.0}, 2, 0.15),
    # UniC raises UniP-p to order p + 1 (UniPC Thm. 3.3): order=1 → 2, 2 → 3, 3 → 4
    ("unipc", {"order": 1}, 2, 0.15),
    ("unipc", {"order": 2}, 3, 0.2),
    ("unipc", {"order": 3, "variant": "bh2"}, 4, 0.25),
    ("unipc", {"order": 3, "variant": "bh1"}, 4, 0.25),
]


@pytest.mark.parametrize(("name", "opts", "order", "tol"), ORDER_ROWS)
def test_empirical_order_of_convergence(name, opts, order, tol):
    smax, smin = 80.0, 0.002
    D, noise = gaussian_denoiser(), _noise((8, 3))
    exact = exact_pf_ode(noise, smax, smin)
    ns = [128, 256, 512] if name == "dpmpp_3m_sde" else [32, 64, 128]
    errs = []
    for n in ns:
        grid = karras_sigmas(n + 1, sigma_min=smin, sigma_max=smax)[:-1]  # n steps to σ_min
        x = SAMPLERS[name].fn(D, noise, grid, **opts)
        errs.append((x - exact).abs().max().item())
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert abs(slope - order) < tol, (errs, slope)


def test_dpm_adaptive_error_follows_its_tolerance():
    D, noise = gaussian_denoiser(), _noise((8, 3))
    exact = exact_pf_ode(noise, 80.0, 0.002)
    prev_err, prev_nfe = math.inf, 0
    for tol in (1e-2, 1e-3, 1e-4, 1e-5):
        x, info = S.dpm_adaptive(D, noise, sigma_min=0.002, sigma_max=80.0, rtol=tol, atol=tol,
                                 return_info=True)  # fmt: skip
        err = (x - exact).abs().max().item()
        assert err < 30 * tol and err < prev_err and info.nfe > prev_nfe, (tol, err, info)
        assert info.nfe == 3 * info.accepted + 2 * info.rejected
        assert info.steps == info.accepted + info.rejected
        prev_err, prev_nfe = err, info.nfe
    # a grid is read for its bounds; denoise_to_zero adds one D̂ at σ_min
    grid = karras_sigmas(7, sigma_min=0.002, sigma_max=80.0)
    a = S.dpm_adaptive(D, noise, grid)
    torch.testing.assert_close(a, S.dpm_adaptive(D, noise, sigma_min=0.002, sigma_max=80.0))
    z, info = S.dpm_adaptive(D, noise, grid, denoise_to_zero=True, return_info=True)
    torch.testing.assert_close(z, D(a, torch.full((8,), 0.002, dtype=F64)))
    with pytest.raises(ValueError, match="either sigmas or sigma_min"):
        S.dpm_adaptive(D, noise, grid, sigma_min=0.01)
    with pytest.raises(ValueError, match="order must be 2 or 3"):
        S.dpm_adaptive(D, noise, grid, order=1)


# --- exact identities ------------------------------------------------------------------------


def _g(seed=5):
    return torch.Generator().manual_seed(seed)


def test_eta_zero_and_eta_one_reduce_to_the_known_samplers():
    D, noise, ts = gaussian_denoiser(), _noise((16, 3)), karras_sigmas(12)
    close = dict(rtol=1e-12, atol=1e-12)
    # η = 1 ancestral Euler is DDPM's posterior step (VDM eq. 28, derived in VP units)
    torch.testing.assert_close(S.euler_ancestral(D, noise, ts, generator=_g()),
                               S.ddpm(D, noise, ts, generator=_g()), **close)  # fmt: skip
    torch.testing.assert_close(S.euler_ancestral(D, noise, ts, eta=0.0), S.euler(D, noise, ts),
                               **close)  # fmt: skip
    torch.testing.assert_close(S.dpm_2_ancestral(D, noise, ts, eta=0.0), S.dpm_2(D, noise, ts),
                               **close)  # fmt: skip
    torch.testing.assert_close(S.dpmpp_2m_sde(D, noise, ts, eta=0.0), S.dpmpp_2m(D, noise, ts),
                               **close)  # fmt: skip
    torch.testing.assert_close(S.dpmpp_sde(D, noise, ts, eta=0.0),
                               S.dpmpp_2s_ancestral(D, noise, ts, eta=0.0), **close)  # fmt: skip
    torch.testing.assert_close(S.lms(D, noise, ts, order=1), S.euler(D, noise, ts), **close)


@pytest.mark.parametrize("name", [n for n, s in SAMPLERS.items() if "eta" in s.options])
def test_no_noise_drawn_when_deterministic(name):
    D, noise, ts = gaussian_denoiser(), _noise((4, 3)), karras_sigmas(6)
    g = _g()
    state = g.get_state()
    SAMPLERS[name].fn(D, noise, ts, eta=0.0, generator=g)
    assert torch.equal(g.get_state(), state)


def unipc_reference_vp(D, noise, ts, order, variant):
    """UniPC-bh multistep written in VP units (z = αx, α = 1/√(1 + σ²), σ_VP = ασ,
    λ = log α − log σ_VP), following the reference ``multistep_uni_pc_bh_update`` with
    torch.linalg.solve — an independent check of the EDM-unit transcription."""
    n = len(ts) - 1

    def a(s):
        return 1 / math.sqrt(1 + s * s)

    def lam(s):
        return math.log(a(s)) - math.log(a(s) * s)

    z = noise * ts[0] * a(ts[0])

    def model(z, s):
        return D(z / a(s), torch.full((z.shape[0],), s, dtype=F64))

    ms, ls = [model(z, ts[0])], [lam(ts[0])]
    for step in range(1, n + 1):
        p = step if step < order else min(order, n + 1 - step)
        corrector = step < n
        s_prev, t = ts[step - 1], ts[step]
        h = lam(t) - ls[-1]
        rks = [(ls[-(k + 1)] - ls[-1]) / h for k in range(1, p)] + [1.0]
        d1s = [(ms[-(k + 1)] - ms[-1]) / rks[k - 1] for k in range(1, p)]
        hh = -h
        h_phi_1 = math.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        fact = 1
        b_h = hh if variant == "bh1" else math.expm1(hh)
        R, b = [], []
        for i in range(1, p + 1):
            R.append([r ** (i - 1) for r in rks])
            b.append(h_phi_k * fact / b_h)
            fact *= i + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        R, b = torch.tensor(R, dtype=F64), torch.tensor(b, dtype=F64)
        sig_prev, sig_t, a_t = a(s_prev) * s_prev, a(t) * t, a(t)
        z_ = sig_t / sig_prev * z - a_t * h_phi_1 * ms[-1]
        zt = z_
        if d1s:
            rho_p = [0.5] if p == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
            zt = z_ - a_t * b_h * sum(r * d for r, d in zip(rho_p, d1s))
        m_t = None
        if corrector:
            rho_c = [0.5] if p == 1 else torch.linalg.solve(R, b).tolist()
            m_t = model(zt, t)
            corr = sum(r * d for r, d in zip(rho_c[:-1], d1s)) + rho_c[-1] * (m_t - ms[-1])
            zt = z_ - a_t * b_h * corr
        z = zt
        if step < n:
            ms.append(m_t if m_t is not None else model(z, t))
            ls.append(lam(t))
            ms, ls = ms[-order:], ls[-order:]
    return z / a(ts[-1])


@pytest.mark.parametrize(("order", "variant"), [(1, "bh1"), (2, "bh1"), (3, "bh1"), (3, "bh2")])
def test_unipc_matches_a_vp_unit_transcription(order, variant):
    D, NOISE = mixture_denoiser(), _noise((32, 2))
    ts = karras_sigmas(10, sigma_min=0.01, sigma_max=20.0)[:-1].tolist()
    x, info = S.unipc(D, NOISE, ts, order=order, variant=variant, return_info=True)
    ref = unipc_reference_vp(D, NOISE, ts, order, variant)
    torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-10)
    assert info.nfe == len(ts) - 1
    # a grid ending at 0 ends with the limit of the first-order step: x = the last D̂
    x0 = S.unipc(D, NOISE, [*ts, 0.0], order=order, variant=variant)
    assert torch.isfinite(x0).all()


# --- NFE, exactly ----------------------------------------------------------------------------


class Counting:
    def __init__(self):
        self.calls = 0
        self.D = gaussian_denoiser()

    def __call__(self, x, sigma):
        self.calls += 1
        return self.D(x, sigma)


@pytest.mark.parametrize("name", [n for n, s in SAMPLERS.items() if s.grid])
@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_nfe_formula(name, n):
    spec = SAMPLERS[name]
    D = Counting()
    x, info = spec.fn(D, _noise((4, 3)), karras_sigmas(n), generator=_g(), return_info=True)
    assert info.nfe == D.calls == spec.nfe(n) and info.steps == n
    assert torch.isfinite(x).all()


# --- SDE samplers: the distribution ----------------------------------------------------------
# B = 20 000 one-dimensional samples: standard errors s/√B = 0.0035 (mean) and s²√(2/B) = 0.0025
# (variance); both must match within 4 of them. The steps make the discretization bias small
# against that: the first-order ancestral step loses r²·Var(x₀ | x) of variance per step (it
# plugs in x̂ = E[x₀ | x]), −0.046 at 60 steps and −0.0125 at 200, hence 1000 steps for those.
SDE_ROWS = [
    ("ddpm", {}, 1000),
    ("euler_ancestral", {}, 1000),
    ("dpm_2_ancestral", {}, 200),
    ("dpmpp_2s_ancestral", {}, 200),
    ("dpmpp_sde", {}, 200),
    ("dpmpp_sde", {"eta": 0.5, "r": 0.3}, 200),
    ("dpmpp_2m_sde", {}, 200),
    ("dpmpp_2m_sde", {"solver_type": "heun"}, 200),
    ("dpmpp_3m_sde", {}, 200),
    ("dpm_adaptive", {"eta": 1.0, "rtol": 0.01, "atol": 0.001, "denoise_to_zero": True}, None),
]


@pytest.mark.parametrize(("name", "opts", "n"), SDE_ROWS)
def test_sde_samplers_sample_the_data_distribution(name, opts, n):
    B = 20_000
    D, noise = gaussian_denoiser(), _noise((B, 1), seed=1)
    x = SAMPLERS[name].fn(D, noise, karras_sigmas(n or 18), generator=_g(2), **opts)
    se_mean, se_var = SD / math.sqrt(B), SD**2 * math.sqrt(2 / B)
    assert abs(x.mean().item() - MU) < 4 * se_mean, x.mean().item()
    assert abs(x.var().item() - SD**2) < 4 * se_var, x.var().item()


# --- conventions -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_conventions_dtype_callback_and_nan(name):
    spec = SAMPLERS[name]
    D = gaussian_denoiser()
    seen = []
    x = spec.fn(D, _noise((4, 3), dtype=torch.bfloat16), karras_sigmas(5), generator=_g(),
                callback=seen.append)  # fmt: skip
    assert x.dtype == torch.bfloat16 and torch.isfinite(x.float()).all()
    keys = {"i", "x", "denoised", "sigma", "sigma_hat", "sigma_next", "nfe"}
    assert seen and all(keys <= set(s) for s in seen)
    assert all(isinstance(s["sigma"], float) for s in seen)

    def bad(x, sigma):
        out = D(x, sigma)
        return out * float("nan") if float(sigma[0]) < 5 else out

    with pytest.raises(FloatingPointError, match="NaN/inf"):
        spec.fn(bad, _noise((4, 3)), karras_sigmas(8), generator=_g())
    if spec.grid:  # dpm_adaptive cannot step on without a finite error estimate: it raises
        x = spec.fn(bad, _noise((4, 3)), karras_sigmas(8), generator=_g(), check_finite=False)
        assert x.isnan().any()
