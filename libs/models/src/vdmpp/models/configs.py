"""Named network configs, `build(name, **overrides)` and their parameter counts.

| name    | network | data               | follows                                              |
| ------- | ------- | ------------------ | ---------------------------------------------------- |
| tiny    | UNet    | 1×8×8 (or 16×16)   | 2-core CPU in minutes (sklearn digits), 0.83M params |
| cifar32 | UNet    | 3×32×32, 10 cls    | DDPM++/EDM CIFAR-10: 128 ch ×(2,2,2), 4 blocks, 61M  |
| adm64   | UNet    | 3×64×64, 1000 cls  | ADM ImageNet-64: 192 ch ×(1,2,3,4), 3 blocks, 296M   |
| uvit128 | UViT    | 3×128×128, 1000    | simple diffusion: 3 conv stages, 12×768 ViT, 151M    |

`PARAM_COUNTS` holds the count of each config as built here (a test keeps it honest).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .unet import UNet
from .uvit import UViT

__all__ = ["CONFIGS", "PARAM_COUNTS", "build", "param_count"]

CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        arch="unet",
        in_channels=1,
        resolution=8,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        head_channels=32,
        dropout=0.0,
        num_classes=10,
    ),
    "cifar32": dict(
        arch="unet",
        in_channels=3,
        resolution=32,
        model_channels=128,
        channel_mult=(2, 2, 2),
        num_res_blocks=4,
        attention_resolutions=(16,),
        head_channels=64,
        dropout=0.1,
        num_classes=10,
    ),
    "adm64": dict(
        arch="unet",
        in_channels=3,
        resolution=64,
        model_channels=192,
        channel_mult=(1, 2, 3, 4),
        num_res_blocks=3,
        attention_resolutions=(32, 16, 8),
        head_channels=64,
        dropout=0.1,
        num_classes=1000,
    ),
    "uvit128": dict(
        arch="uvit",
        in_channels=3,
        resolution=128,
        channels=(128, 256, 512),
        num_res_blocks=2,
        width=768,
        depth=12,
        heads=12,
        dropout=0.1,
        num_classes=1000,
    ),
}

PARAM_COUNTS: dict[str, int] = {
    "tiny": 827_745,
    "cifar32": 61_457_411,
    "adm64": 295_900_035,
    "uvit128": 151_051_011,
}

_ARCHS = {"unet": UNet, "uvit": UViT}


def config(name: str, /, **overrides: Any) -> dict[str, Any]:
    """The keyword arguments `build(name, **overrides)` passes to the network class."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model config {name!r}; expected one of {sorted(CONFIGS)}")
    kw = {**CONFIGS[name], **overrides}
    kw.setdefault("name", name)
    return kw


def build(name: str, /, **overrides: Any) -> nn.Module:
    """Build the network of config `name`; `overrides` replace any of its keyword arguments.

    `arch` ("unet" or "uvit") may be overridden too; `name=` renames the network (it is the
    name its error messages use, by default the config's).
    """
    kw = config(name, **overrides)
    arch = kw.pop("arch")
    if arch not in _ARCHS:
        raise ValueError(f"{name}: unknown arch {arch!r}; expected one of {sorted(_ARCHS)}")
    return _ARCHS[arch](**kw)


def param_count(name: str, /, **overrides: Any) -> int:
    """Parameters of `build(name, **overrides)`, counted on the meta device (no memory)."""
    with torch.device("meta"):
        net = build(name, **overrides)
    return sum(p.numel() for p in net.parameters())
