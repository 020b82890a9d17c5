"""Bad input gives clear errors, not silent garbage."""

from __future__ import annotations

import math

import pytest
import torch

from vdmpp.samplers import (
    ddim,
    ddpm,
    edm_stochastic,
    euler,
    heun,
    karras_sigmas,
    sigmas_from_schedule,
)
from vdmpp.schedules import Cosine

ALL = [euler, heun, edm_stochastic, ddpm, ddim]


def denoiser(x, sigma):
    return x / (1 + sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2)


@pytest.mark.parametrize("sampler", ALL)
@pytest.mark.parametrize(
    ("sigmas", "match"),
    [
        ([1.0, 2.0, 0.0], "strictly decreasing"),
        ([2.0, 1.0, 1.0, 0.0], "strictly decreasing"),
        ([2.0, 1.0, -0.5], ">= 0"),
        ([2.0, math.nan, 0.0], "finite"),
        ([math.inf, 1.0, 0.0], "finite"),
        ([1.0], "at least 2"),
        ([[2.0, 1.0], [1.0, 0.0]], "1-D"),
    ],
)
def test_bad_grids(sampler, sigmas, match):
    with pytest.raises(ValueError, match=match):
        sampler(denoiser, torch.randn(2, 3), torch.tensor(sigmas))


@pytest.mark.parametrize("sampler", ALL)
def test_denoiser_shape_mismatch(sampler):
    bad = lambda x, sigma: x[:, :2]
    with pytest.raises(ValueError, match=r"shaped like x"):
        sampler(bad, torch.randn(2, 3), karras_sigmas(4))
    with pytest.raises(ValueError, match=r"shaped like x"):
        sampler(lambda x, sigma: 0.0, torch.randn(2, 3), karras_sigmas(4))


@pytest.mark.parametrize("sampler", ALL)
def test_nan_from_denoiser(sampler):
    def nan_at_small_sigma(x, sigma):
        out = denoiser(x, sigma)
        return out * math.nan if sigma[0] < 1.0 else out

    with pytest.raises(FloatingPointError, match=r"step \d+ \(sigma="):
        sampler(nan_at_small_sigma, torch.randn(2, 3), karras_sigmas(6))
    x = sampler(nan_at_small_sigma, torch.randn(2, 3), karras_sigmas(6), check_finite=False)
    assert torch.isnan(x).all()


def test_bad_noise_and_arguments():
    with pytest.raises(TypeError, match="floating-point"):
        heun(denoiser, torch.zeros(2, 3, dtype=torch.long), karras_sigmas(4))
    with pytest.raises(FloatingPointError, match="noise"):
        heun(denoiser, torch.full((2, 3), math.nan), karras_sigmas(4))
    with pytest.raises(ValueError, match="churn"):
        edm_stochastic(denoiser, torch.randn(2, 3), karras_sigmas(4), churn=-1)
    with pytest.raises(ValueError, match="eta"):
        ddim(denoiser, torch.randn(2, 3), karras_sigmas(4), eta=-0.1)
    for bad in (0, -3):
        with pytest.raises(ValueError):
            karras_sigmas(bad)
        with pytest.raises(ValueError):
            sigmas_from_schedule(Cosine(), bad)
    with pytest.raises(ValueError):
        karras_sigmas(4, sigma_min=1.0, sigma_max=0.5)


def test_grid_as_list_and_on_any_device_type():
    x = torch.randn(2, 3, dtype=torch.float64)
    a = heun(denoiser, x, karras_sigmas(5))
    b = heun(denoiser, x, karras_sigmas(5).tolist())
    c = heun(denoiser, x, karras_sigmas(5).float())
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)
