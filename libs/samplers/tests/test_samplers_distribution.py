"""The stochastic samplers produce the data distribution (1-D, 10⁵ samples, exact denoisers).

Gaussian data N(μ, s²) and a two-component mixture; the exact denoisers are those of
test_samplers_exact.py (repeated here: helpers stay inside each test file). Tolerances are a few
standard errors of the estimates plus a small allowance for the discretization error and for
starting at N(0, σ_max²) instead of p_{σ_max} (a mean bias of about μ·s/σ_max).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vdmpp.samplers import ddpm, edm_stochastic, karras_sigmas, sigmas_from_schedule
from vdmpp.schedules import Cosine

F64 = torch.float64
N_SAMPLES = 100_000


@pytest.fixture(autouse=True)
def _one_thread():
    """Elementwise ops on 10⁵ doubles gain nothing from threads, and on a shared CPU the
    intra-op thread barrier can cost 10× (measured); run these tests single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gaussian_denoiser(mu, s):
    def D(x, sigma):
        return mu + s**2 / (s**2 + sigma.reshape(-1, 1) ** 2) * (x - mu)

    return D


def mixture2_denoiser(weights, means, stds):
    """Exact D for a two-component 1-D mixture (all rows share σ, as in every sampler call)."""
    (p1, p2), (m1, m2), (s1, s2) = weights, means, stds

    def D(x, sigma):
        sg2 = sigma[0].item() ** 2
        v1, v2 = s1**2 + sg2, s2**2 + sg2
        logit = math.log(p1 / p2) - 0.5 * math.log(v1 / v2)
        w1 = torch.sigmoid(logit - 0.5 * ((x - m1) ** 2 / v1 - (x - m2) ** 2 / v2))
        d1, d2 = m1 + s1**2 / v1 * (x - m1), m2 + s2**2 / v2 * (x - m2)
        return d2 + w1 * (d1 - d2)

    return D


def _phi(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def _draw(sampler, D, seed):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(N_SAMPLES, 1, generator=g, dtype=F64)
    return sampler(D, noise, g).squeeze(1)


# --- Gaussian data: the finite-N law is known exactly -------------------------------------------
# With D linear, every step maps the centred iterate y = x − μ to a·y + b·ξ, so Var(x₀) follows
# V ← a²V + b² from V = σ₀². These recursions are the samplers' own maths, transcribed from
# Alg. 2 and eq. 28; they show the empirical law is the algorithm's, and that the algorithm's
# law tends to N(μ, s²) as N grows (both samplers are first order in distribution).
MU, S = 0.3, 0.5


def edm_variance(ts, churn, s_tmin=0.0, s_tmax=math.inf):
    n, v = len(ts) - 1, ts[0] ** 2
    for i in range(n):
        t, tn = ts[i], ts[i + 1]
        gamma = min(churn / n, math.sqrt(2) - 1) if s_tmin <= t <= s_tmax else 0.0
        th = t + gamma * t
        v += th**2 - t**2
        d = (1 - S**2 / (S**2 + th**2)) / th  # d = d·y for y = x̂ − μ
        a = 1 + (tn - th) * d
        if tn > 0:
            a = 1 + (tn - th) * (0.5 * d + 0.5 * a * (1 - S**2 / (S**2 + tn**2)) / tn)
        v *= a * a
    return v


def ddpm_variance(ts):
    v = ts[0] ** 2
    for t, tn in itertools.pairwise(ts):
        keep = tn**2 / t**2
        v = (keep + (1 - keep) * S**2 / (S**2 + t**2)) ** 2 * v + (1 - keep) * tn**2
    return v


GAUSS = {
    "edm_stochastic": (
        lambda D, noise, g: edm_stochastic(
            D, noise, karras_sigmas(32), churn=40, s_tmin=0.05, s_tmax=50, generator=g
        ),
        lambda n: edm_variance(karras_sigmas(n).tolist(), 40, 0.05, 50),
    ),
    "edm_stochastic_full_churn": (
        lambda D, noise, g: edm_stochastic(D, noise, karras_sigmas(32), churn=1e3, generator=g),
        lambda n: edm_variance(karras_sigmas(n).tolist(), 1e3),
    ),
    "ddpm": (
        lambda D, noise, g: ddpm(D, noise, sigmas_from_schedule(Cosine(), 128), generator=g),
        lambda n: ddpm_variance(sigmas_from_schedule(Cosine(), 4 * n).tolist()),
    ),
}


@pytest.mark.parametrize("name", GAUSS)
def test_gaussian_law(name):
    sampler, predicted_var = GAUSS[name]
    x = _draw(sampler, gaussian_denoiser(MU, S), seed=1)
    v = predicted_var(32)
    se_mean, se_var = math.sqrt(v / N_SAMPLES), v * math.sqrt(2 / N_SAMPLES)
    assert abs(x.mean().item() - MU) < 4 * se_mean + 0.003  # + μ·s/σ_max from the start
    assert abs(x.var().item() - v) < 4 * se_var
    # the sampler's law converges to the data's
    errs = [abs(predicted_var(n) - S**2) for n in (32, 128, 512)]
    assert errs[2] < errs[1] < errs[0] and errs[2] < 0.01 * S**2


# --- a bimodal mixture: mixture weight, mean, variance ------------------------------------------
MIX = dict(weights=(0.3, 0.7), means=(-1.4, 0.6), stds=(0.4, 0.5))
MIX_MEAN = sum(p * m for p, m in zip(MIX["weights"], MIX["means"]))
MIX_VAR = (
    sum(p * (s**2 + m**2) for p, m, s in zip(MIX["weights"], MIX["means"], MIX["stds"]))
    - MIX_MEAN**2
)
THRESH = -0.4  # between the modes: P(x < THRESH) estimates the first weight
MIX_LOW = sum(p * _phi((THRESH - m) / s) for p, m, s in zip(*MIX.values()))

MIXTURE = {
    "edm_stochastic": lambda D, noise, g: edm_stochastic(
        D, noise, karras_sigmas(48), churn=1e3, generator=g
    ),
    "ddpm": lambda D, noise, g: ddpm(D, noise, sigmas_from_schedule(Cosine(), 256), generator=g),
}


@pytest.mark.parametrize("name", MIXTURE)
def test_mixture_weights_mean_and_variance(name):
    x = _draw(MIXTURE[name], mixture2_denoiser(**MIX), seed=2)
    se_mean = math.sqrt(MIX_VAR / N_SAMPLES)
    se_low = math.sqrt(MIX_LOW * (1 - MIX_LOW) / N_SAMPLES)
    assert abs((x < THRESH).double().mean().item() - MIX_LOW) < 4 * se_low + 0.003
    assert abs(x.mean().item() - MIX_MEAN) < 4 * se_mean + 0.005
    assert abs(x.var().item() / MIX_VAR - 1) < 0.04  # includes the O(1/N) bias seen above
