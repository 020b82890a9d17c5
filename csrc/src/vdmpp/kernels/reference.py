"""Pure-PyTorch references of the fused ops, in the same operation order (the test oracle).

They mirror ``vdmpp.samplers._step`` (heun_step, churn) and ``vdmpp.schedules.Adaptive``
(``bin_stats`` + ``apply_stats``) so the kernels can be checked without those libraries.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["adaptive_ema_update", "churn", "heun_step"]


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
    """Reference of ``vdmpp::adaptive_ema_update`` (Adaptive.bin_stats + apply_stats)."""
    bins = ema.numel()
    width = (logsnr_max - logsnr_min) / bins
    lam, val = logsnr.to(ema.dtype), value.to(ema.dtype)
    if lam.device.type == "cpu" and lam.numel() and bool(torch.isnan(lam).any()):
        raise ValueError("logsnr contains NaN")
    ok = torch.isfinite(lam) & torch.isfinite(val)
    k = torch.floor((torch.nan_to_num(lam, nan=logsnr_min) - logsnr_min) / width)
    k = k.clamp(0, bins - 1).long()
    sums = ema.new_zeros(bins).index_add_(0, k, torch.where(ok, val, torch.zeros_like(val)))
    counts = ema.new_zeros(bins).index_add_(0, k, ok.to(ema.dtype))
    mean = sums / counts.clamp_min(1)
    ema.copy_(torch.where(counts > 0, decay * ema + (1 - decay) * mean, ema))
    c = torch.cumsum(ema.clamp_min(0), 0)
    c = torch.cat([c.new_zeros(1), c / c[-1:]])
    cdf.copy_(torch.cat([c[:-1], c.new_ones(1)]))
