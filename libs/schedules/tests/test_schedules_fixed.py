"""Closed-form schedules (VDM++ Table 4, EDM Table 1): λ, t and p must agree."""

from __future__ import annotations

import math

import pytest
import torch

from vdmpp.schedules import (
    Cosine,
    EDMSampling,
    EDMTraining,
    FlowOT,
    LinearLogSNR,
    LinearVP,
    NoiseSchedule,
    TruncatedSchedule,
)

SCHEDULES = {
    "cosine": lambda: Cosine(),
    "cosine_shift": lambda: Cosine.for_resolution(256),
    "edm_training": lambda: EDMTraining(),
    "edm_sampling": lambda: EDMSampling(),
    "flow_ot": lambda: FlowOT(),
    "linear_vp": lambda: LinearVP(),
    "linear_vp_wide": lambda: LinearVP(logsnr_min=-20, logsnr_max=20),
    "cosine_narrow": lambda: Cosine(logsnr_min=-5, logsnr_max=7),
    "linear_logsnr": lambda: LinearLogSNR(logsnr_min=-7, logsnr_max=11),
}


@pytest.fixture(params=sorted(SCHEDULES))
def schedule(request) -> TruncatedSchedule:
    return SCHEDULES[request.param]()


def test_protocol(schedule):
    assert isinstance(schedule, NoiseSchedule)


def test_inverse_roundtrip_float64(schedule):
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)
    assert torch.allclose(schedule.t(schedule.logsnr(t)), t, atol=1e-6, rtol=0)
    lam = torch.linspace(schedule.logsnr_min, schedule.logsnr_max, 2001, dtype=torch.float64)
    # λ → t → λ is only well conditioned where dλ/dt = −1/p(λ) does not amplify float64
    # rounding of t (≈1e-16) beyond 1e-6: EDM training's Gaussian tails at |λ − 2.4| > 17
    # put t within 1e-16 of 0 or 1.
    ok = schedule.pdf(lam) > 1e-9
    assert ok.float().mean() > 0.5
    back = schedule.logsnr(schedule.t(lam))
    assert torch.allclose(back[ok], lam[ok], atol=1e-6, rtol=1e-9)


def test_pdf_is_minus_dt_dlogsnr(schedule):
    lo, hi = schedule.logsnr_min, schedule.logsnr_max
    lam = torch.linspace(lo + 1e-3, hi - 1e-3, 501, dtype=torch.float64)
    h = 1e-5
    fd = -(schedule.t(lam + h) - schedule.t(lam - h)) / (2 * h)
    assert torch.allclose(schedule.pdf(lam), fd, rtol=1e-6, atol=1e-9)


def test_pdf_integrates_to_one_and_vanishes_outside(schedule):
    lo, hi = schedule.logsnr_min, schedule.logsnr_max
    lam = torch.linspace(lo, hi, 400_001, dtype=torch.float64)
    assert torch.trapezoid(schedule.pdf(lam), lam).item() == pytest.approx(1.0, abs=1e-6)
    outside = torch.tensor([lo - 1.0, hi + 1.0, lo - 1e-9, hi + 1e-9], dtype=torch.float64)
    assert torch.all(schedule.pdf(outside) == 0)


def test_strictly_decreasing_with_exact_endpoints(schedule):
    t = torch.linspace(0, 1, 10_001, dtype=torch.float64)
    lam = schedule.logsnr(t)
    assert torch.all(lam[1:] < lam[:-1])
    ends = schedule.logsnr(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert ends.tolist() == pytest.approx([schedule.logsnr_max, schedule.logsnr_min], abs=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_in_low_precision(schedule, dtype):
    t = torch.tensor([0.0, 1e-7, 1e-3, 0.5, 1 - 1e-3, 1 - 1e-7, 1.0], dtype=dtype)
    lam = schedule.logsnr(t)
    assert lam.dtype == dtype and torch.isfinite(lam).all()
    tol = 0.05 if dtype == torch.float32 else 0.2  # bf16 has 8 mantissa bits
    assert float(lam[0]) == pytest.approx(schedule.logsnr_max, abs=tol)
    assert float(lam[-1]) == pytest.approx(schedule.logsnr_min, abs=tol)
    grid = torch.linspace(-30, 30, 121, dtype=dtype)
    assert torch.isfinite(schedule.t(grid)).all() and torch.isfinite(schedule.pdf(grid)).all()
    assert torch.all(schedule.pdf(grid) >= 0)


def test_float32_close_to_float64(schedule):
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    lam64 = schedule.logsnr(t)
    lam32 = schedule.logsnr(t.float()).double()
    assert (lam32 - lam64).abs().max().item() < 1e-2


def test_edm_training_peaks_at_2_4_and_is_lognormal_sigma():
    s = EDMTraining()
    lam = torch.linspace(-20, 20, 400_001, dtype=torch.float64)
    assert lam[s.pdf(lam).argmax()].item() == pytest.approx(2.4, abs=1e-3)
    # λ = −2 ln σ with ln σ ~ N(−1.2, 1.2²): P(λ ≤ 2.4 + 2.4) = Φ(1) (untruncated mass ≈ 1).
    cdf_at = 1 - s.t(torch.tensor([4.8], dtype=torch.float64)).item()
    assert cdf_at == pytest.approx(0.5 * math.erfc(-1 / math.sqrt(2)), abs=1e-6)
    # Median of t ~ U[0, 1] maps to the mean of the (symmetric) normal.
    assert s.logsnr(torch.tensor([0.5], dtype=torch.float64)).item() == pytest.approx(2.4, abs=1e-4)


def test_shifted_cosine_is_moved_by_two_log_ratio():
    for d in (32, 128, 512):
        shift = 2 * math.log(64 / d)
        shifted = Cosine.for_resolution(d, logsnr_min=-20 + shift, logsnr_max=20 + shift)
        base = Cosine()
        t = torch.linspace(0, 1, 101, dtype=torch.float64)
        assert torch.allclose(shifted.logsnr(t), base.logsnr(t) + shift, atol=1e-9)
        lam = torch.linspace(-19, 19, 101, dtype=torch.float64)
        assert torch.allclose(shifted.pdf(lam + shift), base.pdf(lam), atol=1e-12)
    # The untruncated maps (Table 4 with the corrected sign): t = (2/π) arctan(e^{−λ/2 + s}).
    s = Cosine.for_resolution(128)
    lam = torch.tensor([-3.0, 0.0, 4.0], dtype=torch.float64)
    expected = (2 / math.pi) * torch.atan(torch.exp(-lam / 2 + math.log(64 / 128)))
    assert torch.allclose(s._t(lam), expected)


def test_table4_closed_forms_untruncated():
    lam = torch.tensor([-6.0, -1.0, 0.5, 3.0], dtype=torch.float64)
    c = Cosine()
    assert torch.allclose(c._pdf(lam), 1 / torch.cosh(lam / 2) / (2 * math.pi))
    f = FlowOT()
    assert torch.allclose(f._pdf(lam), 1 / torch.cosh(lam / 4) ** 2 / 8)
    assert torch.allclose(f._t(lam), 1 / (1 + torch.exp(lam / 2)))
    e = EDMSampling()
    a, b = 0.002 ** (1 / 7), 80 ** (1 / 7)
    u = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    sigma = (a + u * (b - a)) ** 7
    assert torch.allclose(e.logsnr(u), -2 * torch.log(sigma))
    lin = LinearLogSNR(logsnr_min=-7, logsnr_max=11)
    assert torch.allclose(lin.logsnr(u), 11 - 18 * u)
    assert torch.allclose(lin.pdf(lam), torch.full_like(lam, 1 / 18))
    v = LinearVP()
    tt = torch.tensor([1e-3, 0.2, 1.0], dtype=torch.float64)
    sigma_vp = torch.sqrt(torch.exp(0.5 * 19.9 * tt**2 + 0.1 * tt) - 1)  # EDM Table 1
    assert torch.allclose(v._logsnr(tt, 1 - tt), -2 * torch.log(sigma_vp))


@pytest.mark.parametrize(
    "make",
    [
        lambda: Cosine(logsnr_min=3, logsnr_max=3),
        lambda: Cosine(logsnr_min=5, logsnr_max=-5),
        lambda: FlowOT(logsnr_min=float("nan")),
        lambda: EDMTraining(p_std=0),
        lambda: EDMSampling(sigma_min=1, sigma_max=0.5),
        lambda: Cosine.for_resolution(0),
    ],
)
def test_bad_construction(make):
    with pytest.raises(ValueError):
        make()


def test_t_outside_unit_interval_rejected():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Cosine().logsnr(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError):
        Cosine().logsnr(torch.tensor([float("nan")]))


def test_logsnr_pdf_matches_separate_calls(schedule):
    t = torch.rand(64, dtype=torch.float64)
    lam, p = schedule.logsnr_pdf(t)
    assert torch.equal(lam, schedule.logsnr(t)) and torch.equal(p, schedule.pdf(lam))
