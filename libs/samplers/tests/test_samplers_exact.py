"""Samplers against ground truth: exact denoisers for Gaussian and Gaussian-mixture data.

For data x ~ N(μ, s²) (per coordinate), p_σ = N(μ, s² + σ²) and the exact denoiser is
D(x; σ) = E[x₀ | x] = μ + s²/(s² + σ²)·(x − μ). The PF-ODE dx/dσ = (x − D)/σ = σ(x − μ)/(s² + σ²)
integrates to (x − μ)/√(s² + σ²) = const, so from x_T at σ_max: x₀ = μ + (x_T − μ)·s/√(s² + σ_max²).

For a mixture Σ_k π_k N(m_k, s_k² I) in d dims, p_σ = Σ_k π_k N(m_k, (s_k² + σ²) I) and
D(x; σ) = Σ_k w_k(x)·(m_k + s_k²/(s_k² + σ²)·(x − m_k)), w_k ∝ π_k N(x; m_k, (s_k² + σ²) I).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vdmpp.samplers import (
    ddim,
    ddpm,
    edm_stochastic,
    euler,
    heun,
    karras_sigmas,
    sigmas_from_schedule,
)
from vdmpp.schedules import Cosine, EDMSampling

F64 = torch.float64


def _col(sigma, x):
    s = torch.as_tensor(sigma, dtype=x.dtype)
    return s.reshape(-1, *([1] * (x.ndim - 1))) if s.ndim else s


def gaussian_denoiser(mu: float, s: float):
    def D(x, sigma):
        sg = _col(sigma, x)
        return mu + s**2 / (s**2 + sg**2) * (x - mu)

    return D


def mixture_denoiser(weights, means, stds):
    pi = torch.tensor(weights, dtype=F64)
    m = torch.tensor(means, dtype=F64)  # [K, d]
    sk = torch.tensor(stds, dtype=F64)  # [K]

    def D(x, sigma):  # x: [B, d]
        sg2 = _col(sigma, x).reshape(-1, 1) ** 2 if torch.as_tensor(sigma).ndim else sigma**2
        var = sk[None, :] ** 2 + sg2  # [B or 1, K]
        d = x.shape[1]
        sq = ((x[:, None, :] - m[None]) ** 2).sum(-1)  # [B, K]
        logw = torch.log(pi)[None] - 0.5 * d * torch.log(var) - 0.5 * sq / var
        w = torch.softmax(logw, dim=1)
        shrink = (sk[None, :] ** 2 / var)[..., None]  # [B, K, 1]
        comp = m[None] + shrink * (x[:, None, :] - m[None])
        return (w[..., None] * comp).sum(1)

    return D


def alg2_reference(D, noise, ts, churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0, gen=None):
    """EDM Algorithm 2 (Algorithm 1 when churn = 0), transcribed line by line in float64."""
    n = len(ts) - 1
    x = noise * ts[0]
    nfe = 0
    for i in range(n):
        t_cur, t_next = ts[i], ts[i + 1]
        gamma = min(churn / n, math.sqrt(2) - 1) if s_tmin <= t_cur <= s_tmax else 0.0
        t_hat = t_cur + gamma * t_cur
        x_hat = x
        if gamma > 0:
            eps = torch.randn(x.shape, generator=gen, dtype=F64)
            x_hat = x + math.sqrt(t_hat**2 - t_cur**2) * s_noise * eps
        d_cur = (x_hat - D(x_hat, t_hat)) / t_hat
        nfe += 1
        x_next = x_hat + (t_next - t_hat) * d_cur
        if t_next != 0:
            d_prime = (x_next - D(x_next, t_next)) / t_next
            nfe += 1
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next
    return x, nfe


def _noise(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


DENOISERS = {
    "gaussian": (gaussian_denoiser(0.3, 0.5), (16, 3)),
    "mixture2d": (
        mixture_denoiser([0.2, 0.5, 0.3], [[-1.0, 0.5], [1.0, 1.0], [0.0, -1.5]], [0.3, 0.2, 0.4]),
        (16, 2),
    ),
}


@pytest.mark.parametrize("data", DENOISERS)
@pytest.mark.parametrize("n", [1, 2, 18])
def test_heun_matches_algorithm_1(data, n):
    D, shape = DENOISERS[data]
    noise, ts = _noise(shape), karras_sigmas(n)
    x, info = heun(D, noise, ts, return_info=True)
    ref, nfe = alg2_reference(D, noise, ts.tolist())
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-10)
    assert info.nfe == nfe == 2 * n - 1 and info.steps == n


@pytest.mark.parametrize("data", DENOISERS)
def test_edm_stochastic_matches_algorithm_2(data):
    D, shape = DENOISERS[data]
    noise, ts = _noise(shape), karras_sigmas(18)
    kw = dict(churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
    x, info = edm_stochastic(
        D, noise, ts, generator=torch.Generator().manual_seed(7), return_info=True, **kw
    )
    ref, nfe = alg2_reference(D, noise, ts.tolist(), gen=torch.Generator().manual_seed(7), **kw)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-10)
    assert info.nfe == nfe == 35
    # churn = 0 is Algorithm 1 and draws nothing from the generator
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    torch.testing.assert_close(edm_stochastic(D, noise, ts, generator=g), heun(D, noise, ts))
    assert torch.equal(g.get_state(), state)


def test_grid_not_ending_at_zero_is_heun_on_every_step():
    D = gaussian_denoiser(0.0, 1.0)
    ts = karras_sigmas(6)[:-1]
    x, info = heun(D, _noise((4, 2)), ts, return_info=True)
    ref, nfe = alg2_reference(D, _noise((4, 2)), ts.tolist())
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-10)
    assert info.nfe == nfe == 2 * 5


@pytest.mark.parametrize(
    ("sampler", "order", "ns"), [(heun, 2, [16, 32, 64, 128]), (euler, 1, [32, 64, 128, 256])]
)
def test_convergence_order_against_exact_pf_ode(sampler, order, ns):
    mu, s, smax = 0.3, 0.5, 80.0
    D = gaussian_denoiser(mu, s)
    noise = _noise((8, 3))
    exact = mu + (noise * smax - mu) * s / math.sqrt(s**2 + smax**2)
    errs = [
        (sampler(D, noise, karras_sigmas(n, sigma_max=smax)) - exact).abs().max().item() for n in ns
    ]
    slope = np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert abs(slope + order) < 0.2, (errs, slope)
    assert errs[-1] < errs[0]


def test_ddim_is_euler_in_edm_units():
    D, shape = DENOISERS["mixture2d"]
    noise, ts = _noise(shape), karras_sigmas(10)
    x, info = ddim(D, noise, ts, return_info=True)
    torch.testing.assert_close(x, euler(D, noise, ts), rtol=1e-12, atol=1e-12)
    assert info.nfe == 10


def ddpm_reference_vp(D, noise, ts, gen):
    """VDM eq. 28, the ancestral step p(z_s | z_t), written naively in VP units (float64).

    α² = 1/(1 + σ²), σ_vp = σ·α for EDM's σ; α_{t|s} = α_t/α_s, σ²_{t|s} = σ_t² − α_{t|s}²σ_s²;
    μ = α_{t|s}σ_s²/σ_t²·z_t + α_s σ²_{t|s}/σ_t²·x̂, var = σ²_{t|s}σ_s²/σ_t²; x = z/α.
    """
    x = noise * ts[0]
    for i in range(len(ts) - 1):
        se_t, se_s = ts[i], ts[i + 1]
        a_t, a_s = 1 / math.sqrt(1 + se_t**2), 1 / math.sqrt(1 + se_s**2)
        s_t, s_s = se_t * a_t, se_s * a_s
        x_hat = D(x, se_t)
        z_t = a_t * x
        a_ts = a_t / a_s
        s2_ts = s_t**2 - a_ts**2 * s_s**2
        mean = a_ts * s_s**2 / s_t**2 * z_t + a_s * s2_ts / s_t**2 * x_hat
        z_s = mean
        if se_s > 0:
            z_s = mean + math.sqrt(s2_ts * s_s**2 / s_t**2) * torch.randn(
                x.shape, generator=gen, dtype=F64
            )
        x = z_s / a_s
    return x


def test_ddpm_matches_eq28_in_vp_units():
    D, shape = DENOISERS["mixture2d"]
    noise, ts = _noise(shape), karras_sigmas(12)
    x, info = ddpm(D, noise, ts, generator=torch.Generator().manual_seed(5), return_info=True)
    ref = ddpm_reference_vp(D, noise, ts.tolist(), torch.Generator().manual_seed(5))
    torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-10)
    assert info.nfe == 12


def test_ddim_eta_one_is_ddpm():
    D, shape = DENOISERS["gaussian"]
    noise, ts = _noise(shape), karras_sigmas(12)
    a = ddim(D, noise, ts, eta=1.0, generator=torch.Generator().manual_seed(1))
    b = ddpm(D, noise, ts, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_grids():
    ts = karras_sigmas(18)
    assert ts.dtype == F64 and len(ts) == 19 and ts[-1] == 0
    assert ts[0].item() == pytest.approx(80.0) and ts[-2].item() == pytest.approx(0.002)
    torch.testing.assert_close(sigmas_from_schedule(EDMSampling(), 18), ts, rtol=1e-12, atol=0)
    c = sigmas_from_schedule(Cosine(), 64)
    assert len(c) == 65 and c[-1] == 0 and bool((c[1:] < c[:-1]).all())
    assert c[0].item() == pytest.approx(math.exp(10.0)) and c[-2].item() == pytest.approx(
        math.exp(-10)
    )
