"""Conditioning inputs: the noise-level embedding of λ and VDM's Fourier-feature input channels.

* λ is process independent, so every network here is conditioned on it directly. Before the
  sinusoidal embedding it is rescaled to EDM's noise conditioning (EDM Table 1),
  c_noise = ¼ ln σ with σ = e^{−λ/2}, i.e. c_noise(λ) = −λ/8: λ ∈ [−20, 20] maps to
  [2.5, −2.5], a range of the same size as VDM's "λ rescaled to roughly [0, 1]" (VDM
  App. B.1) times a few.
* Fourier features (VDM App. C, eq. 34): f^n = sin(z·2^n·π), g^n = cos(z·2^n·π) for
  n ∈ {n_min, …, n_max} applied to every scalar of the input, concatenated as extra channels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "LogSNREmbedding",
    "c_noise_from_logsnr",
    "fourier_channels",
    "fourier_features",
    "sinusoidal_embedding",
]


def c_noise_from_logsnr(logsnr: Tensor) -> Tensor:
    """EDM's c_noise = ¼ ln σ written in λ: σ = e^{−λ/2} gives c_noise = −λ/8 (EDM Table 1)."""
    return -0.125 * logsnr


def sinusoidal_embedding(x: Tensor, dim: int, max_freq: float = 200.0) -> Tensor:
    """[cos(f_k·x), sin(f_k·x)] for dim/2 frequencies f_k geometric in [1, max_freq], in float32.

    With x = c_noise = −λ/8, the highest frequency turns 25 rad per unit of λ and the lowest
    1/8 rad, so the embedding resolves λ finely and is still non-periodic over [−20, 20].
    """
    if dim % 2:
        raise ValueError(f"embedding dim must be even, got {dim}")
    half = dim // 2
    exponent = torch.arange(half, device=x.device, dtype=torch.float32) / max(half - 1, 1)
    freqs = torch.exp(exponent * math.log(max_freq))
    args = x.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class LogSNREmbedding(nn.Module):
    """λ → c_noise(λ) = −λ/8 → sinusoids → 2-layer MLP (the ADM/DDPM "time" embedding)."""

    def __init__(self, channels: int, emb_dim: int, max_freq: float = 200.0) -> None:
        super().__init__()
        self.channels = channels
        self.max_freq = max_freq
        self.mlp = nn.Sequential(
            nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

    def forward(self, logsnr: Tensor) -> Tensor:
        return self.mlp(
            sinusoidal_embedding(c_noise_from_logsnr(logsnr), self.channels, self.max_freq)
        )


def fourier_features(z: Tensor, n_min: int = 7, n_max: int = 8) -> Tensor:
    """VDM Fourier features (VDM eq. 34): z [B, C, H, W] → [B, 2·N·C, H, W], N = n_max−n_min+1.

    Channel layout: index (k·N + i)·C + c holds sin (k = 0) or cos (k = 1) of z[:, c]·2^{n_min+i}·π.
    Computed in at least float32 (the arguments reach 2^8·π·|z|; bf16 would alias them; float64
    stays float64) and returned in that dtype, so autocast casts them once at the input conv.
    """
    if n_max < n_min:
        raise ValueError(f"fourier features need n_min <= n_max, got {n_min} > {n_max}")
    b, c, h, w = z.shape
    dtype = z.dtype if z.dtype == torch.float64 else torch.float32
    n = torch.arange(n_min, n_max + 1, device=z.device, dtype=dtype)
    freqs = (2.0**n) * math.pi
    args = z.to(dtype).unsqueeze(1) * freqs.view(1, -1, 1, 1, 1)  # [B, N, C, H, W]
    feats = torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # [B, 2N, C, H, W]
    return feats.reshape(b, feats.shape[1] * c, h, w)


def fourier_channels(in_channels: int, n_min: int = 7, n_max: int = 8) -> int:
    """Number of channels fourier_features adds to an input with in_channels channels."""
    return 2 * (n_max - n_min + 1) * in_channels
