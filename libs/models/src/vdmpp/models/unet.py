"""ADM U-Net conditioned on log-SNR λ (Dhariwal & Nichol 2021; VDM's variant, VDM App. B–C).

Encoder: per level `num_res_blocks` residual blocks (+ self-attention where the feature map's
resolution is in `attention_resolutions`), then a down-sampling step (a down-sampling residual
block when `resblock_updown`, ADM's BigGAN-style choice, else a stride-2 convolution).
Middle: residual block, attention, residual block. Decoder: mirror image with
`num_res_blocks + 1` blocks per level, each taking a skip connection from the encoder.

Conditioning: λ → c_noise(λ) = −λ/8 → sinusoidal embedding → MLP, plus a learned class embedding
with `num_classes + 1` rows; row `num_classes` is the null class used when `class_labels` is
None (classifier-free guidance). Optional Fourier-feature input channels (VDM App. C).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .embeddings import LogSNREmbedding, fourier_channels, fourier_features
from .layers import (
    Attention2d,
    Downsample,
    GroupNorm,
    ResBlock,
    Upsample,
    check_input,
    class_embedding_input,
    zero_,
)

__all__ = ["UNet"]


class UNet(nn.Module):
    """ADM-style U-Net, called as `net(z, logsnr, class_labels=None)` → tensor shaped like z.

    Args:
        in_channels: channels of z.
        resolution: the side of the images it is built for (decides where attention sits; any
            size divisible by the down-sampling factor 2^(len(channel_mult)−1) runs).
        model_channels: width of the first level; level i has model_channels·channel_mult[i].
        out_channels: output channels (default: in_channels).
        num_res_blocks: residual blocks per encoder level (decoder: one more).
        attention_resolutions: feature-map sides with self-attention (the middle always has it).
        head_channels: channels per attention head (ADM's num_head_channels = 64).
        dropout: dropout rate inside the residual blocks (ADM ImageNet-64, VDM: 0.1).
        num_classes: number of classes, or None for an unconditional network.
        resblock_updown: resample with residual blocks (ADM) instead of plain convolutions.
        fourier_features: (n_min, n_max) to append VDM Fourier features, or None.
        name: the config name used in error messages.
    """

    def __init__(
        self,
        in_channels: int = 3,
        resolution: int = 32,
        model_channels: int = 128,
        out_channels: int | None = None,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        head_channels: int = 64,
        dropout: float = 0.0,
        num_classes: int | None = None,
        resblock_updown: bool = True,
        fourier_features: tuple[int, int] | None = None,
        name: str = "UNet",
    ) -> None:
        super().__init__()
        self.name = name
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.resolution = resolution
        self.num_classes = num_classes
        self.fourier = tuple(fourier_features) if fourier_features is not None else None
        self.factor = 2 ** (len(channel_mult) - 1)
        if resolution % self.factor:
            raise ValueError(
                f"{name}: resolution {resolution} is not divisible by the down-sampling factor "
                f"{self.factor} of channel_mult={tuple(channel_mult)}"
            )
        emb_dim = 4 * model_channels
        self.logsnr_emb = LogSNREmbedding(model_channels, emb_dim)
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None

        extra = fourier_channels(in_channels, *self.fourier) if self.fourier else 0
        ch = model_channels * channel_mult[0]
        self.conv_in = nn.Conv2d(in_channels + extra, ch, 3, padding=1)

        attn = set(attention_resolutions)
        block = dict(emb_dim=emb_dim, dropout=dropout)
        self.down = nn.ModuleList()
        skips = [ch]
        res = resolution
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = nn.ModuleList([ResBlock(ch, channels_out=model_channels * mult, **block)])
                ch = model_channels * mult
                if res in attn:
                    layers.append(Attention2d(ch, head_channels))
                self.down.append(layers)
                skips.append(ch)
            if level != len(channel_mult) - 1:
                down = ResBlock(ch, down=True, **block) if resblock_updown else Downsample(ch, ch)
                self.down.append(nn.ModuleList([down]))
                skips.append(ch)
                res //= 2

        self.mid = nn.ModuleList(
            [ResBlock(ch, **block), Attention2d(ch, head_channels), ResBlock(ch, **block)]
        )

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                out = model_channels * mult
                layers = nn.ModuleList([ResBlock(ch + skips.pop(), channels_out=out, **block)])
                ch = out
                if res in attn:
                    layers.append(Attention2d(ch, head_channels))
                if level and i == num_res_blocks:
                    layers.append(
                        ResBlock(ch, up=True, **block) if resblock_updown else Upsample(ch, ch)
                    )
                    res *= 2
                self.up.append(layers)

        self.norm_out = GroupNorm(ch)
        self.conv_out = zero_(nn.Conv2d(ch, self.out_channels, 3, padding=1))

    def forward(self, z: Tensor, logsnr: Tensor, class_labels: Tensor | None = None) -> Tensor:
        logsnr = check_input(self.name, z, logsnr, self.in_channels, self.factor)
        emb = self.logsnr_emb(logsnr)
        labels = class_embedding_input(
            self.name, class_labels, self.num_classes, z.shape[0], z.device
        )
        if self.class_emb is not None:
            emb = emb + self.class_emb(labels)

        h = z
        if self.fourier is not None:
            h = _with_fourier(z, self.fourier)
        h = self.conv_in(h)
        hs = [h]
        for layers in self.down:
            for layer in layers:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for layers in self.up:
            h = _cat(h, hs.pop())
            for layer in layers:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def _cat(h: Tensor, skip: Tensor) -> Tensor:
    # under autocast the skip may be float32 (GroupNorm output) while h is bf16, or vice versa
    return torch.cat([h, skip.to(h.dtype)], dim=1)


def _with_fourier(z: Tensor, bands: tuple[int, int]) -> Tensor:
    """[z, Fourier features of z] along channels (features in float32, cast to z's dtype)."""
    return torch.cat([z, fourier_features(z, *bands).to(z.dtype)], dim=1)
