"""U-ViT of simple diffusion (Hoogeboom, Heek & Salimans 2023), conditioned on log-SNR λ.

Convolutional residual stages bring the image down to a low resolution (each stage halves the
side), a stack of transformer blocks processes the tokens there, and mirrored up stages come
back with skip connections. Attention is `F.scaled_dot_product_attention`. Transformer blocks
are pre-LayerNorm with scale-shift conditioning on the λ/class embedding (the token analogue of
the residual blocks' AdaGN) and zero-initialised output projections.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .embeddings import LogSNREmbedding
from .layers import GroupNorm, ResBlock, check_input, class_embedding_input, zero_

__all__ = ["UViT"]


class TransformerBlock(nn.Module):
    """Pre-norm transformer block; the embedding gives scale and shift for both LayerNorms."""

    def __init__(self, width: int, heads: int, emb_dim: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = zero_(nn.Linear(width, width))
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            zero_(nn.Linear(hidden, width)),
        )
        self.emb = nn.Linear(emb_dim, 4 * width)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        b, n, c = x.shape
        s1, b1, s2, b2 = self.emb(F.silu(emb))[:, None, :].chunk(4, dim=-1)
        h = self.norm1(x) * (1 + s1) + b1
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(h)
        return x + self.mlp(self.norm2(x) * (1 + s2) + b2)


class UViT(nn.Module):
    """Simple diffusion's U-ViT, called as `net(z, logsnr, class_labels=None)` → shaped like z.

    Args:
        in_channels: channels of z.
        resolution: image side it is built for (inputs must be exactly this size: the
            transformer's position embedding is learned for resolution / 2^len(channels) tokens).
        channels: width of each convolutional stage; each is followed by a ×2 down-sampling.
        num_res_blocks: residual blocks per stage (encoder and decoder).
        width, depth, heads, mlp_ratio: the transformer at the lowest resolution.
        dropout: dropout in residual blocks and transformer MLPs.
        num_classes: number of classes (null class = num_classes), or None.
        name: the config name used in error messages.
    """

    def __init__(
        self,
        in_channels: int = 3,
        resolution: int = 128,
        channels: Sequence[int] = (128, 256, 512),
        num_res_blocks: int = 2,
        width: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        num_classes: int | None = None,
        out_channels: int | None = None,
        name: str = "UViT",
    ) -> None:
        super().__init__()
        self.name = name
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.resolution = resolution
        self.num_classes = num_classes
        self.factor = 2 ** len(channels)
        if resolution % self.factor:
            raise ValueError(
                f"{name}: resolution {resolution} is not divisible by the down-sampling factor "
                f"{self.factor} of {len(channels)} stages"
            )
        if width % heads:
            raise ValueError(f"{name}: transformer width {width} is not divisible by {heads} heads")
        emb_dim = 4 * channels[0]
        self.logsnr_emb = LogSNREmbedding(channels[0], emb_dim)
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        block = dict(emb_dim=emb_dim, dropout=dropout)

        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for i, ch in enumerate(channels):
            self.down.append(nn.ModuleList([ResBlock(ch, **block) for _ in range(num_res_blocks)]))
            nxt = channels[i + 1] if i + 1 < len(channels) else width
            self.downsample.append(nn.Conv2d(ch, nxt, 3, stride=2, padding=1))

        side = resolution // self.factor
        self.pos = nn.Parameter(torch.randn(1, side * side, width) * 0.02)
        self.blocks = nn.ModuleList(
            TransformerBlock(width, heads, emb_dim, mlp_ratio, dropout) for _ in range(depth)
        )
        self.norm_mid = nn.LayerNorm(width)

        self.upsample = nn.ModuleList()
        self.up = nn.ModuleList()
        for i in reversed(range(len(channels))):
            ch = channels[i]
            prev = channels[i + 1] if i + 1 < len(channels) else width
            self.upsample.append(nn.Conv2d(prev, ch, 3, padding=1))
            self.up.append(
                nn.ModuleList(
                    [ResBlock(2 * ch, channels_out=ch, **block) for _ in range(num_res_blocks)]
                )
            )
        self.norm_out = GroupNorm(channels[0])
        self.conv_out = zero_(nn.Conv2d(channels[0], self.out_channels, 3, padding=1))

    def forward(self, z: Tensor, logsnr: Tensor, class_labels: Tensor | None = None) -> Tensor:
        logsnr = check_input(self.name, z, logsnr, self.in_channels, self.factor, self.resolution)
        emb = self.logsnr_emb(logsnr)
        labels = class_embedding_input(
            self.name, class_labels, self.num_classes, z.shape[0], z.device
        )
        if self.class_emb is not None:
            emb = emb + self.class_emb(labels)

        h = self.conv_in(z)
        skips = []
        for blocks, down in zip(self.down, self.downsample):
            for blk in blocks:
                h = blk(h, emb)
                skips.append(h)
            h = down(h)

        b, c, hh, ww = h.shape
        t = h.flatten(2).transpose(1, 2) + self.pos.to(h.dtype)
        for blk in self.blocks:
            t = blk(t, emb)
        h = self.norm_mid(t).transpose(1, 2).reshape(b, c, hh, ww)

        for up, blocks in zip(self.upsample, self.up):
            h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
            for blk in blocks:
                skip = skips.pop()
                h = blk(torch.cat([h, skip.to(h.dtype)], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))
