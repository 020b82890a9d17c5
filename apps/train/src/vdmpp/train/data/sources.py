"""The data sets ``vdmpp-train shards`` reads, one iterator of records each (EDM's ``open_*``).

- ``digits``: scikit-learn's digits, built in (``--split train|test|all``);
- a folder of images (PNG/JPEG/..., recursive): unlabeled when images lie directly in it;
- a class-folder tree (``ROOT/<class>/**/*.png``): labels are the sorted class-folder indices;
- a CIFAR-10 / CIFAR-100 python tarball or its extracted folder (``--split train|test``; CIFAR-100
  with its fine labels), read by :mod:`.cifar`'s restricted unpickler;
- an ``.npz`` (``images``/``x`` [N, H, W, C] or [N, C, H, W], optional ``labels``/``y``), read with
  ``allow_pickle=False`` by :func:`load_npz`, the one ``.npz`` image reader of vdmpp.

:func:`open_source` returns a :class:`Source`; ``source.records(channels, forced)`` yields one
:class:`Record` per item (uint8 [H, W, C] at the source's size, label), in item order.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from ..errors import ConfigError
from .cifar import cifar_dir, read_cifar
from .transform import Skip, convert_mode, mode_channels, to_channels

__all__ = [
    "DIGITS_SPLITS",
    "IMAGE_SUFFIXES",
    "SRC_KINDS",
    "ArraySource",
    "FileSource",
    "Record",
    "Source",
    "digits_images",
    "folder_items",
    "load_npz",
    "open_cifar",
    "open_digits",
    "open_folder",
    "open_npz",
    "open_source",
    "read_cifar",
    "read_image",
]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
DIGITS_SPLITS = ("train", "test", "all")
SRC_KINDS = (
    "SRC: an image folder, a class-folder tree, a CIFAR-10/100 python tarball, an .npz or 'digits'"
)


class Record(NamedTuple):
    """One item of a source: ``image`` uint8 [H, W, C] (None when skipped, with ``why``)."""

    image: np.ndarray | None
    label: int | None
    name: str
    why: str = ""


@dataclass(eq=False)
class Source:
    """A data set known before decoding: its kind, classes and items (picklable)."""

    kind: str
    classes: list[str] | None
    split: str | None

    def __len__(self) -> int:
        raise NotImplementedError

    def subset(self, idx: Sequence[int]) -> Source:
        """The items at ``idx``, in that order (what one shard part writes)."""
        raise NotImplementedError

    def peek(self) -> tuple[int, int] | None:
        """(side, channels) of the first usable item; None when there is none."""
        raise NotImplementedError

    def records(self, channels: int | None = None, forced: bool = False) -> Iterator[Record]:
        """Every item as a :class:`Record`, with ``channels`` channels (None: its own).
        ``forced``: a colour file in a 1-channel set is converted, not skipped."""
        raise NotImplementedError

    def first_failures(self, k: int = 3) -> list[tuple[str, str]]:
        """(name, why) of the unusable ones among the first ``k`` items."""
        return []


@dataclass(eq=False)
class ArraySource(Source):
    """Images already in memory (digits, CIFAR, ``.npz``): nothing is skipped."""

    images: np.ndarray = field(default_factory=lambda: np.zeros((0, 1, 1, 1), np.uint8))
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: Sequence[int]) -> ArraySource:
        i = np.asarray(idx, dtype=np.int64)
        lab = None if self.labels is None else self.labels[i]
        return ArraySource(self.kind, self.classes, self.split, self.images[i], lab)

    def peek(self) -> tuple[int, int] | None:
        if not len(self.images):
            return None
        return min(self.images.shape[1:3]), self.images.shape[-1]

    def records(self, channels: int | None = None, forced: bool = False) -> Iterator[Record]:
        for j, arr in enumerate(self.images):
            label = None if self.labels is None else int(self.labels[j])
            img = arr if channels is None else to_channels(arr, channels)
            yield Record(img, label, f"{self.kind}[{j}]")


@dataclass(eq=False)
class FileSource(Source):
    """Image files (a folder or a class-folder tree): unreadable ones are skipped records."""

    files: list[str] = field(default_factory=list)
    labels: list[int | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, idx: Sequence[int]) -> FileSource:
        files, labels = [self.files[i] for i in idx], [self.labels[i] for i in idx]
        return FileSource(self.kind, self.classes, self.split, files, labels)

    def peek(self) -> tuple[int, int] | None:
        for f in self.files:  # sorted order
            try:
                with Image.open(f) as im:
                    im.load()
                    w, h, mode = im.width, im.height, im.mode
            except Exception:
                continue
            ch = mode_channels(mode)
            if ch is not None:
                return min(w, h), ch
        return None

    def records(self, channels: int | None = None, forced: bool = False) -> Iterator[Record]:
        for f, label in zip(self.files, self.labels):
            try:
                yield Record(read_image(f, channels, forced), label, f)
            except Skip as e:
                yield Record(None, label, f, str(e))

    def first_failures(self, k: int = 3) -> list[tuple[str, str]]:
        head = FileSource(self.kind, self.classes, self.split, self.files[:k], self.labels[:k])
        return [(r.name, r.why) for r in islice(head.records(3, True), k) if r.image is None]


def read_image(path: str, channels: int | None = None, forced: bool = False) -> np.ndarray:
    """uint8 [H, W, C] of an image file (``channels`` None: 1 for grey, 3 for colour);
    :class:`Skip` when it is unreadable, corrupt or of a mode that is not converted."""
    try:
        with Image.open(path) as im:
            im.load()
            ch = channels if channels is not None else (mode_channels(im.mode) or 3)
            img = convert_mode(im, ch, forced or channels is None)
    except Skip:
        raise
    except Exception as e:  # PIL raises many types on corrupt files; never abort the run
        raise Skip(f"not a readable image ({type(e).__name__}: {e})") from None
    arr = np.asarray(img)
    return arr[..., None] if arr.ndim == 2 else arr


# --- digits ----------------------------------------------------------------------------------
def digits_images(resolution: int = 16, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (1797 8×8 images, 10 classes) as uint8 [N, res, res, 1].

    Pixel values 0..16 are scaled to 0..255, upscaled by the largest integer factor that fits
    (nearest neighbour, so strokes stay crisp) and zero-padded to the centre.

    The split (the one definition every vdmpp app uses): every 5th image (i % 5 == 0, 360
    images) is ``test``, the other 1437 are ``train``; training uses ``train`` so that
    vdmpp-eval's bits/dim and metrics on ``test`` are held out.
    """
    from sklearn.datasets import load_digits

    if resolution < 8:
        raise ConfigError(f"digits need a resolution >= 8, got {resolution}")
    if split not in DIGITS_SPLITS:
        raise ConfigError(f"digits split must be one of {DIGITS_SPLITS}, got {split!r}")
    d = load_digits()
    if split != "all":
        keep = (np.arange(len(d.target)) % 5 == 0) == (split == "test")
        d.images, d.target = d.images[keep], d.target[keep]
    img = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    f = resolution // 8
    img = img.repeat(f, axis=1).repeat(f, axis=2)
    pad = resolution - 8 * f
    lo = pad // 2
    img = np.pad(img, ((0, 0), (lo, pad - lo), (lo, pad - lo)))
    return img[..., None], d.target.astype(np.int64)


def open_digits(resolution: int = 16, split: str = "train") -> ArraySource:
    """The digits at ``resolution`` (see :func:`digits_images`)."""
    images, labels = digits_images(resolution, split)
    return ArraySource("digits", [str(i) for i in range(10)], split, images, labels)


# --- .npz ------------------------------------------------------------------------------------
NPZ_IMAGE_KEYS = ("images", "x", "arr_0")
NPZ_LABEL_KEYS = ("labels", "y", "arr_1")


def _nhwc(images: np.ndarray, where: str) -> np.ndarray:
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ConfigError(f"{where}: images must be [N, H, W, C] or [N, C, H, W]: {images.shape}")
    if images.shape[-1] not in (1, 3) and images.shape[1] in (1, 3):
        images = images.transpose(0, 2, 3, 1)
    if images.shape[-1] not in (1, 3):
        raise ConfigError(f"{where}: images need 1 or 3 channels (NHWC or NCHW): {images.shape}")
    return images


def load_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(uint8 [N, H, W, C], int64 labels >= 0 or None) from an ``.npz``.

    Images: the first of ``images``/``x``/``arr_0``, [N, H, W], [N, H, W, C] or [N, C, H, W] with
    1 or 3 channels; uint8, other integers, or floats in [0, 1], [-1, 1] or [0, 255] (rounded).
    Labels: the first of ``labels``/``y``/``arr_1``, N integers >= 0 ([N, 1] accepted). Pickled
    (object) arrays are refused. Every problem is a one-line :class:`ConfigError`.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            ik = next((k for k in NPZ_IMAGE_KEYS if k in keys), None)
            if ik is None:
                raise ConfigError(
                    f"{path}: no 'images' (or 'x', 'arr_0') array; has {sorted(keys)}"
                )
            images = z[ik]
            lk = next((k for k in NPZ_LABEL_KEYS if k in keys), None)
            labels = z[lk] if lk else None
    except ConfigError:
        raise
    except Exception as e:  # object arrays (pickles, refused), torn zips, not an npz at all
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(
            f"{path}: not a readable .npz of numeric arrays (pickled object "
            f"arrays are refused): {first}"
        ) from None
    if images.dtype.kind not in "uif" or (labels is not None and labels.dtype.kind not in "ui"):
        raise ConfigError(
            f"{path}: images must be numbers and labels integers, got "
            f"{images.dtype} / {None if labels is None else labels.dtype}"
        )
    if labels is not None:
        labels = labels.astype(np.int64)
        if labels.ndim == 2 and labels.shape[1] == 1:  # [N, 1] columns, as some tools save them
            labels = labels[:, 0]
        if labels.ndim != 1 or len(labels) != len(images) or (len(labels) and labels.min() < 0):
            raise ConfigError(
                f"{path}: labels must be {len(images)} integers >= 0, got shape {labels.shape}"
            )
    images = _nhwc(images, str(path))
    if images.dtype != np.uint8:
        if images.size and images.min() >= -1.0 and images.max() <= 1.0 and images.min() < 0:
            images = (images + 1.0) * 127.5  # [-1, 1] floats
        elif images.size and images.max() <= 1.0:
            images = images * 255.0
        images = np.round(images).clip(0, 255).astype(np.uint8)
    return images, labels


def open_npz(path: str | Path) -> ArraySource:
    """An ``.npz`` (see :func:`load_npz`); classes 0..max label when it has labels."""
    images, labels = load_npz(path)
    classes = None
    if labels is not None:
        classes = [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]
    return ArraySource("npz", classes, None, images, labels)


# --- CIFAR -----------------------------------------------------------------------------------
def open_cifar(path: str | Path, split: str = "train") -> ArraySource:
    """A CIFAR-10/100 python tarball or folder, one split (see :func:`.cifar.read_cifar`)."""
    images, labels, classes, kind = read_cifar(path, split)
    return ArraySource(kind, classes, split, images, labels)


# --- image folders ---------------------------------------------------------------------------
def _images_under(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and p.is_file()
        and not any(q.startswith(".") for q in p.relative_to(root).parts)
    )


def folder_items(
    root: Path, labels: str = "auto"
) -> tuple[list[tuple[str, int | None]], list[str] | None]:
    """([(file, label or None)], class names or None) of an image folder.

    ``labels``: ``"folders"`` (one sub-folder per class, sorted names → 0, 1, ...), ``"none"``
    (every image under ``root``, unlabeled), ``"auto"`` (folders unless images lie directly in
    ``root``).
    """
    if labels not in ("auto", "folders", "none"):
        raise ConfigError(f"--labels must be auto, folders or none, got {labels!r}")
    top = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if labels == "none" or (labels == "auto" and (top or not classes)):
        files = _images_under(root)
        if not files:
            raise ConfigError(f"{root}: no images found ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return [(str(f), None) for f in files], None
    if not classes:
        raise ConfigError(f"{root}: expected one sub-folder per class, found none")
    items = [(str(f), i) for i, c in enumerate(classes) for f in _images_under(root / c)]
    if not items:
        raise ConfigError(f"{root}: no images found in the class sub-folders")
    return items, classes


def open_folder(root: str | Path, labels: str = "auto") -> FileSource:
    """An image folder or class-folder tree (see :func:`folder_items`)."""
    items, classes = folder_items(Path(root), labels)
    kind = "class-folders" if classes is not None else "folder"
    return FileSource(kind, classes, None, [f for f, _ in items], [y for _, y in items])


# --- detection -------------------------------------------------------------------------------
def open_source(
    src: str | Path, split: str | None = None, labels: str = "auto", resolution: int | None = None
) -> Source:
    """The :class:`Source` that ``src`` names (``digits``/``digits:test``, a CIFAR tarball or
    folder, an ``.npz``, an image folder); ``resolution`` only matters for digits."""
    name, _, colon_split = str(src).partition(":")
    if name == "digits" and not Path(str(src)).exists():
        return open_digits(resolution or 16, split or colon_split or "train")
    path = Path(src)
    tar_or_cifar = (path.is_file() and tarfile.is_tarfile(path)) or (
        path.is_dir() and cifar_dir(path)
    )
    if split is not None and not tar_or_cifar:
        raise ConfigError(f"shards: --split applies to CIFAR tarballs and 'digits', not {src}")
    if path.suffix == ".npz" and path.is_file():
        return open_npz(path)
    if tar_or_cifar:
        return open_cifar(path, split or "train")
    if path.is_dir():
        return open_folder(path, labels)
    if not path.exists():
        raise ConfigError(f"shards: {src!r}: no such file or folder ({SRC_KINDS})")
    raise ConfigError(
        f"shards: {src!r} is not a folder, a CIFAR python tarball, an .npz or 'digits'"
    )
