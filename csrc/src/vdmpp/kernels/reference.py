"""Pure-PyTorch references of the fused ops, in the same operation order (the test oracle).

They mirror ``vdmpp.samplers._step`` (heun_step, churn) and ``vdmpp.schedules.Adaptive``
(``bin_stats`` + ``apply_stats``) so the kernels can be checked without those libraries.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "adaptive_apply_stats",
    "adaptive_bin_stats",
    "adaptive_ema_update",
    "cdf_from_ema",
    "churn",
    "heun_step",
]


def _ct(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def heun_step(
    x_hat: Tensor, denoised: Tensor, denoised_next: Tensor | None, t_hat: float, t_next: float
) -> Tensor:
    """Reference of ``vdmpp::heun_step`` (float32 math for bf16 inputs)."""
    ct = _ct(x_hat.dtype)
    x, d1 = x_hat.to(ct), denoised.to(ct)
    h = t_next - t_hat
    d_cur = (x - d1) / t_hat
    if denoised_next is None:
        out = x + h * d_cur
    else:
        x_e = x + h * d_cur
        d_prime = (x_e - denoised_next.to(ct)) / t_next
        out = x + h * (0.5 * d_cur + 0.5 * d_prime)
    return out.to(x_hat.dtype)


def churn(x: Tensor, noise: Tensor, t: float, t_hat: float, s_noise: float) -> Tensor:
    """Reference of ``vdmpp::churn``."""
    ct = _ct(x.dtype)
    scale = math.sqrt(t_hat * t_hat - t * t) * s_noise
    return (x.to(ct) + scale * noise.to(ct)).to(x.dtype)


def cdf_from_ema(ema: Tensor) -> Tensor:
    """[0, cumsum(max(ema, tiny)) / total, ..., exactly 1] (tiny: smallest normal float)."""
    c = torch.cumsum(ema.clamp_min(torch.finfo(ema.dtype).tiny), 0)
    c = torch.cat([c.new_zeros(1), c / c[-1:]])
    return torch.cat([c[:-1], c.new_ones(1)])


@torch.no_grad()
def adaptive_bin_stats(
    stats: Tensor, logsnr: Tensor, value: Tensor, logsnr_min: float, logsnr_max: float
) -> None:
    """Reference of ``vdmpp::adaptive_bin_stats`` (stats += Adaptive.bin_stats without w)."""
    bins = stats.shape[1]
    width = (logsnr_max - logsnr_min) / bins
    lam, val = logsnr.to(stats.dtype), value.to(stats.dtype)
    if lam.device.type == "cpu" and lam.numel() and bool(torch.isnan(lam).any()):
        raise ValueError("logsnr contains NaN")
    ok = torch.isfinite(lam) & torch.isfinite(val)
    k = torch.floor((torch.nan_to_num(lam, nan=logsnr_min) - logsnr_min) / width)
    k = k.clamp(0, bins - 1).long()
    new = stats.new_zeros(2, bins)
    new[0].index_add_(0, k, torch.where(ok, val, torch.zeros_like(val)))
    new[1].index_add_(0, k, ok.to(stats.dtype))
    stats += new


@torch.no_grad()
def adaptive_apply_stats(ema: Tensor, cdf: Tensor, stats: Tensor, decay: float) -> None:
    """Reference of ``vdmpp::adaptive_apply_stats`` (Adaptive.apply_stats)."""
    sums, counts = stats[0], stats[1]
    mean = sums / counts.clamp_min(1)
    ema.copy_(torch.where(counts > 0, decay * ema + (1 - decay) * mean, ema))
    cdf.copy_(cdf_from_ema(ema))


@torch.no_grad()
def adaptive_ema_update(
    ema: Tensor,
    cdf: Tensor,
    logsnr: Tensor,
    value: Tensor,
    decay: float,
    logsnr_min: float,
    logsnr_max: float,
) -> None:
    """Reference of ``vdmpp::adaptive_ema_update``: the data-parallel pair on one rank."""
    stats = ema.new_zeros(2, ema.numel())
    adaptive_bin_stats(stats, logsnr, value, logsnr_min, logsnr_max)
    adaptive_apply_stats(ema, cdf, stats, decay)
