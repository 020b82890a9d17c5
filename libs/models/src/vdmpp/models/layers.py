"""Building blocks shared by the U-Net and the U-ViT (Dhariwal & Nichol 2021, "ADM").

* GroupNorm is computed in float32 and cast back, so the blocks are safe under bf16 autocast.
* Residual blocks take the conditioning embedding through scale-shift ("AdaGN"):
  h = GN(h)·(1 + scale) + shift, as ADM's `use_scale_shift_norm=True`.
* Self-attention uses `F.scaled_dot_product_attention` (flash / memory-efficient kernels on
  GPU, one fused call on CPU) with heads of `head_channels` channels.
* The last layer of every residual branch is zero-initialised (ADM's `zero_module`), so a fresh
  block is the identity and a fresh network outputs zeros.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["Attention2d", "Downsample", "GroupNorm", "ResBlock", "Upsample", "zero_"]


def zero_(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` in place and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def num_groups(channels: int, max_groups: int = 32) -> int:
    """Largest divisor of `channels` that is at most `max_groups` (32 as in ADM when it divides)."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


class GroupNorm(nn.GroupNorm):
    """GroupNorm evaluated in float32 (ADM's GroupNorm32), output in the input's dtype."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__(num_groups(channels), channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 convolution (if `channels_out` is given)."""

    def __init__(self, channels: int, channels_out: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels_out, 3, padding=1) if channels_out else None

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class Downsample(nn.Module):
    """Stride-2 3×3 convolution (if `channels_out` is given), else 2×2 average pooling."""

    def __init__(self, channels: int, channels_out: int | None = None) -> None:
        super().__init__()
        self.conv = (
            nn.Conv2d(channels, channels_out, 3, stride=2, padding=1) if channels_out else None
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) if self.conv is not None else F.avg_pool2d(x, 2)


class ResBlock(nn.Module):
    """ADM residual block with scale-shift conditioning, dropout and optional up/down sampling."""

    def __init__(
        self,
        channels: int,
        emb_dim: int,
        channels_out: int | None = None,
        dropout: float = 0.0,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        channels_out = channels_out or channels
        self.norm1 = GroupNorm(channels)
        self.resample = Upsample(channels) if up else Downsample(channels) if down else None
        self.conv1 = nn.Conv2d(channels, channels_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * channels_out)
        self.norm2 = GroupNorm(channels_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_(nn.Conv2d(channels_out, channels_out, 3, padding=1))
        self.skip = (
            nn.Identity() if channels_out == channels else nn.Conv2d(channels, channels_out, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = F.silu(self.norm1(x))
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = self.conv1(h)
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention2d(nn.Module):
    """Multi-head self-attention over the H·W positions of a feature map (pre-norm, residual)."""

    def __init__(self, channels: int, head_channels: int = 64) -> None:
        super().__init__()
        if channels % head_channels:
            head_channels = channels  # one head when the width is not a multiple
        self.heads = channels // head_channels
        self.norm = GroupNorm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.permute(1, 0, 2, 4, 3).unbind(0)  # each [B, heads, HW, d]
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.permute(0, 1, 3, 2).reshape(b, c, h, w)
        return x + self.proj(out)


def check_input(
    name: str, z: Tensor, logsnr: Tensor, in_channels: int, factor: int, exact: int | None = None
) -> Tensor:
    """Validate (z, λ) for a network called `name`; returns λ broadcast to shape [batch].

    Raises ValueError naming the config for a wrong rank, channel count, spatial size, or λ shape.
    Only static shapes are inspected, so this costs no host sync and no graph break.
    """
    if z.ndim != 4:
        raise ValueError(
            f"{name}: expected z of shape [batch, channels, H, W], got {tuple(z.shape)}"
        )
    b, c, h, w = z.shape
    if c != in_channels:
        raise ValueError(
            f"{name}: expected {in_channels} input channels, got {c} (z {tuple(z.shape)})"
        )
    if exact is not None and (h != exact or w != exact):
        raise ValueError(f"{name}: built for {exact}x{exact} inputs, got {h}x{w}")
    if h % factor or w % factor:
        raise ValueError(
            f"{name}: spatial size {h}x{w} is not divisible by the down-sampling factor {factor}"
        )
    if logsnr.ndim == 0:
        logsnr = logsnr.expand(b)
    if logsnr.shape != (b,):
        raise ValueError(
            f"{name}: logsnr must have shape [batch] = [{b}], got {tuple(logsnr.shape)}"
        )
    return logsnr


def class_embedding_input(
    name: str,
    class_labels: Tensor | None,
    num_classes: int | None,
    batch: int,
    device: torch.device,
) -> Tensor | None:
    """Class indices for the embedding: None → the null class `num_classes` (for CFG)."""
    if num_classes is None:
        if class_labels is not None:
            raise ValueError(f"{name}: unconditional network got class_labels")
        return None
    if class_labels is None:
        return torch.full((batch,), num_classes, dtype=torch.long, device=device)
    if class_labels.shape != (batch,):
        raise ValueError(
            f"{name}: class_labels must have shape [batch] = [{batch}], "
            f"got {tuple(class_labels.shape)}"
        )
    return class_labels.long()
