"""Per-seed sampling: image k depends on seed k only, for batch sizes 1, 7 and 64."""

from __future__ import annotations

import pytest
import torch

from vdmpp.samplers import (
    PerSampleGenerator,
    ddim,
    ddpm,
    edm_stochastic,
    heun,
    karras_sigmas,
    noise_for_seeds,
)

SHAPE = (3, 4, 4)
SEEDS = list(range(1000, 1064))


def denoiser(x, sigma):
    """Exact denoiser of N(0.2, 0.5²) data: elementwise, so batch-independent."""
    sg = sigma.reshape(-1, 1, 1, 1)
    return 0.2 + 0.25 / (0.25 + sg**2) * (x - 0.2)


SAMPLERS = {
    "heun": lambda D, n, ts, g: heun(D, n, ts, generator=g),
    "edm_stochastic": lambda D, n, ts, g: edm_stochastic(D, n, ts, churn=20, generator=g),
    "ddpm": lambda D, n, ts, g: ddpm(D, n, ts, generator=g),
    "ddim_eta": lambda D, n, ts, g: ddim(D, n, ts, eta=0.7, generator=g),
}


def _sample(name, seeds, dtype):
    gen = PerSampleGenerator(seeds)
    noise = gen.randn(SHAPE, dtype=dtype)
    return SAMPLERS[name](denoiser, noise, karras_sigmas(8), gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", SAMPLERS)
def test_image_k_is_independent_of_batch(name, dtype):
    full = _sample(name, SEEDS, dtype)
    assert full.shape == (64, *SHAPE) and full.dtype == dtype
    seven = _sample(name, SEEDS[10:17], dtype)
    one = _sample(name, SEEDS[42:43], dtype)
    assert torch.equal(seven, full[10:17])
    assert torch.equal(one, full[42:43])
    # split "across ranks": two halves give the same images as the whole batch
    assert torch.equal(
        torch.cat([_sample(name, SEEDS[:32], dtype), _sample(name, SEEDS[32:], dtype)]), full
    )


def test_noise_for_seeds_rows_and_dtypes():
    a = noise_for_seeds([5, 6, 7], (2, 3))
    b = noise_for_seeds([7], (2, 3))
    assert a.shape == (3, 2, 3) and torch.equal(a[2:], b)
    c = noise_for_seeds([5, 6, 7], (2, 3), dtype=torch.bfloat16)
    assert c.dtype == torch.bfloat16 and torch.equal(c, a.to(torch.bfloat16))
    assert not torch.equal(a[0], a[1])


def test_per_sample_generator_checks_batch():
    gen = PerSampleGenerator([1, 2, 3])
    with pytest.raises(ValueError, match="3 seeds"):
        gen.randn_like(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="at least one seed"):
        PerSampleGenerator([])
    with pytest.raises(ValueError, match="3 seeds"):
        edm_stochastic(denoiser, torch.zeros(4, *SHAPE), karras_sigmas(4), churn=10, generator=gen)
