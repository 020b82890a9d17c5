"""Sampling diffusion time t ∈ [0, 1) for a minibatch."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["low_discrepancy", "uniform"]


def _check_n(n: int) -> None:
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")


def uniform(
    n: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """n independent draws t ~ U[0, 1)."""
    _check_n(n)
    if generator is not None and device is None:
        device = generator.device
    return torch.rand(n, generator=generator, device=device, dtype=dtype)


def low_discrepancy(
    n: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Low-discrepancy times t_i = mod(u₀ + i/n, 1), u₀ ~ U[0, 1) (VDM App. I.1).

    Each t_i is marginally U[0, 1) and the batch has exactly one point in each of the n strata
    [k/n, (k+1)/n). Computed in float64 and cast, so the strata are exact for any n.
    """
    _check_n(n)
    if generator is not None and device is None:
        device = generator.device
    u0 = torch.rand((), generator=generator, device=device, dtype=torch.float64)
    t = torch.remainder(u0 + torch.arange(n, device=device, dtype=torch.float64) / max(n, 1), 1.0)
    return t.to(dtype)
