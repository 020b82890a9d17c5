"""Weightings vs independent formulas (VDM++ Table 1, App. D, I); monotonicity; float32."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from vdmpp.losses import weightings as W
from vdmpp.schedules import Cosine

GRID = np.linspace(-30.0, 30.0, 6001)


def edm_ref(lam, p_mean=-1.2, p_std=1.2, sd=0.5):
    """EDM's loss written in σ (EDM): density of λ times λ(σ)·σ², with σ² = e^{−λ}."""
    sigma2 = np.exp(-lam)
    p_lam = stats.norm.pdf(lam, loc=-2 * p_mean, scale=2 * p_std)
    loss_weight = (sigma2 + sd**2) / (sigma2 * sd**2)
    return p_lam * loss_weight * sigma2


REFERENCES = {
    "elbo": (W.ELBO(), lambda lam: np.ones_like(lam)),
    "iddpm": (W.IDDPM(), lambda lam: 1.0 / np.cosh(lam / 2)),
    "edm": (W.EDM(), edm_ref),
    "vprediction": (W.VPrediction(), lambda lam: np.exp(-lam / 2)),
    # eq. 86 before simplification: 2·(sech²(λ/4)/8)·(1 + e^{−λ/2})²
    "flowot": (
        W.FlowOT(),
        lambda lam: 2 * (1 / np.cosh(lam / 4)) ** 2 / 8 * (1 + np.exp(-lam / 2)) ** 2,
    ),
    "indi": (W.InDI(), lambda lam: np.exp(-lam) / np.cosh(lam / 4) ** 2),
    "p2": (W.P2(gamma=0.5), lambda lam: (1 / np.cosh(lam / 2)) / (1 + np.exp(lam)) ** 0.5),
    "p2_g1": (W.P2(), lambda lam: (1 / np.cosh(lam / 2)) / (1 + np.exp(lam))),
    "minsnr": (W.MinSNR(5.0), lambda lam: np.minimum(1, 5 * np.exp(-lam)) / np.cosh(lam / 2)),
    "sigmoid": (W.Sigmoid(), lambda lam: special.expit(-lam + 2.0)),
    "sigmoid_b": (W.Sigmoid(bias=-1.0), lambda lam: 1 / (1 + np.exp(lam + 1.0))),
    "lowbit": (W.LowBit(), lambda lam: stats.norm.cdf(-2 * (lam - 8.4))),
}


@pytest.mark.parametrize("key", sorted(REFERENCES))
def test_weighting_matches_independent_formula_up_to_constant(key):
    weighting, ref = REFERENCES[key]
    lam = np.linspace(-25.0, 25.0, 501)
    got = weighting(torch.tensor(lam, dtype=torch.float64)).numpy()
    want = ref(lam)
    ok = want > 1e-250  # compare where the reference is representable
    ratio = got[ok] / want[ok]
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-9)


def test_flowot_and_vprediction_constants():
    # eq. 86–87: the FM-OT weighting is e^{−λ/2} with constant exactly 1.
    lam = np.linspace(-10, 10, 11)
    np.testing.assert_allclose(REFERENCES["flowot"][1](lam), np.exp(-lam / 2), rtol=1e-12)
    # eq. 55–57 with the cosine p = sech(λ/2)/(2π): (e^{−λ}+1)p = e^{−λ/2}/π.
    p = 1 / np.cosh(lam / 2) / (2 * np.pi)
    np.testing.assert_allclose((np.exp(-lam) + 1) * p, np.exp(-lam / 2) / np.pi, rtol=1e-12)


def test_edm_monotonic_is_edm_right_of_peak_and_flat_left():
    w, edm = W.EDMMonotonic(), W.EDM()
    lam = torch.tensor(GRID)
    we, wm = edm(lam), w(lam)
    right = lam >= w.peak_logsnr
    torch.testing.assert_close(wm[right], we[right], rtol=1e-12, atol=0)
    assert torch.allclose(wm[~right], we.max().expand_as(wm[~right]), rtol=1e-6)
    # the peak is where d/dλ log w̃ = 0, checked by central differences
    h = 1e-5
    lp = edm.log_weight(torch.tensor([w.peak_logsnr - h, w.peak_logsnr + h], dtype=torch.float64))
    assert abs(float(lp[1] - lp[0]) / (2 * h)) < 1e-6
    assert we.max() <= wm.max() <= we.max() * (1 + 1e-6)  # the plateau is the true maximum


@pytest.mark.parametrize("name", W.names())
def test_monotonic_flag_matches_numerical_check(name):
    w = W.get(name)
    lam = torch.tensor(GRID)
    val = w.log_weight(lam)
    finite = torch.isfinite(val)
    d = torch.diff(val[finite])
    nonincreasing = bool((d <= 1e-9).all())
    assert w.monotonic == nonincreasing, (name, float(d.max()))


@pytest.mark.parametrize("name", W.names())
@pytest.mark.parametrize("shift", [0.0, math.log(64 / 512)])
def test_float32_finite_and_nonnegative(name, shift):
    w = W.get(name, shift=shift)
    lam = torch.linspace(-30, 30, 10001, dtype=torch.float32)
    val = w(lam)
    assert val.dtype == torch.float32
    assert torch.isfinite(val).all() and (val >= 0).all()
    assert not torch.isnan(w.log_weight(lam)).any()
    lo, hi = w.logsnr_range
    assert lo <= -30 and hi >= 30
    # half precision is computed in float32 and cast back
    assert torch.isfinite(w(torch.linspace(-10, 10, 101, dtype=torch.bfloat16))).all()


@pytest.mark.parametrize("name", W.names())
def test_float32_agrees_with_float64(name):
    w = W.get(name)
    lam64 = torch.linspace(-30, 30, 2001, dtype=torch.float64)
    lam32 = lam64.float()
    l64 = w.log_weight(lam32.double())
    l32 = w.log_weight(lam32).double()
    ok = l64 > -80  # below, float32 w underflows to 0 anyway
    torch.testing.assert_close(l32[ok], l64[ok], atol=2e-5 * 30, rtol=1e-5)


@pytest.mark.parametrize("name", W.names())
def test_shift_moves_the_weighting_by_2s(name):
    s = -0.9
    w0, ws = W.get(name), W.get(name, shift=s)
    lam = torch.linspace(-20, 20, 401, dtype=torch.float64)
    torch.testing.assert_close(ws(lam), w0(lam - 2 * s))
    assert ws.monotonic == w0.monotonic


def test_shifted_iddpm_matches_shifted_cosine_density():
    sched = Cosine.for_resolution(256)
    w = W.IDDPM.for_resolution(256)
    lam = torch.linspace(-15, 15, 61, dtype=torch.float64)
    ratio = w(lam) / sched.pdf(lam)
    torch.testing.assert_close(ratio, ratio[0].expand_as(ratio))
    assert w.shift == pytest.approx(math.log(64 / 256))


def test_get_names_aliases_and_kwargs():
    assert W.get("Min-SNR") == W.MinSNR()
    assert W.get("edm_monotonic") == W.EDMMonotonic()
    assert W.get("v") == W.VPrediction()
    assert W.get("sigmoid", bias=1.0).bias == 1.0
    assert W.get("p2", gamma=0.5) != W.P2(gamma=1.0)
    assert isinstance(W.get("LOW_BIT"), W.LowBit)
    assert len({W.get(n) for n in W.names()}) == len(W.names())  # hashable, distinct
    assert repr(W.Sigmoid(shift=-1.0)) == "Sigmoid(bias=2.0, shift=-1.0)"


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown weighting 'edn'"):
        W.get("edn")
    with pytest.raises(TypeError, match="weighting 'sigmoid'"):
        W.get("sigmoid", gamma=1.0)
    with pytest.raises(TypeError):
        W.get(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        W.P2(gamma=-1)
    with pytest.raises(ValueError):
        W.MinSNR(gamma=0)
    with pytest.raises(ValueError):
        W.EDM(sigma_data=0)
    with pytest.raises(ValueError):
        W.Sigmoid(shift=float("nan"))
    with pytest.raises(ValueError):
        W.VPrediction.for_resolution(0)


def test_python_scalars_and_int_tensors_are_accepted():
    w = W.Sigmoid()
    assert float(w(0.0)) == pytest.approx(special.expit(2.0))
    assert w(torch.tensor([0, 1])).dtype == torch.get_default_dtype()
