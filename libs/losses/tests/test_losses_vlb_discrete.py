"""VDM's discrete-time bound for a timestep-conditioned model on a DDPM table, vs closed forms.

Closed form. For data prior N(μ, s²) per coordinate, the optimal network at table entry i
(a = √ᾱ_i, b = √(1 − ᾱ_i), σ_i = b/a) predicts x̂(z) = μ + k_i(z/a − μ), k_i = s²/(s² + σ_i²).
For a fixed data point x and z = a x + b ε, z/a = x + σ_i ε, so

    x − x̂ = (1 − k_i)(x − μ) − k_i σ_i ε,   E_ε‖x − x̂‖² = Σ_d [(1 − k_i)²(x_d − μ)² + k_i² σ_i²],

and the diffusion term of VDM's bound (eq. 48–50, written in x-space here; the library works in
ε-space) is L = ½ Σ_{i=1}^{T−1} (SNR_{i−1} − SNR_i) E_ε‖x − x̂(z_i; i)‖², SNR_i = ᾱ_i/(1 − ᾱ_i).
The network below is written from those formulas in numpy (float64), independent of the package.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vdmpp.losses import DiscreteTimeModel, TimestepModel, bits_per_dim, bits_per_dim_discrete
from vdmpp.losses import vlb as V

DT = torch.float64
MU, S = 0.1, 0.4


def linear_table(T: int) -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02 * 1000 / T, T, dtype=DT)  # DDPM's ends, rescaled to T
    return torch.cumprod(1.0 - betas, 0)


def grid_data(n, d, seed=0):
    k = torch.randint(0, 256, (n, d), generator=torch.Generator().manual_seed(seed))
    return -1.0 + 2.0 * k.to(DT) / 255


def optimal_net(abar: torch.Tensor, head: str):
    A = abar.numpy()

    def net(z, t):
        ti = t.numpy()
        assert np.issubdtype(ti.dtype, np.integer)
        a = np.sqrt(A[ti])[:, None]
        b = np.sqrt(1 - A[ti])[:, None]
        sig = b / a
        zz = z.numpy()
        x0 = MU + S**2 / (S**2 + sig**2) * (zz / a - MU)
        eps = (zz - a * x0) / b
        out = {"eps": eps, "v": a * eps - b * x0, "x": x0}[head]
        return torch.from_numpy(out)

    return net


class Adapter:
    """A duck-typed DiscreteTimeModel (what vdmpp.samplers.from_discrete provides)."""

    def __init__(self, abar):
        self.alphas_cumprod = abar
        self.net = optimal_net(abar, "eps")

    def predict_eps(self, z, t, **kwargs):
        return self.net(z, t)


def closed_form_diffusion(x: torch.Tensor, abar: torch.Tensor) -> np.ndarray:
    """½ Σ_i (SNR_{i−1} − SNR_i) E_ε‖x − x̂‖² per example, nats (module docstring)."""
    A = abar.numpy()
    snr = A / (1 - A)
    sig2 = (1 - A) / A
    k = S**2 / (S**2 + sig2)
    xx = x.numpy()[:, None, :]  # [n, 1, d]
    err = ((1 - k)[None, :, None] ** 2 * (xx - MU) ** 2 + (k**2 * sig2)[None, :, None]).sum(-1)
    return 0.5 * ((snr[:-1] - snr[1:])[None, :] * err[:, 1:]).sum(1)


@pytest.mark.parametrize("head", ["eps", "v", "x"])
def test_each_term_is_vdm_eq48_for_the_given_noise(head):
    """Deterministic: fixed i and ε, the estimator is K/2·(SNR_{i−1} − SNR_i)‖x − x̂‖²."""
    T = 50
    abar = linear_table(T)
    K = T - 1
    x = grid_data(1, 5).expand(K, 5).contiguous()
    i = np.arange(1, T)
    t = torch.tensor((i - 1 + 0.5) / K, dtype=DT)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=DT)
    got = V.diffusion_loss_timesteps(
        optimal_net(abar, head), x, abar, parameterization=head, t=t, noise=noise
    )
    A = abar.numpy()[i][:, None]
    a, b = np.sqrt(A), np.sqrt(1 - A)
    z = a * x.numpy() + b * noise.numpy()
    sig = b / a
    xhat = MU + S**2 / (S**2 + sig**2) * (z / a - MU)
    snr = abar.numpy() / (1 - abar.numpy())
    want = K / 2 * (snr[i - 1] - snr[i]) * ((x.numpy() - xhat) ** 2).sum(1)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)


def test_adapter_protocol_and_plain_callable_agree():
    abar = linear_table(40)
    x = grid_data(16, 3)
    ad = Adapter(abar)
    assert isinstance(ad, DiscreteTimeModel)
    kw = dict(generator=None, t=torch.rand(16, dtype=DT), noise=torch.randn(16, 3, dtype=DT))
    a = V.diffusion_loss_timesteps(ad, x, **kw)
    b = V.diffusion_loss_timesteps(optimal_net(abar, "v"), x, abar, parameterization="v", **kw)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    c = V.diffusion_loss_timesteps(TimestepModel(optimal_net(abar, "x"), abar, "x"), x, **kw)
    torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-12)


def test_bits_per_dim_matches_the_closed_form_for_gaussian_data():
    """Monte Carlo over i and ε against the closed form, within 4 standard errors."""
    T = 200
    abar = linear_table(T)
    x1 = grid_data(1, 4, seed=3)
    n = 4096
    x = x1.expand(n, 4).contiguous()
    with torch.no_grad():
        bpd = bits_per_dim(Adapter(abar), x, generator=torch.Generator().manual_seed(0))
    to_bits = 1 / (4 * math.log(2))
    want = closed_form_diffusion(x1, abar)[0] * to_bits
    d = bpd.diffusion
    se = float(d.std()) / math.sqrt(n)
    assert abs(float(d.mean()) - want) < 4 * se, (float(d.mean()), want, se)
    # the prior is the KL at the table's last entry, in closed form
    lam_min = math.log(abar[-1] / (1 - abar[-1]))
    a2 = abar[-1].item()
    kl = 0.5 * float(((a2 * x1**2) + (1 - a2) - 1 - math.log(1 - a2)).sum())
    torch.testing.assert_close(bpd.prior, torch.full((n,), kl * to_bits, dtype=DT))
    assert V.discrete_logsnr(abar)[-1].item() == pytest.approx(lam_min, rel=1e-12)
    torch.testing.assert_close(bpd.total, bpd.prior + bpd.reconstruction + bpd.diffusion)
    # the reconstruction term is VDM's decoder at the table's first λ
    lam0 = float(V.discrete_logsnr(abar)[0])
    eps0 = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=DT)
    rec = V.reconstruction_loss(x, lam0, noise=eps0) * to_bits
    torch.testing.assert_close(bpd.reconstruction, rec)


def test_more_timesteps_do_not_loosen_the_bound():
    """VDM Sec. 3 / App. F: for this monotone-error model, a finer table gives a lower L_T."""
    x = grid_data(2, 4, seed=5)
    coarse, fine = linear_table(50), linear_table(1000)
    # same endpoints in λ up to the tables' construction; compare closed forms and check the
    # estimator on both agrees with them at 4 standard errors
    for abar in (coarse, fine):
        x_rep = x[:1].expand(2048, 4).contiguous()
        d = V.diffusion_loss_timesteps(
            Adapter(abar), x_rep, generator=torch.Generator().manual_seed(1)
        )
        want = closed_form_diffusion(x[:1], abar)[0]
        assert abs(float(d.mean()) - want) < 4 * float(d.std()) / math.sqrt(2048)
    assert closed_form_diffusion(x, fine)[0] < closed_form_diffusion(x, coarse)[0]


def test_errors_name_what_is_missing():
    x = grid_data(2, 3)
    net = optimal_net(linear_table(100), "eps")
    with pytest.raises(TypeError, match="alphas_cumprod"):
        bits_per_dim_discrete(net, x)
    with pytest.raises(TypeError, match="needs a schedule"):
        bits_per_dim(net, x)
    with pytest.raises(ValueError, match="decrease strictly"):
        bits_per_dim_discrete(net, x, linear_table(100).flip(0))
    with pytest.raises(TypeError, match="not a tensor"):
        V.diffusion_loss_timesteps(lambda z, t: (z,), x, linear_table(100))
