"""The one image-grid writer of vdmpp: training previews (vdmpp-train) and ``vdmpp-eval sample``.

Images are upscaled by an integer factor (nearest neighbour) so that an 8×8 digit is readable;
for a class-conditional model column k holds class k; a caption (step, sampler, ...) is drawn
above the grid and stored in the PNG's ``Description`` text chunk. Pillow and numpy only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["image_grid", "save_grid"]

MIN_CELL = 64  # px: the upscaled side of one image is at least this


def _uint8_nhwc(images: Any) -> np.ndarray:
    """uint8 [N, H, W, C] from uint8 [N, H, W, C] (numpy) or a float tensor [N, C, H, W] in
    [−1, 1]."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 [N, H, W, C], got {images.dtype} {images.shape}")
        return images
    import torch

    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(
    images: Any,
    *,
    labels: Any = None,
    num_classes: int | None = None,
    cols: int | None = None,
    scale: int = 0,
) -> np.ndarray:
    """uint8 [rows·(h+1)+1, cols·(w+1)+1, C] (1-pixel white gaps), upscaled ×``scale``.

    With ``labels`` and ``num_classes`` the columns are the classes (image i goes to column
    labels[i], filling it downwards); else row-major with ``cols`` (default ≈ √N) columns.
    ``scale`` 0: the smallest factor making an image at least 64 px wide.
    """
    x = _uint8_nhwc(images)
    n, h, w, c = x.shape
    if labels is not None and num_classes:
        lab = np.asarray(labels).reshape(-1).astype(np.int64)
        if len(lab) != n or (lab < 0).any() or (lab >= num_classes).any():
            raise ValueError(f"labels must be {n} class indices in [0, {num_classes})")
        cols = int(num_classes)
        row_of = np.zeros(n, np.int64)
        seen = np.zeros(cols, np.int64)
        for i, k in enumerate(lab):
            row_of[i], seen[k] = seen[k], seen[k] + 1
        place = list(zip(row_of.tolist(), lab.tolist()))
        rows = max(int(seen.max()) if n else 1, 1)
    else:
        cols = cols or max(1, math.ceil(math.sqrt(n)))
        rows = max(1, math.ceil(n / cols))
        place = [divmod(k, cols) for k in range(n)]
    scale = scale or max(1, math.ceil(MIN_CELL / max(h, w)))
    canvas = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 255, np.uint8)
    for k, (r, q) in enumerate(place):
        y0, x0 = 1 + r * (h + 1), 1 + q * (w + 1)
        canvas[y0 : y0 + h, x0 : x0 + w] = x[k]
    return canvas.repeat(scale, 0).repeat(scale, 1)


def save_grid(
    images: Any,
    path: str | Path,
    *,
    labels: Any = None,
    num_classes: int | None = None,
    cols: int | None = None,
    scale: int = 0,
    caption: str | None = None,
) -> Path:
    """Write :func:`image_grid` as a PNG, with ``caption`` drawn above it and stored as the
    PNG's ``Description``; return the path."""
    from PIL import Image, ImageDraw, ImageFont
    from PIL.PngImagePlugin import PngInfo

    grid = image_grid(images, labels=labels, num_classes=num_classes, cols=cols, scale=scale)
    img = Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid)
    info = PngInfo()
    if caption:
        font = ImageFont.load_default()
        left, top, right, bottom = ImageDraw.Draw(img).textbbox((0, 0), caption, font=font)
        strip = bottom - top + 8
        out = Image.new(img.mode, (max(img.width, right - left + 8), img.height + strip), 255)
        out.paste(img, (0, strip))
        ImageDraw.Draw(out).text((4, 4 - top), caption, fill=0, font=font)
        img = out
        info.add_text("Description", caption)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, pnginfo=info)
    return path
