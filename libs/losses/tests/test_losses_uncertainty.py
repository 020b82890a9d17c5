"""EDM2's uncertainty weighting (eq. 21): ℓ·e^{−u} + u is minimized at u = log ℓ, and a learned
u(λ) recovers E[ℓ | λ] on a problem where that is known."""

from __future__ import annotations

import math

import pytest
import torch

from vdmpp.losses import LogVarianceMLP, uncertainty_weighted

LO, HI = -20.0, 20.0


def expected_loss(lam: torch.Tensor) -> torch.Tensor:
    """c(λ) = E[ℓ | λ] of the synthetic problem: smooth, spanning e^1 … e^5.5 over [−20, 20]."""
    return torch.exp(2.0 * torch.tanh(lam / 8) + 0.5 * torch.sin(lam / 3) + 3.0)


def fit(model: LogVarianceMLP, lam: torch.Tensor, loss: torch.Tensor, iters: int = 60) -> float:
    """Minimize mean(uncertainty_weighted(ℓ, u(λ))) over the linear head from its zero init.

    u is linear in the head's parameters and ℓe^{−u} + u is convex in u, so the objective is
    convex: damped Newton (gradient by autograd through the module, Hessian Φᵀ diag(ℓe^{−u}) Φ/N
    from d²/du²) reaches its minimizer. Returns the final gradient's max-norm.
    """
    lin = model.net
    params = [lin.weight, lin.bias]
    with torch.no_grad():
        phi = torch.cat([model.features(lam), torch.ones(len(lam), 1, dtype=lam.dtype)], 1)

    def objective() -> torch.Tensor:
        return uncertainty_weighted(loss, model(lam)).mean()

    gmax = math.inf
    for _ in range(iters):
        obj = objective()
        g = torch.cat([x.flatten() for x in torch.autograd.grad(obj, params)])
        gmax = g.abs().max().item()
        if gmax < 1e-9:
            break
        with torch.no_grad():
            h = loss * torch.exp(-model(lam))
            step = torch.linalg.solve(phi.T @ (h[:, None] * phi) / len(lam), g)
            w0, b0 = lin.weight.clone(), lin.bias.clone()
            t = 1.0
            while True:
                lin.weight.copy_(w0 - t * step[:-1].reshape(1, -1))
                lin.bias.copy_(b0 - t * step[-1:])
                if objective() <= obj - 0.25 * t * torch.dot(g, step) or t < 1e-8:
                    break
                t /= 2
    return gmax


def test_minimizer_of_each_term_is_log_loss() -> None:
    ell = torch.logspace(-6, 6, 49, dtype=torch.float64)
    u = ell.log().requires_grad_(True)
    f = uncertainty_weighted(ell, u)
    (g,) = torch.autograd.grad(f.sum(), u)
    eps = torch.finfo(torch.float64).eps
    assert g.abs().max().item() <= 4 * eps  # d/du = 1 − ℓe^{−u} = 0 at u = log ℓ
    torch.testing.assert_close(f.detach(), 1.0 + ell.log(), rtol=0, atol=8 * eps * 14)
    for d in (1e-3, -1e-3, 0.5, -0.5):  # convex: strictly larger on either side
        assert torch.all(uncertainty_weighted(ell, ell.log() + d) > f.detach())


def test_shapes_must_match() -> None:
    with pytest.raises(ValueError, match="same shape"):
        uncertainty_weighted(torch.ones(4), torch.zeros(4, 1))


@pytest.mark.parametrize("hidden", [0, 16])
def test_zero_init_gives_u_equal_zero(hidden: int) -> None:
    m = LogVarianceMLP(64, hidden=hidden)
    lam = torch.linspace(-30, 30, 257)
    u = m(lam)
    assert u.shape == (257,) and torch.equal(u, torch.zeros(257))
    loss = torch.rand(257) * 10
    assert torch.equal(uncertainty_weighted(loss, u), loss)  # the loss is unchanged at start
    # the buffers come from the seed, not from the global RNG
    torch.manual_seed(123)
    a = LogVarianceMLP(64, hidden=hidden)
    torch.manual_seed(456)
    b = LogVarianceMLP(64, hidden=hidden)
    assert torch.equal(a.freqs, b.freqs) and torch.equal(a.phases, b.phases)
    assert not torch.equal(a.freqs, LogVarianceMLP(64, seed=1).freqs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [0, 16])
def test_finite_over_the_logsnr_range(dtype: torch.dtype, hidden: int) -> None:
    g = torch.Generator().manual_seed(0)
    m = LogVarianceMLP(128, hidden=hidden)
    with torch.no_grad():  # a trained-looking head, not the zero init
        for p in m.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    lam = torch.linspace(-30, 30, 1201)
    for module_dtype in (torch.float32, dtype):
        mm = m.to(module_dtype)
        u = mm(lam.to(dtype))
        assert torch.isfinite(u).all()
        loss = torch.rand(1201, generator=g).to(dtype) * 1e3
        out = uncertainty_weighted(loss, u)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        out.sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in mm.parameters())
        mm.zero_grad()
    m.float()
    u32, u16 = m(lam), m(lam.to(dtype))
    assert (u32 - u16).abs().max() < 0.1 * max(1.0, u32.abs().max().item())


def test_learned_u_recovers_the_expected_loss_without_noise() -> None:
    """Noise-free ℓ = c(λ): the minimizer is u = log c wherever the features can represent it;
    what is left is the head's approximation error (measured 1.8e-4)."""
    lam = torch.linspace(LO, HI, 4096, dtype=torch.float64)
    m = LogVarianceMLP(32).double()
    assert fit(m, lam, expected_loss(lam)) < 1e-9
    grid = torch.linspace(LO, HI, 401, dtype=torch.float64)
    with torch.no_grad():
        r = torch.exp(m(grid)) / expected_loss(grid)
    assert (r - 1).abs().max().item() < 1e-3


def test_learned_u_converges_to_the_expected_loss_of_chi2_samples() -> None:
    """ℓ = c(λ)·χ²_D/D (a per-example ‖ε−ε̂‖² over D = 256 dimensions of unit-variance error):
    E[ℓ | λ] = c(λ), Var[ℓ/c] = 2/D. Minimizing the empirical objective over N = 4096
    stratified λ gives e^u = c·(1 + δ) with δ the error of a p = 33-parameter fit,
    sd σ_δ ≈ √(p/N)·√(2/D) = 0.0079 (mean |δ| ≈ 0.8·σ_δ, measured 0.0065; max over the
    interior [−18, 18] ≈ 3σ_δ, measured 0.024; the ends of the sample, averaged on one side
    only, ≈ 5σ_δ, measured 0.036). Tolerances: mean |δ| ≤ 1.2σ_δ, interior ≤ 4σ_δ, ends ≤ 7σ_δ.
    """
    n, d, p = 4096, 256, 33
    g = torch.Generator().manual_seed(1)
    jitter = torch.rand(n, generator=g, dtype=torch.float64)
    lam = LO + (HI - LO) * (torch.arange(n, dtype=torch.float64) + jitter) / n
    chi2 = torch.randn(n, d, generator=g, dtype=torch.float64).square().mean(1)
    loss = expected_loss(lam) * chi2
    m = LogVarianceMLP(p - 1).double()
    assert fit(m, lam, loss) < 1e-9
    grid = torch.linspace(LO, HI, 401, dtype=torch.float64)
    with torch.no_grad():
        delta = (torch.exp(m(grid)) / expected_loss(grid) - 1).abs()
    sd = math.sqrt(p / n) * math.sqrt(2 / d)
    interior = (grid >= -18) & (grid <= 18)
    assert delta.mean().item() <= 1.2 * sd
    assert delta[interior].max().item() <= 4 * sd
    assert delta.max().item() <= 7 * sd
