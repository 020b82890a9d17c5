"""σ grids for the samplers: EDM's ρ-schedule (EDM eq. 5) and any vdmpp.schedules schedule.

A grid is a 1-D float64 CPU tensor σ₀ > σ₁ > … > σ_{N−1} > σ_N = 0 (N steps), in EDM's units
(x = data + σ·n, σ = e^{−λ/2}).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vdmpp.schedules import NoiseSchedule, sigma_from_logsnr

__all__ = ["karras_sigmas", "sigmas_from_schedule"]


def karras_sigmas(
    n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> Tensor:
    """EDM's grid (EDM eq. 5): σ_i = (σ_max^{1/ρ} + i/(n−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ.

    Returns n+1 values: the n noise levels from σ_max to σ_min, then σ_N = 0.
    """
    if n < 1:
        raise ValueError(f"need n >= 1 steps, got {n}")
    if not (0 < sigma_min <= sigma_max) or not rho > 0:
        raise ValueError(
            f"need 0 < sigma_min <= sigma_max and rho > 0, got {sigma_min}, {sigma_max}, {rho}"
        )
    if n == 1:
        return torch.tensor([float(sigma_max), 0.0], dtype=torch.float64)
    i = torch.arange(n, dtype=torch.float64)
    a, b = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    sigmas = (a + i / (n - 1) * (b - a)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


@torch.no_grad()
def sigmas_from_schedule(schedule: NoiseSchedule, n: int) -> Tensor:
    """n noise levels at t = 1, (n−2)/(n−1), …, 0 of a schedule (λ_min … λ_max), then σ = 0.

    σ_i = e^{−λ(t_i)/2} with t_i = 1 − i/(n−1), so ``sigmas_from_schedule(EDMSampling(), n)``
    equals ``karras_sigmas(n)``; with ``Cosine()`` it is the DDPM grid of VDM++ §5.
    """
    if n < 1:
        raise ValueError(f"need n >= 1 steps, got {n}")
    t = torch.linspace(1.0, 0.0, n, dtype=torch.float64) if n > 1 else torch.ones(1).double()
    try:
        lam = schedule.logsnr(t)
    except RuntimeError:  # e.g. a float32 nn.Module schedule (Learned)
        lam = schedule.logsnr(t.float())
    sigmas = sigma_from_logsnr(lam.double().cpu())
    return torch.cat([sigmas, sigmas.new_zeros(1)])
