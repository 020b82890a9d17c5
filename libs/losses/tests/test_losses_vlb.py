"""VDM's bound (VDM App. E, VDM Sec. 3–4): terms vs closed forms, toy models with known
answers, discrete ≥ continuous and decreasing in T, bits_per_dim, bad input."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import special

from vdmpp.losses import VLBTerms, bits_per_dim
from vdmpp.losses import vlb as V
from vdmpp.schedules import Cosine, Learned, LinearVP

DT = torch.float64


def grid_data(n, d, bits=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, 2**bits, (n, d), generator=g)
    return -1.0 + 2.0 * k.to(DT) / (2**bits - 1)


# --- prior and reconstruction -----------------------------------------------------------
@pytest.mark.parametrize("process", ["vp", "ve"])
@pytest.mark.parametrize("lam_min", [-12.0, -3.0, 2.0])
def test_prior_kl_matches_gaussian_kl(process, lam_min):
    x = grid_data(5, 7)
    lam = torch.tensor(lam_min, dtype=DT)
    if process == "vp":
        a, s = torch.sqrt(torch.sigmoid(lam)), torch.sqrt(torch.sigmoid(-lam))
        q = torch.distributions.Normal(a * x, s)
        p = torch.distributions.Normal(torch.zeros_like(x), torch.ones_like(x))
    else:
        s = torch.exp(-lam / 2)
        q = torch.distributions.Normal(x, s)
        p = torch.distributions.Normal(torch.zeros_like(x), s)
    want = torch.distributions.kl_divergence(q, p).sum(1)
    got = V.prior_kl(x, lam_min, process=process)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def recon_reference(x, noise, lam_max, bits):
    """−Σ log [N(z̃; x, s²)/Σ_k N(z̃; v_k, s²)] over the full grid, in numpy."""
    s = math.exp(-lam_max / 2)
    v = -1.0 + 2.0 * np.arange(2**bits) / (2**bits - 1)
    zt = x.numpy() + s * noise.numpy()
    logits = -0.5 * ((zt[..., None] - v) / s) ** 2
    log_p = -0.5 * ((zt - x.numpy()) / s) ** 2 - special.logsumexp(logits, axis=-1)
    return -log_p.sum(-1)


@pytest.mark.parametrize("bits", [8, 5, 1])
@pytest.mark.parametrize("lam_max", [13.3, 9.0, 4.0, -2.0])
def test_reconstruction_matches_full_grid_reference(bits, lam_max):
    x = grid_data(6, 10, bits)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=DT)
    got = V.reconstruction_loss(x, lam_max, bits=bits, noise=noise)
    np.testing.assert_allclose(
        got.numpy(), recon_reference(x, noise, lam_max, bits), rtol=1e-9, atol=1e-9
    )


def test_reconstruction_limits():
    x = grid_data(4, 16)
    # high SNR: the decoder is certain, −log p → 0
    assert float(V.reconstruction_loss(x, 20.0, generator=torch.Generator()).max()) < 1e-6
    # no signal: p(x|z) is uniform over the 2ⁿ values → D·n·log 2
    x3 = grid_data(4, 16, bits=3)
    got = V.reconstruction_loss(x3, -30.0, bits=3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        got, torch.full((4,), 16 * 3 * math.log(2), dtype=DT), rtol=1e-6, atol=0
    )


# --- diffusion loss: a model with known error -------------------------------------------
S2 = 0.3  # the error model: ‖x − x̂(λ)‖² = S2/(1 + S2·e^λ)·‖u‖², decreasing in λ


def offset_model(x_true, u):
    """x̂ = x + √(S2/(1 + S2e^λ))·u: 'perfect knowledge' of x plus a λ-dependent error."""

    def model(z, lam, class_labels=None):
        return x_true + torch.sqrt(S2 / (1 + S2 * torch.exp(lam)))[:, None] * u

    return model


def exact_continuous(u, lam_min, lam_max):
    """½∫ e^λ‖x − x̂‖² dλ = ½‖u‖²[log(1 + S2e^λ)] (the Gaussian-data mutual information)."""
    f = lambda lam: math.log1p(S2 * math.exp(lam))
    return 0.5 * float(u.square().sum()) * (f(lam_max) - f(lam_min))


def exact_discrete(u, schedule, steps):
    t = torch.arange(steps + 1, dtype=DT) / steps
    lam = schedule.logsnr(t)
    m = S2 / (1 + S2 * torch.exp(lam[1:])) * float(u.square().sum())
    return float(0.5 * ((torch.exp(lam[:-1]) - torch.exp(lam[1:])) * m).sum())


def gl_t(n=400):
    xg, wg = np.polynomial.legendre.leggauss(n)
    return torch.tensor(0.5 * (xg + 1), dtype=DT), torch.tensor(0.5 * wg, dtype=DT)


def test_continuous_diffusion_loss_by_quadrature():
    sched = Cosine(logsnr_min=-10, logsnr_max=10)
    x_true = grid_data(1, 6)
    u = torch.randn(1, 6, generator=torch.Generator().manual_seed(2), dtype=DT)
    t, w = gl_t()
    x = x_true.expand(t.numel(), -1)
    est = V.diffusion_loss(offset_model(x_true, u), x, sched, parameterization="x", t=t)
    assert float((w * est).sum()) == pytest.approx(exact_continuous(u, -10, 10), rel=1e-6)


def test_model_returning_true_x_has_zero_diffusion_loss():
    sched = Cosine()
    x = grid_data(8, 5)
    for param, process in [("x", "vp"), ("x", "ve")]:
        est = V.diffusion_loss(
            lambda z, lam, c=None: x, x, sched, parameterization=param, process=process
        )
        assert float(est.abs().max()) == 0.0
        est = V.diffusion_loss_discrete(
            lambda z, lam, c=None: x, x, sched, 16, parameterization=param
        )
        assert float(est.abs().max()) == 0.0


def test_discrete_bound_exceeds_continuous_and_decreases_with_steps():
    sched = LinearVP()
    lo, hi = sched.logsnr_min, sched.logsnr_max
    x_true = grid_data(1, 6)
    u = torch.randn(1, 6, generator=torch.Generator().manual_seed(3), dtype=DT)
    cont = exact_continuous(u, lo, hi)
    values = []
    for steps in (1, 2, 4, 16, 64, 256):
        t = (torch.arange(steps, dtype=DT) + 0.5) / steps  # each i = 1 … T once: the exact sum
        x = x_true.expand(steps, -1)
        est = V.diffusion_loss_discrete(
            offset_model(x_true, u), x, sched, steps, parameterization="x", t=t
        )
        value = float(est.mean())
        assert value == pytest.approx(exact_discrete(u, sched, steps), rel=1e-9)
        values.append(value)
    assert all(v >= cont for v in values)
    assert all(a > b for a, b in itertools.pairwise(values))
    assert values[-1] - cont < 0.5 * (values[0] - cont)
    # the Riemann sum converges to L_∞ (closed form, T = 2¹⁸)
    assert exact_discrete(u, sched, 2**18) == pytest.approx(cont, rel=1e-3)


def test_gaussian_data_with_optimal_denoiser():
    """x ∼ N(0, s²I): the posterior mean is linear and E[L_∞] = ½D[log(1 + s²e^λ)]_{λmin}^{λmax}."""
    s2, n, d = 0.3, 512, 32
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, d, generator=g, dtype=DT) * math.sqrt(s2)

    def optimal_eps(z, lam, class_labels=None):  # VP: x̂ = αs²/(α²s² + σ²)·z, ε̂ = (z − αx̂)/σ
        a2, sg2 = torch.sigmoid(lam)[:, None], torch.sigmoid(-lam)[:, None]
        x_hat = torch.sqrt(a2) * s2 / (a2 * s2 + sg2) * z
        return (z - torch.sqrt(a2) * x_hat) / torch.sqrt(sg2)

    sched = Cosine(logsnr_min=-8, logsnr_max=8)
    est = V.diffusion_loss(optimal_eps, x, sched, generator=g)
    exact = 0.5 * d * (math.log1p(s2 * math.exp(8)) - math.log1p(s2 * math.exp(-8)))
    se = float(est.std()) / math.sqrt(n)
    assert abs(float(est.mean()) - exact) < 4 * se, (float(est.mean()), exact, se)


# --- bits per dim -----------------------------------------------------------------------
def test_bits_per_dim_components_and_perfect_model():
    sched = Cosine(logsnr_min=-10, logsnr_max=12)
    x = grid_data(16, 12)
    g = torch.Generator().manual_seed(5)
    out = bits_per_dim(lambda z, lam, c=None: x, x, sched, parameterization="x", generator=g)
    assert isinstance(out, VLBTerms)
    for v in out:
        assert v.shape == (16,) and torch.isfinite(v).all()
    torch.testing.assert_close(out.total, out.prior + out.reconstruction + out.diffusion)
    assert float(out.diffusion.abs().max()) == 0.0
    prior = V.prior_kl(x, -10.0) / (12 * math.log(2))
    torch.testing.assert_close(out.prior, prior)
    assert (out.reconstruction >= 0).all()
    # the same call through the discrete-time bound
    out_t = bits_per_dim(
        lambda z, lam, c=None: x, x, sched, steps=10, parameterization="x", generator=g
    )
    assert float(out_t.diffusion.abs().max()) == 0.0


def test_bits_per_dim_nats_conversion_and_standard_error():
    sched = Cosine(logsnr_min=-10, logsnr_max=10)
    x = grid_data(64, 8)
    u = torch.randn(1, 8, generator=torch.Generator().manual_seed(6), dtype=DT)
    model = lambda z, lam, c=None: x + torch.sqrt(S2 / (1 + S2 * torch.exp(lam)))[:, None] * u
    out = bits_per_dim(
        model, x, sched, parameterization="x", generator=torch.Generator().manual_seed(7)
    )
    exact_bpd = exact_continuous(u, -10, 10) / (8 * math.log(2))
    se = float(out.diffusion.std()) / 8
    assert abs(float(out.diffusion.mean()) - exact_bpd) < 4 * se + 1e-12


def test_bits_per_dim_with_learned_schedule_and_grad():
    sched = Learned(hidden=8)
    net = torch.nn.Linear(5, 4)
    model = lambda z, lam, c=None: net(torch.cat([z, lam[:, None] / 10], 1))
    x = grid_data(8, 4).float()
    out = bits_per_dim(model, x, sched, generator=torch.Generator().manual_seed(0))
    out.total.mean().backward()  # Learned needs report_loss: the bound goes through WeightedLoss
    assert net.weight.grad is not None and sched.ends.grad is not None
    with torch.no_grad():
        assert torch.isfinite(bits_per_dim(model, x, sched, steps=100).total).all()


def test_vlb_bad_inputs():
    sched, x = Cosine(), grid_data(2, 3)
    model = lambda z, lam, c=None: z
    with pytest.raises(ValueError, match="8-bit values on the grid"):
        V.reconstruction_loss(x + 1e-3, 10.0)
    with pytest.raises(ValueError, match="bits must be"):
        V.reconstruction_loss(x, 10.0, bits=0)
    with pytest.raises(ValueError, match="noise must have"):
        V.reconstruction_loss(x, 10.0, noise=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="steps must be"):
        V.diffusion_loss_discrete(model, x, sched, 0)
    with pytest.raises(ValueError, match=r"t must have shape \[2\]"):
        V.diffusion_loss_discrete(model, x, sched, 4, t=torch.rand(3))
    with pytest.raises(ValueError, match="unknown process"):
        V.prior_kl(x, -10.0, process="flow")
    with pytest.raises(ValueError, match="unknown parameterization"):
        bits_per_dim(model, x, sched, parameterization="F")
    with pytest.raises(ValueError, match="model output must have"):
        bits_per_dim(lambda z, lam, c=None: z[:, :1], x, sched)
