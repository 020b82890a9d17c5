"""Preview grids while training: the EMA model sampled from fixed noise, one PNG per interval."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .config import Config
from .grid import save_grid

__all__ = ["save_preview"]


@torch.no_grad()
def save_preview(cfg: Config, ema: nn.Module, device: torch.device, step: int, out: Path) -> Path:
    """``RUN/samples/step-<step>.png``: ``sample.count`` images by ``sample.sampler`` (any
    ``vdmpp.samplers.SAMPLERS`` entry, default Heun, EDM Alg. 1) on EDM's ρ-grid, noise seeded
    by ``cfg.seed`` (the same every interval), columns = classes."""
    from vdmpp.samplers import SAMPLERS, as_denoiser, karras_sigmas

    s, o = cfg.sample, cfg.objective
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    shape = (s.count, cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    noise = torch.randn(shape, generator=gen, device=device)
    labels = None
    if cfg.data.num_classes is not None:
        labels = torch.arange(s.count, device=device) % cfg.data.num_classes
    den = as_denoiser(ema, o.parameterization, o.process, sigma_data=o.sigma_data)
    sigmas = karras_sigmas(s.steps, s.sigma_min, s.sigma_max, s.rho).to(device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)  # a stochastic sampler's
    fn = SAMPLERS[s.sampler].fn
    x = fn(
        den, noise, sigmas, extra_args={"class_labels": labels}, check_finite=False, generator=gen
    )
    path = out / "samples" / f"step-{step:09d}.png"
    caption = f"{cfg.name} step {step}, EMA, {s.sampler} {s.steps} steps"
    save_grid(
        x,
        path,
        labels=labels,
        num_classes=cfg.data.num_classes,
        caption=caption + (", columns = classes" if labels is not None else ""),
    )
    return path
