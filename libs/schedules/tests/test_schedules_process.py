"""Forward-process conversions and time samplers."""

from __future__ import annotations

import math

import pytest
import torch

from vdmpp.schedules import (
    logsnr_from_alpha_sigma,
    logsnr_from_sigma,
    low_discrepancy,
    sigma_from_logsnr,
    uniform,
    ve,
    vp,
    vp_transition,
)


def test_vp_against_definition():
    lam = torch.linspace(-12, 12, 97, dtype=torch.float64)
    alpha, sigma = vp(lam)
    assert torch.allclose(alpha**2, 1 / (1 + torch.exp(-lam)))
    assert torch.allclose(alpha**2 + sigma**2, torch.ones_like(lam))
    assert torch.allclose(logsnr_from_alpha_sigma(alpha, sigma), lam)


def test_ve_and_edm_sigma():
    lam = torch.linspace(-12, 12, 97, dtype=torch.float64)
    alpha, sigma = ve(lam)
    assert torch.all(alpha == 1)
    assert torch.allclose(sigma, torch.exp(-lam / 2))
    assert torch.allclose(logsnr_from_sigma(sigma_from_logsnr(lam)), lam)
    # VP and VE share λ: σ_VE = σ_VP/α_VP (EDM eq. 4 scaling).
    a, s = vp(lam)
    assert torch.allclose(s / a, sigma)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stable_at_plus_minus_30(dtype):
    lam = torch.tensor([-30.0, -20.0, 0.0, 20.0, 30.0], dtype=dtype)
    for alpha, sigma in (vp(lam), ve(lam)):
        assert alpha.dtype == dtype and sigma.dtype == dtype
        assert torch.isfinite(alpha).all() and torch.isfinite(sigma).all()
        assert torch.all(sigma > 0) and torch.all(alpha > 0)
    alpha, sigma = vp(lam)
    ref = torch.exp(-0.5 * torch.tensor([30.0, 20.0]))  # small side: α(−30) ≈ e^{−15}
    assert torch.allclose(alpha[:2].double(), ref.double(), rtol=1e-2)
    assert torch.allclose(sigma[-2:].double(), ref.flip(0).double(), rtol=1e-2)
    assert torch.isfinite(logsnr_from_sigma(sigma_from_logsnr(lam))).all()


def test_vp_transition_matches_direct_formula_and_is_stable():
    ls = torch.tensor([5.0, 2.0, -1.0], dtype=torch.float64)
    lt = torch.tensor([4.0, -3.0, -1.5], dtype=torch.float64)
    a_s, s_s = vp(ls)
    a_t, s_t = vp(lt)
    alpha_ts, sigma2_ts = vp_transition(ls, lt)
    assert torch.allclose(alpha_ts, a_t / a_s)
    assert torch.allclose(sigma2_ts, s_t**2 - (a_t / a_s) ** 2 * s_s**2)
    # Nearby high-SNR steps in float32: the naive σ²_t − α²σ²_s cancels, expm1 form does not.
    ls32 = torch.tensor([20.0])
    lt32 = torch.tensor([19.99])
    _, s2 = vp_transition(ls32, lt32)
    exact = -math.expm1(math.log1p(math.exp(-20.0)) - math.log1p(math.exp(-19.99)))
    assert s2.item() == pytest.approx(exact, rel=1e-3)


def test_low_discrepancy_strata_and_marginal():
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 64, 1000):
        t = low_discrepancy(n, generator=g, dtype=torch.float64)
        assert t.shape == (n,) and torch.all((t >= 0) & (t < 1))
        strata = torch.floor(t * n).long().sort().values
        assert torch.equal(strata, torch.arange(n))
    # Marginal of one coordinate over many batches: U[0, 1) (KS statistic vs uniform).
    first = torch.stack(
        [low_discrepancy(5, generator=g, dtype=torch.float64)[3] for _ in range(4000)]
    )
    x = first.sort().values
    ecdf = torch.arange(1, x.numel() + 1, dtype=torch.float64) / x.numel()
    ks = (ecdf - x).abs().max().item()
    assert ks < 1.63 / math.sqrt(x.numel())  # 99 % critical value


def test_uniform_and_generators_reproducible():
    a = uniform(10, generator=torch.Generator().manual_seed(3))
    b = uniform(10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.all((a >= 0) & (a < 1))
    c = low_discrepancy(10, generator=torch.Generator().manual_seed(3))
    d = low_discrepancy(10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(c, d)
    assert low_discrepancy(0).numel() == 0
    with pytest.raises(ValueError):
        uniform(-1)


def test_edm_coefficients_logsnr_match_table1():
    """EDM Table 1 written in σ, evaluated at σ = e^{−λ/2}; finite in float32 at |λ| = 30."""
    from vdmpp.schedules import edm_coefficients_logsnr

    lam = torch.linspace(-12, 12, 49, dtype=torch.float64)
    s, d = torch.exp(-lam / 2), 0.5
    c_skip, c_out, c_in, c_noise = edm_coefficients_logsnr(lam, d)
    assert torch.allclose(c_skip, d**2 / (s**2 + d**2))
    assert torch.allclose(c_out, s * d / torch.sqrt(s**2 + d**2))
    assert torch.allclose(c_in, 1 / torch.sqrt(s**2 + d**2))
    assert torch.allclose(c_noise, 0.25 * torch.log(s))
    for c in edm_coefficients_logsnr(torch.tensor([-30.0, 30.0]), d):
        assert torch.isfinite(c).all()
