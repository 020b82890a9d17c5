"""Per-sample random streams: image k depends on seed k only, whatever the batch or rank split.

One ``torch.Generator`` per sample, seeded with that sample's seed, draws that sample's initial
noise and then every noise the stochastic samplers add (the pattern of NVlabs/edm's
``StackedRandomGenerator``). Use one object for both::

    gen = PerSampleGenerator(seeds, device="cuda")
    noise = gen.randn((3, 64, 64))             # [len(seeds), 3, 64, 64]
    x0 = edm_stochastic(D, noise, sigmas, churn=40, generator=gen)

Streams are device-specific: the same seed gives the same image on every CUDA GPU, and a
(different) fixed image on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["PerSampleGenerator", "noise_for_seeds", "randn_like"]


def _draw_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision noise is drawn in float32 and rounded, so a seed gives the same noise
    # (up to rounding) whatever the sampling dtype.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class PerSampleGenerator:
    """A stack of per-sample generators; row k of every draw comes from ``seeds[k]``."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str | None = None) -> None:
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ValueError("PerSampleGenerator needs at least one seed")
        self.seeds = seeds
        self.device = torch.device(device if device is not None else "cpu")
        self.generators = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], *, dtype: torch.dtype = torch.float32) -> Tensor:
        """Unit Gaussian of shape ``[len(seeds), *shape]``; ``shape`` is one sample's shape."""
        dt = _draw_dtype(dtype)
        rows = [
            torch.randn(tuple(shape), generator=g, device=self.device, dtype=dt)
            for g in self.generators
        ]
        return torch.stack(rows).to(dtype)

    def randn_like(self, x: Tensor) -> Tensor:
        """Unit Gaussian shaped like ``x``, whose leading (batch) dimension must be len(seeds)."""
        if x.ndim == 0 or x.shape[0] != len(self.generators):
            raise ValueError(
                f"PerSampleGenerator has {len(self.generators)} seeds but the batch has shape "
                f"{tuple(x.shape)}"
            )
        if x.device != self.device:
            raise ValueError(f"PerSampleGenerator lives on {self.device}, tensor on {x.device}")
        return self.randn(x.shape[1:], dtype=x.dtype)


def noise_for_seeds(
    seeds: Sequence[int],
    shape: Sequence[int],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Initial noise ``[len(seeds), *shape]``, row k from ``seeds[k]``.

    Enough for the deterministic samplers (euler, heun, ddim with eta=0). For the stochastic ones
    draw the initial noise from the :class:`PerSampleGenerator` you pass as ``generator`` instead,
    so the step noise continues each seed's stream rather than repeating it.
    """
    return PerSampleGenerator(seeds, device).randn(shape, dtype=dtype)


def randn_like(x: Tensor, generator: torch.Generator | PerSampleGenerator | None) -> Tensor:
    """A unit Gaussian like ``x`` from a generator (None: torch's global RNG)."""
    if isinstance(generator, PerSampleGenerator):
        return generator.randn_like(x)
    dt = _draw_dtype(x.dtype)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=dt).to(x.dtype)
