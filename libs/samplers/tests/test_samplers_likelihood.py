"""log_likelihood against closed forms and brute-force quadrature.

Ground truth, derived here:

* Gaussian data N(mu, Σ): p_σ = N(mu, Σ + σ²I), exact denoiser D = mu + Σ(Σ + σ²I)⁻¹(x − mu).
  In Σ's eigenbasis (eigenvalues λ_i) the PF-ODE dx/dσ = (x − D)/σ decouples into
  dz_i/dσ = z_i·σ/(λ_i + σ²), so z_i(σ) = z_i(σ')·√((λ_i + σ²)/(λ_i + σ'²)).
  The change of variables then gives, exactly,
  log p_{σ_min}(x) = log N(x_T; mu, Σ + σ_max²I) + Δ, so with the prior N(0, σ_max² I) that
  ``log_likelihood`` uses, its answer must be log N(x; mu, Σ + σ_min²I)
  − log N(x_T; mu, Σ + σ_max²I) + log N(x_T; 0, σ_max²I).
* A 1-D mixture Σ_k π_k N(m_k, s_k²) has D = Σ_k r_k·(m_k + s_k²/(s_k² + σ²)(x − m_k)) with
  r_k ∝ π_k N(x; m_k, s_k² + σ²) (Tweedie); its p_σ is computed here by brute-force quadrature
  of ∫ p(y) N(x − y; 0, σ²) dy, not from the closed form.
"""

from __future__ import annotations

import math
import sys
from importlib.util import find_spec

import pytest
import torch

from vdmpp.samplers import PerSampleGenerator, guided
from vdmpp.samplers.likelihood import LogLikelihood, log_likelihood

F64 = torch.float64
needs_torchdiffeq = pytest.mark.skipif(
    find_spec("torchdiffeq") is None, reason="torchdiffeq (the [likelihood] extra) not installed"
)

# --- Gaussian data with a full covariance --------------------------------------------------
A = torch.tensor([[0.5, 0.1, -0.2], [0.0, 0.3, 0.25], [0.1, -0.1, 0.2]], dtype=F64)
SIGMA = A @ A.T + 0.05 * torch.eye(3, dtype=F64)
MU = torch.tensor([0.3, -0.2, 0.1], dtype=F64)
EYE = torch.eye(3, dtype=F64)


def gaussian_denoiser(x, sigma):
    """mu + Σ(Σ + σ²I)⁻¹(x − mu), one linear solve per example (matrix form)."""
    s2 = sigma.to(F64).reshape(-1, 1, 1) ** 2
    m = SIGMA + s2 * EYE  # [B, 3, 3]
    sol = torch.linalg.solve(m, (x.to(F64) - MU).unsqueeze(-1)).squeeze(-1)
    return (MU + sol @ SIGMA.T).to(x.dtype)


def log_normal(x, mean, cov):
    return torch.distributions.MultivariateNormal(mean, covariance_matrix=cov).log_prob(x)


def expected_gaussian(x, sigma_min, sigma_max):
    lam, u = torch.linalg.eigh(SIGMA)
    z = (x - MU) @ u
    x_t = MU + (z * torch.sqrt((lam + sigma_max**2) / (lam + sigma_min**2))) @ u.T
    nats = (
        log_normal(x, MU, SIGMA + sigma_min**2 * EYE)
        - log_normal(x_t, MU, SIGMA + sigma_max**2 * EYE)
        + log_normal(x_t, torch.zeros(3, dtype=F64), sigma_max**2 * EYE)
    )
    return nats, x_t


def points(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return MU + torch.randn(n, 3, generator=g, dtype=F64) @ torch.linalg.cholesky(SIGMA).T


SMIN, SMAX = 0.002, 80.0


@needs_torchdiffeq
def test_gaussian_exact_divergence_is_the_closed_form_to_the_solver_tolerance():
    x = points(6)
    expected, x_t = expected_gaussian(x, SMIN, SMAX)
    errs = {}
    for tol in (1e-5, 1e-8):
        r = log_likelihood(gaussian_denoiser, x, sigma_min=SMIN, sigma_max=SMAX, rtol=tol, atol=tol)
        assert isinstance(r, LogLikelihood) and r.nats.shape == (6,) and r.dims == 3
        torch.testing.assert_close(r.nats, r.prior + r.delta, rtol=0, atol=1e-12)
        errs[tol] = (r.nats - expected).abs().max().item()
        scale = (r.prior.abs() + r.delta.abs()).max().item()  # ≈ 50 nats
        assert errs[tol] < 10 * tol * scale, (tol, errs[tol])
        torch.testing.assert_close(r.latent, x_t, rtol=100 * tol, atol=100 * tol)
    assert errs[1e-8] < errs[1e-5] / 100  # the error is the solver's
    # the prior N(0, σ_max²) is the only approximation: with it replaced by the true p_{σ_max}
    # the answer is the closed-form density of x at σ_min
    true_prior = log_normal(r.latent, MU, SIGMA + SMAX**2 * EYE)
    torch.testing.assert_close(
        true_prior + r.delta, log_normal(x, MU, SIGMA + SMIN**2 * EYE), rtol=0, atol=1e-5
    )


@needs_torchdiffeq
def test_float32_input():
    x = points(4, seed=1)
    expected, _ = expected_gaussian(x, SMIN, SMAX)
    r = log_likelihood(gaussian_denoiser, x.float(), sigma_min=SMIN, sigma_max=SMAX)
    assert r.nats.dtype == torch.float32
    assert (r.nats.double() - expected).abs().max() < 1e-2  # float32 and rtol = atol = 1e-5


@needs_torchdiffeq
def test_rademacher_hutchinson_is_exact_for_a_diagonal_jacobian():
    """Isotropic data: ∂D/∂x = s²/(s² + σ²)·I, and εᵀ(cI)ε = c·d for every ε ∈ {±1}^d."""
    mu, s = 0.3, 0.5

    def iso(x, sigma):
        return mu + s**2 / (s**2 + sigma.reshape(-1, 1) ** 2) * (x - mu)

    x = points(5, seed=2)
    exact = log_likelihood(iso, x, sigma_min=SMIN, sigma_max=SMAX, rtol=1e-8, atol=1e-8)
    gen = torch.Generator().manual_seed(0)
    hutch = log_likelihood(iso, x, sigma_min=SMIN, sigma_max=SMAX, rtol=1e-8, atol=1e-8,
                           divergence="hutchinson", generator=gen)  # fmt: skip
    torch.testing.assert_close(hutch.nats, exact.nats, rtol=0, atol=1e-6)


@needs_torchdiffeq
@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_mean_over_probes_is_within_its_standard_error(probe):
    """Non-diagonal Jacobian: each probe's answer differs, their mean converges to the exact."""
    k = 256
    x = points(1, seed=3).expand(k, 3).contiguous()  # one point, k probes (one per row)
    expected, _ = expected_gaussian(x[:1], SMIN, SMAX)
    r = log_likelihood(gaussian_denoiser, x, sigma_min=SMIN, sigma_max=SMAX, rtol=1e-7, atol=1e-7,
                       divergence="hutchinson", probe=probe,
                       generator=torch.Generator().manual_seed(1))  # fmt: skip
    est = r.nats
    se = est.std().item() / math.sqrt(k)
    assert est.std() > 0.01  # the estimator is noisy here, so the test has teeth
    assert abs(est.mean().item() - expected.item()) < 4 * se, (est.mean(), expected, se)
    # the latent does not depend on the probe
    assert (r.latent - r.latent[:1]).abs().max() < 1e-5


@needs_torchdiffeq
def test_hutchinson_probes_replay_from_the_generator():
    x = points(3, seed=4)
    kw = dict(sigma_min=SMIN, sigma_max=SMAX, divergence="hutchinson")
    a = log_likelihood(gaussian_denoiser, x, generator=torch.Generator().manual_seed(5), **kw)
    b = log_likelihood(gaussian_denoiser, x, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(a.nats, b.nats)
    c = log_likelihood(gaussian_denoiser, x, generator=PerSampleGenerator([7, 8, 9]), **kw)
    d = log_likelihood(gaussian_denoiser, x[1:2], generator=PerSampleGenerator([8]), **kw)
    assert abs(c.nats[1].item() - d.nats[0].item()) < 1e-3  # same probe; batch shares steps


# --- a 1-D two-component mixture ------------------------------------------------------------
PI = (0.3, 0.7)
M = (-1.0, 1.5)
SK = (0.3, 0.6)


def mixture_denoiser(x, sigma):
    s2 = sigma.to(F64).reshape(-1, 1) ** 2
    logw = torch.stack(
        [math.log(p) - 0.5 * torch.log(sk**2 + s2) - 0.5 * (x - m) ** 2 / (sk**2 + s2)
         for p, m, sk in zip(PI, M, SK)]
    )  # fmt: skip
    r = torch.exp(logw - torch.logsumexp(logw, 0))
    d = torch.stack([m + sk**2 / (sk**2 + s2) * (x - m) for m, sk in zip(M, SK)])
    return (r * d).sum(0)


def data_density(y):
    return sum(
        p * torch.exp(-0.5 * ((y - m) / sk) ** 2) / (sk * math.sqrt(2 * math.pi))
        for p, m, sk in zip(PI, M, SK)
    )


def brute_force_log_density(x, sigma):
    """log ∫ p(y) N(x − y; 0, σ²) dy by the trapezoid rule on a fine grid (spacing 5e-4)."""
    y = torch.linspace(-12.0, 12.0, 48001, dtype=F64)
    kernel = torch.exp(-0.5 * ((x.reshape(-1, 1) - y) / sigma) ** 2) / (
        sigma * math.sqrt(2 * math.pi)
    )
    return torch.log(torch.trapezoid(data_density(y) * kernel, y, dim=1))


@needs_torchdiffeq
def test_mixture_agrees_with_brute_force_quadrature():
    smin, smax = 0.01, 50.0
    x = torch.tensor([[-1.7], [-1.0], [0.1], [0.4], [1.5], [2.9]], dtype=F64)
    r = log_likelihood(mixture_denoiser, x, sigma_min=smin, sigma_max=smax, rtol=1e-8, atol=1e-8)
    log_p_min = brute_force_log_density(x[:, 0], smin)
    log_p_max = brute_force_log_density(r.latent[:, 0], smax)
    torch.testing.assert_close(r.delta, log_p_min - log_p_max, rtol=0, atol=1e-5)
    # the closed form of the convolved mixture agrees with the quadrature (the oracle is sound)
    closed = torch.log(sum(
        p * torch.exp(-0.5 * (x[:, 0] - m) ** 2 / (sk**2 + smin**2))
        / math.sqrt(2 * math.pi * (sk**2 + smin**2)) for p, m, sk in zip(PI, M, SK)
    ))  # fmt: skip
    torch.testing.assert_close(log_p_min, closed, rtol=0, atol=1e-10)
    # the prior N(0, σ_max²) is the one approximation: here (data mean 0.75, |x_T| up to 124)
    # it is 0.04 nats from the true p_{σ_max}; with the true one the answer is log p_{σ_min}(x)
    torch.testing.assert_close(r.nats - r.prior + log_p_max, log_p_min, rtol=0, atol=1e-5)


# --- NFE -----------------------------------------------------------------------------------
class Counting:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, sigma, **kwargs):
        self.calls += 1
        return self.fn(x, sigma)


@needs_torchdiffeq
def test_nfe_counts_denoiser_evaluations():
    x = points(2, seed=6)
    D = Counting(gaussian_denoiser)
    r = log_likelihood(D, x, sigma_min=SMIN, sigma_max=SMAX)
    assert r.nfe == D.calls > 0 and isinstance(r.nfe, int)
    # a guided denoiser reports its two evaluations per call
    cond = Counting(gaussian_denoiser)
    g = log_likelihood(guided(cond, 1.5, uncond=gaussian_denoiser), x, sigma_min=SMIN,
                       sigma_max=SMAX, extra_args={"class_labels": torch.zeros(2)})  # fmt: skip
    assert g.nfe == 2 * cond.calls
    torch.testing.assert_close(g.nats, r.nats)  # w(D − D) + D = D: the same likelihood


# --- bits/dim ------------------------------------------------------------------------------
def test_bits_per_dim_conventions():
    """Uniform density on [−1, 1]^d: log p = −d log 2; with 256 bins of width 2/256, P(k) = 1/256
    per dimension, exactly 8 bits/dim."""
    d = 12
    nats = torch.full((3,), -d * math.log(2.0), dtype=F64)
    r = LogLikelihood(
        nats=nats, prior=nats, delta=0 * nats, latent=torch.zeros(3, d), nfe=0, dims=d
    )
    torch.testing.assert_close(r.bits_per_dim(2 / 256), torch.full((3,), 8.0, dtype=F64))
    torch.testing.assert_close(r.bits_per_dim(), torch.full((3,), 1.0, dtype=F64))
    torch.testing.assert_close(r.bits_per_dim(2 / 255), 1.0 + math.log2(127.5) + 0 * nats)
    with pytest.raises(ValueError, match="bin_width"):
        r.bits_per_dim(0.0)


# --- errors --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [({"sigma_min": 1.0, "sigma_max": 1.0}, ValueError, "sigma_min < sigma_max"),
     ({"sigma_min": 2.0, "sigma_max": 1.0}, ValueError, "sigma_min < sigma_max"),
     ({"sigma_min": 0.0}, ValueError, "sigma_min must be positive"),
     ({"sigma_min": -1.0}, ValueError, "sigma_min must be positive"),
     ({"sigma_max": math.inf}, ValueError, "sigma_max must be positive and finite"),
     ({"sigma_max": "eighty"}, TypeError, "sigma_max must be a number"),
     ({"sigma_max": None}, TypeError, "sigma_max must be a number"),
     ({"rtol": 0.0}, ValueError, "rtol"),
     ({"atol": -1e-5}, ValueError, "atol"),
     ({"divergence": "skilling"}, ValueError, "unknown divergence 'skilling'"),
     ({"divergence": "hutchinson", "probe": "normal"}, ValueError, "unknown probe 'normal'")],
)  # fmt: skip
def test_bad_input(kwargs, exc, match):
    base = {"sigma_min": 0.01, "sigma_max": 80.0}
    with pytest.raises(exc, match=match):
        log_likelihood(gaussian_denoiser, points(2), **{**base, **kwargs})


def test_bad_x():
    with pytest.raises(TypeError, match="floating-point"):
        log_likelihood(gaussian_denoiser, torch.zeros(2, 3, dtype=torch.long), sigma_min=0.01,
                       sigma_max=1.0)  # fmt: skip
    with pytest.raises(ValueError, match="batch"):
        log_likelihood(gaussian_denoiser, torch.zeros(0, 3), sigma_min=0.01, sigma_max=1.0)


def test_missing_torchdiffeq_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchdiffeq", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"vdmpp-samplers\[likelihood\]"):
        log_likelihood(gaussian_denoiser, points(2), sigma_min=0.01, sigma_max=1.0)


@needs_torchdiffeq
def test_a_non_differentiable_denoiser_is_refused():
    def detached(x, sigma):
        with torch.no_grad():
            return gaussian_denoiser(x, sigma)

    with pytest.raises(RuntimeError, match="no_grad"):
        log_likelihood(detached, points(2), sigma_min=0.01, sigma_max=1.0)
