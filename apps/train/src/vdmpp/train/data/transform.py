"""Per-image transforms of ``vdmpp-train shards``: channel handling, centre crop + resize, PNG.

EDM's ``center-crop`` (Karras et al. 2022, ``dataset_tool.py``): the central square, resized
with Lanczos. Channels: a grey image in a colour set is replicated; a colour image in a grey set
is :class:`Skip`-ped ("wrong mode") unless the channel count was forced (then converted to luma);
16-bit and float images are skipped.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

__all__ = [
    "COLOUR_MODES",
    "GREY_MODES",
    "TRANSFORM",
    "Skip",
    "convert_mode",
    "fit",
    "fit_array",
    "mode_channels",
    "png_bytes",
    "to_channels",
]

GREY_MODES = {"1", "L", "LA"}
COLOUR_MODES = {"RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "La"}
TRANSFORM = "centre crop to a square, Lanczos resize (EDM dataset_tool center-crop)"


class Skip(Exception):
    """An input image that is left out (and reported)."""


def mode_channels(mode: str) -> int | None:
    """1 for a grey PIL mode, 3 for a colour one, None for one that is not converted."""
    if mode in GREY_MODES:
        return 1
    if mode in COLOUR_MODES:
        return 3
    return None


def convert_mode(img: Image.Image, channels: int, forced: bool) -> Image.Image:
    """``img`` as L (``channels`` 1) or RGB (3); :class:`Skip` when it is not converted."""
    mode = img.mode
    if mode in GREY_MODES:
        return img.convert("L" if channels == 1 else "RGB")
    if mode not in COLOUR_MODES:
        raise Skip(f"wrong mode {mode} (16-bit or float images are not converted)")
    if channels == 1 and not forced:
        raise Skip(
            f"wrong mode {mode}: a colour image in a 1-channel set (pass --channels 3, "
            "or --channels 1 to convert to grey)"
        )
    if mode in ("P", "PA"):
        img = img.convert("RGBA" if "transparency" in img.info or mode == "PA" else "RGB")
    return img.convert("L" if channels == 1 else "RGB")


def _image(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def _array(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img)
    return arr[..., None] if arr.ndim == 2 else arr


def to_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """A uint8 [H, W, 1|3] array with ``channels`` channels (grey replicated, colour → luma)."""
    if arr.shape[-1] == channels:
        return arr
    return _array(_image(arr).convert("L" if channels == 1 else "RGB"))


def fit(img: Image.Image, resolution: int) -> Image.Image:
    """EDM's ``center-crop``: the central square, resized with Lanczos."""
    w, h = img.size
    if (w, h) == (resolution, resolution):
        return img
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    if s != w or s != h:
        img = img.crop((left, top, left + s, top + s))
    return img.resize((resolution, resolution), Image.Resampling.LANCZOS)


def fit_array(arr: np.ndarray, resolution: int) -> np.ndarray:
    """:func:`fit` of a uint8 [H, W, 1|3] array."""
    if arr.shape[:2] == (resolution, resolution):
        return arr
    return _array(fit(_image(arr), resolution))


def png_bytes(arr: np.ndarray) -> bytes:
    """8-bit PNG of a uint8 [H, W, 1|3] array (deterministic bytes)."""
    buf = io.BytesIO()
    _image(arr).save(buf, format="PNG")
    return buf.getvalue()
