"""as_denoiser against exact λ-conditioned models in every parameterization, and guidance.

The exact models are written from the definitions of VDM++ App. E.2 / D.2 / D.3 (forward
direction: x̂ → network output), independently of the adapter's inverse formulas:
z = αx + σε, ε = (z − αx)/σ, v = αε − σx, score = −ε/σ, o = x − ε, and F of eq. 120.
"""

from __future__ import annotations

import math

import pytest
import torch

from vdmpp.samplers import (
    PARAMETERIZATIONS,
    as_denoiser,
    ddpm,
    edm_stochastic,
    guided,
    heun,
    karras_sigmas,
)

F64 = torch.float64
MU, S = 0.3, 0.5
SIGMA_DATA = 0.7


def exact_denoiser(x, sigma, mu=MU):
    sg = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return mu + S**2 / (S**2 + sg**2) * (x - mu)


def exact_model(parameterization, process):
    """model(z, logsnr, class_labels=None) giving the exact output of a parameterization."""

    def model(z, logsnr, class_labels=None):
        lam = logsnr.to(F64).reshape(-1, *([1] * (z.ndim - 1)))
        if process == "vp":
            alpha, sigma = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
        else:
            alpha, sigma = torch.ones_like(lam), torch.exp(-lam / 2)
        sigma_edm = torch.exp(-lam / 2)  # = σ/α
        x = exact_denoiser(z / alpha, sigma_edm.reshape(-1))
        eps = (z - alpha * x) / sigma
        if parameterization == "eps":
            return eps
        if parameterization == "x":
            return x
        if parameterization == "v":
            return alpha * eps - sigma * x
        if parameterization == "score":
            return -eps / sigma
        if parameterization == "flow":
            return x - eps
        # edm: F = (x − c_skip·z/α)/c_out = √(e^{−λ}+σ_d²)/(e^{−λ/2}σ_d)·x − σ_d/(e^{−λ/2}√(…))·z/α
        root = torch.sqrt(torch.exp(-lam) + SIGMA_DATA**2)
        return root / (sigma_edm * SIGMA_DATA) * x - SIGMA_DATA / (sigma_edm * root) * z / alpha

    return model


@pytest.mark.parametrize("process", ["vp", "ve"])
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_as_denoiser_recovers_exact_denoiser(parameterization, process):
    D = as_denoiser(exact_model(parameterization, process), parameterization, process,
                    sigma_data=SIGMA_DATA)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    for sigma in [0.002, 0.3, 1.0, 7.0, 80.0]:
        x = MU + math.sqrt(S**2 + sigma**2) * torch.randn(5, 3, 2, generator=g, dtype=F64)
        torch.testing.assert_close(
            D(x, torch.full((5,), sigma, dtype=F64)), exact_denoiser(x, sigma), rtol=1e-9, atol=1e-9
        )


def test_vp_eps_model_samples_like_exact_edm_denoiser():
    D = as_denoiser(exact_model("eps", "vp"), "eps", "vp")
    noise = torch.randn(16, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    ts = karras_sigmas(18)
    torch.testing.assert_close(
        heun(D, noise, ts), heun(exact_denoiser, noise, ts), rtol=1e-9, atol=1e-9
    )
    kw = dict(churn=30.0, s_tmin=0.05, s_tmax=50.0)
    a = edm_stochastic(D, noise, ts, generator=torch.Generator().manual_seed(2), **kw)
    b = edm_stochastic(exact_denoiser, noise, ts, generator=torch.Generator().manual_seed(2), **kw)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    a = ddpm(D, noise, ts, generator=torch.Generator().manual_seed(3))
    b = ddpm(exact_denoiser, noise, ts, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_as_denoiser_passes_class_labels_and_float32():
    seen = {}

    def model(z, logsnr, class_labels=None):
        seen.update(dtype=z.dtype, lam=logsnr.dtype, shape=tuple(logsnr.shape), y=class_labels)
        return torch.zeros_like(z)

    D = as_denoiser(model, "eps", "vp")
    x = torch.randn(4, 3, 8, 8, dtype=torch.bfloat16)
    y = torch.arange(4)
    out = D(x, torch.full((4,), 2.0), class_labels=y)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert seen["dtype"] == torch.bfloat16 and seen["lam"] == torch.float32
    assert seen["shape"] == (4,) and seen["y"] is y
    # ε̂ = 0 means x̂ = z/α = x
    torch.testing.assert_close(out.float(), x.float(), rtol=1e-2, atol=1e-2)


def test_as_denoiser_rejects_unknown_names():
    with pytest.raises(ValueError, match="parameterization"):
        as_denoiser(exact_model("eps", "vp"), "epsilon")
    with pytest.raises(ValueError, match="process"):
        as_denoiser(exact_model("eps", "vp"), "eps", "subvp")


# --- classifier-free guidance ----------------------------------------------------------------


def conditional_denoiser(x, sigma, class_labels=None):
    """Class-conditional exact denoiser: class c has mean c; None is the unconditional mean 0."""
    mu = 0.0 if class_labels is None else class_labels.to(x.dtype).reshape(-1, 1)
    return exact_denoiser(x, sigma, mu=mu)


def test_guidance_scale_one_is_conditional_and_zero_is_unconditional():
    x = torch.randn(6, 4, dtype=F64)
    s = torch.full((6,), 1.3, dtype=F64)
    y = torch.arange(6)
    D_c = lambda x, sigma: conditional_denoiser(x, sigma, y)
    D_u = lambda x, sigma: conditional_denoiser(x, sigma, None)
    assert torch.equal(guided(D_c, D_u, 1.0)(x, s), D_c(x, s))
    assert torch.equal(guided(D_c, D_u, 0.0)(x, s), D_u(x, s))
    torch.testing.assert_close(
        guided(D_c, D_u, 2.5)(x, s), D_u(x, s) + 2.5 * (D_c(x, s) - D_u(x, s))
    )
    # one class-conditional denoiser: the unconditional pass uses class_labels=None
    G = guided(conditional_denoiser, 2.5)
    torch.testing.assert_close(G(x, s, class_labels=y), guided(D_c, D_u, 2.5)(x, s))
    assert torch.equal(guided(conditional_denoiser, None, 0.0)(x, s, class_labels=y), D_u(x, s))
    # through a sampler
    noise = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    ts = karras_sigmas(8)
    extra = {"class_labels": y}
    assert torch.equal(
        heun(guided(conditional_denoiser, 1.0), noise, ts, extra_args=extra),
        heun(conditional_denoiser, noise, ts, extra_args=extra),
    )


def test_guided_argument_errors():
    with pytest.raises(TypeError):
        guided(conditional_denoiser)
    with pytest.raises(TypeError):
        guided(conditional_denoiser, 2.0, 3.0)
    with pytest.raises(TypeError):
        guided(conditional_denoiser, "uncond", 3.0)
