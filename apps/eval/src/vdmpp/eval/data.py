"""Image sets for metrics and bits/dim: the built-in digits, WebDataset shards, .npz, sample dirs.

Every loader returns ``(images, labels)``: uint8 ``[N, H, W, C]`` and int64 ``[N]`` (−1 where a
set has no labels). Nothing is unpickled (``np.load(allow_pickle=False)``, PNG decoding only).

The digits split is ``vdmpp.train.data.digits_images``'s: every 5th image (i % 5 == 0, 360
images) is ``test``, the rest (1437) ``train``. vdmpp-train and the digits classifier
(``digits.py``) train on ``train`` only; metrics and bits/dim use the held-out ``test``.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from .model import EvalError

__all__ = ["digits", "load_images"]


def digits(split: str = "test", resolution: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The built-in digits at ``resolution`` (vdmpp-train's preprocessing), one split."""
    from vdmpp.train.data import DIGITS_SPLITS, digits_images

    if split not in DIGITS_SPLITS:
        raise EvalError(f"digits split must be train, test or all, got {split!r}")
    return digits_images(resolution, split)


def _from_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z.files:
                raise EvalError(f"{path}: an .npz needs an 'images' array (has {z.files})")
            images = z["images"]
            labels = z["labels"] if "labels" in z.files else None
    except (ValueError, OSError) as e:
        raise EvalError(f"{path}: not a readable .npz without pickles: {e}") from None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise EvalError(
            f"{path}: 'images' must be uint8 [N, H, W, C], got {images.dtype} {images.shape}"
        )
    if images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
        images = images.transpose(0, 2, 3, 1)  # [N, C, H, W] → [N, H, W, C]
    if labels is None:
        labels = np.full(len(images), -1, np.int64)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _from_shards(urls: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Every ``<key>.png`` (+ ``<key>.cls``) of the tar shards, in shard and member order."""
    images: list[np.ndarray] = []
    labels: list[int] = []
    for url in urls:
        pngs: dict[str, bytes] = {}
        classes: dict[str, int] = {}
        try:
            with tarfile.open(url) as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, _, ext = m.name.partition(".")
                    if ext in ("png", "cls"):
                        data = tar.extractfile(m).read()  # type: ignore[union-attr]
                        if ext == "png":
                            pngs[key] = data
                        else:
                            try:
                                classes[key] = int(data.decode("ascii").strip())
                            except (UnicodeDecodeError, ValueError):
                                raise EvalError(
                                    f"{url}: {m.name}: not an integer class label: {data[:20]!r}"
                                ) from None
        except (tarfile.TarError, OSError) as e:
            raise EvalError(f"{url}: not a readable tar shard: {e}") from None
        for key, data in pngs.items():
            try:
                with Image.open(io.BytesIO(data)) as im:
                    arr = np.asarray(im.convert("L" if im.mode in ("L", "1", "P") else "RGB"))
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise EvalError(f"{url}: {key}.png: not a readable image ({e})") from None
            images.append(arr[..., None] if arr.ndim == 2 else arr)
            labels.append(classes.get(key, -1))
    if not images:
        raise EvalError(f"no .png samples in {len(urls)} shard(s), e.g. {urls[0]}")
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise EvalError(f"shards hold images of several shapes: {sorted(shapes)[:4]}")
    return np.stack(images), np.asarray(labels, np.int64)


def load_images(
    spec: str | Path, resolution: int | None = None, num_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Images from ``digits`` / ``digits:train`` / ``digits:all``, an .npz, a ``vdmpp-eval sample``
    output directory, a directory of ``*.tar`` shards, or a shard brace pattern.

    With ``num_classes``, a label outside [0, num_classes) (−1: none) is an :class:`EvalError`.
    """
    images, labels = _load_images(spec, resolution)
    if num_classes is not None and len(labels):
        bad = (labels < -1) | (labels >= int(num_classes))
        if bad.any():
            raise EvalError(
                f"{spec}: label {int(labels[bad][0])} is outside the model's "
                f"{num_classes} classes [0, {int(num_classes)})"
            )
    return images, labels


def _load_images(spec: str | Path, resolution: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    spec = str(spec)
    if spec == "digits" or spec.startswith("digits:"):
        split = spec.partition(":")[2] or "test"
        return digits(split, resolution or 8)
    path = Path(spec)
    if path.is_file() and path.suffix == ".npz":
        return _from_npz(path)
    if path.is_dir() and (path / "samples.npz").is_file():
        return _from_npz(path / "samples.npz")
    if path.is_dir() and (path / "chunks").is_dir():
        raise EvalError(
            f"{path}: sampling is not finished (no samples.npz); rerun "
            "`vdmpp-eval sample` with the same arguments to complete it"
        )
    from vdmpp.train.config import ConfigError
    from vdmpp.train.data import expand_source

    if not path.exists() and "{" not in spec:
        raise EvalError(
            f"{spec}: no such data (expected 'digits', an .npz, a sample directory, "
            "a directory of .tar shards or a shard pattern like data-{000..009}.tar)"
        )
    try:
        urls = expand_source(spec)
    except ConfigError as e:
        raise EvalError(str(e).replace("data.source", "data")) from None
    return _from_shards(urls)
