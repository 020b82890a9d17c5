"""Parameterization conversions (VDM++ App. E.2, D.2, D.3; EDM Table 1): round trips,
independent formulas for every target, and the ε-error relations eq. 122–126."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vdmpp.losses import parameterizations as P

NAMES = P.NAMES
SD = 0.5


def _data(dtype=torch.float64, lam_range=(-10.0, 10.0), n=64, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    eps = torch.randn(n, d, generator=g, dtype=dtype)
    lam = torch.linspace(*lam_range, n, dtype=dtype)
    return x, eps, lam


def _alpha_sigma_ref(lam, process):
    lam = lam.double()
    if process == "vp":
        return torch.sqrt(torch.sigmoid(lam)), torch.sqrt(torch.sigmoid(-lam))
    return torch.ones_like(lam), torch.exp(-lam / 2)


def _target_ref(name, x, eps, lam, process):
    """Each target from its paper definition, written independently of the library."""
    a, s = (v[:, None] for v in _alpha_sigma_ref(lam, process))
    if name == "eps":
        return eps
    if name == "x":
        return x
    if name == "v":  # VDM++ eq. 49
        return a * eps - s * x
    if name == "score":  # eq. 117: ∇ log q(z|x) = −(z − αx)/σ²
        z = a * x + s * eps
        return -(z - a * x) / s**2
    if name == "flow":  # eq. 72
        return x - eps
    # EDM (Table 1) in VE units: x = c_skip·z_ve + c_out·F
    sig = torch.exp(-lam.double() / 2)[:, None]
    z_ve = x + sig * eps
    c_skip = SD**2 / (sig**2 + SD**2)
    c_out = sig * SD / torch.sqrt(sig**2 + SD**2)
    return (x - c_skip * z_ve) / c_out


@pytest.mark.parametrize("process", P.PROCESSES)
@pytest.mark.parametrize("name", NAMES)
def test_target_matches_paper_definition(name, process):
    x, eps, lam = _data()
    got = P.target(name, x, eps, lam, process=process, sigma_data=SD)
    torch.testing.assert_close(got, _target_ref(name, x, eps, lam, process))


@pytest.mark.parametrize("process", P.PROCESSES)
def test_convert_all_pairs_is_exact(process):
    x, eps, lam = _data()
    a, s = _alpha_sigma_ref(lam, process)
    z = a[:, None] * x + s[:, None] * eps
    for src, dst in itertools.product(NAMES, NAMES):
        y_src = P.target(src, x, eps, lam, process=process)
        y_dst = P.target(dst, x, eps, lam, process=process)
        got = P.convert(y_src, src, dst, z, lam, process=process)
        tol = 1e-9 * float(y_dst.abs().max())
        torch.testing.assert_close(got, y_dst, rtol=1e-9, atol=tol, msg=f"{src}->{dst}")
        back = P.convert(got, dst, src, z, lam, process=process)
        tol = 1e-8 * float(y_src.abs().max())
        torch.testing.assert_close(back, y_src, rtol=1e-8, atol=tol, msg=f"{src}->{dst}->{src}")


@pytest.mark.parametrize("process", P.PROCESSES)
def test_round_trip_float32(process):
    x, eps, lam = _data(torch.float32, (-6.0, 6.0))
    a, s = P.alpha_sigma(lam[:, None], process)
    z = a * x + s * eps
    for src, dst in itertools.permutations(NAMES, 2):
        y = P.target(src, x, eps, lam, process=process)
        mid = P.convert(y, src, dst, z, lam, process=process)
        back = P.convert(mid, dst, src, z, lam, process=process)
        tol = 2e-4 * float(y.abs().max())
        torch.testing.assert_close(back, y, rtol=2e-4, atol=tol, msg=f"{src}<->{dst}")


def test_to_eps_and_to_x_helpers():
    x, eps, lam = _data()
    a, s = P.alpha_sigma(lam[:, None])
    z = a * x + s * eps
    v = P.target("v", x, eps, lam)
    torch.testing.assert_close(P.to_eps(v, "v", z, lam), eps)
    torch.testing.assert_close(P.to_x(v, "v", z, lam), x)
    # a scalar λ broadcasts over the batch
    lam0 = torch.tensor(1.5, dtype=torch.float64)
    a0, s0 = P.alpha_sigma(lam0)
    z0 = a0 * x + s0 * eps
    torch.testing.assert_close(P.to_x(P.target("flow", x, eps, lam0), "flow", z0, lam0), x)


def _sq_ref(name, lam, process):
    """‖ε − ε̂‖² / ‖y − ŷ‖² from VDM++ eq. 122–126 and eq. 78."""
    lam = lam.double()
    a2 = torch.sigmoid(lam) if process == "vp" else torch.ones_like(lam)
    if name == "eps":
        return torch.ones_like(lam)
    if name == "x":
        return torch.exp(lam)  # eq. 122
    if name == "score":
        return torch.sigmoid(-lam) if process == "vp" else torch.exp(-lam)  # eq. 123: σ²
    if name == "v":
        return 1.0 / (a2 * (torch.exp(-lam) + 1.0) ** 2)  # eq. 124 (VP: eq. 125)
    if name == "edm":
        return 1.0 / (torch.exp(-lam) / SD**2 + 1.0)  # eq. 126
    return 1.0 / (1.0 + torch.exp(-lam / 2)) ** 2  # flow, eq. 78


@pytest.mark.parametrize("process", P.PROCESSES)
@pytest.mark.parametrize("name", NAMES)
def test_eps_error_relations(name, process):
    x, eps, lam = _data()
    g = torch.Generator().manual_seed(1)
    x_hat = x + 0.3 * torch.randn(x.shape, generator=g, dtype=x.dtype)
    a, s = P.alpha_sigma(lam[:, None], process)
    z = a * x + s * eps
    eps_hat = (z - a * x_hat) / s  # a prediction consistent with z
    y = P.target(name, x, eps, lam, process=process)
    y_hat = P.target(name, x_hat, eps_hat, lam, process=process)
    c = P.eps_scale(name, lam, process=process)
    torch.testing.assert_close(c[:, None] * (y - y_hat), eps - eps_hat, rtol=1e-7, atol=1e-7)
    ratio = (eps - eps_hat).square().sum(1) / (y - y_hat).square().sum(1)
    torch.testing.assert_close(ratio, _sq_ref(name, lam, process), rtol=1e-7, atol=0)
    if name == "v" and process == "vp":  # eq. 53: ‖v − v̂‖² = (e^λ + 1)‖x − x̂‖²
        torch.testing.assert_close(
            (y - y_hat).square().sum(1), (torch.exp(lam) + 1) * (x - x_hat).square().sum(1)
        )


def test_edm_coefficients_finite_everywhere_in_float32():
    lam = torch.linspace(-60, 60, 1201)
    a, b = P.coefficients("edm", lam)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    c = P.eps_scale("edm", lam)
    assert torch.isfinite(c).all()
    # F-target at λ = 0 by hand: r = √(1 + σ_d²)
    a0, b0 = P.coefficients("edm", torch.tensor(0.0, dtype=torch.float64))
    r = math.sqrt(1 + SD**2)
    assert float(a0) == pytest.approx(1 / (SD * r)) and float(b0) == pytest.approx(-SD / r)


def test_bad_names_and_shapes_raise():
    x, eps, lam = _data(n=4)
    z = x + eps
    with pytest.raises(ValueError, match="unknown parameterization 'epsilon'"):
        P.convert(x, "epsilon", "x", z, lam)
    with pytest.raises(ValueError, match="unknown parameterization"):
        P.target("F", x, eps, lam)
    with pytest.raises(ValueError, match="unknown process 'sub-vp'"):
        P.convert(x, "eps", "x", z, lam, process="sub-vp")
    with pytest.raises(ValueError, match="same shape"):
        P.convert(x[:2], "eps", "x", z, lam)
    with pytest.raises(ValueError, match=r"logsnr must have shape \[\] or \[batch\]"):
        P.convert(x, "eps", "x", z, lam[:3])
    with pytest.raises(ValueError, match="same shape"):
        P.target("v", x, eps[:, :2], lam)
    with pytest.raises(ValueError, match="sigma_data"):
        P.target("edm", x, eps, lam, sigma_data=-1.0)
