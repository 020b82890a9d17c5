"""``vdmpp-train shards``: dataset tooling in the manner of EDM's ``dataset_tool.py``
(Karras et al. 2022, code release), writing WebDataset shards instead of a zip.

Sources (detected from ``src``):

- ``digits``: scikit-learn's digits, built in (``--split train|test|all``);
- a folder of images (PNG/JPEG/..., recursive): unlabeled when images lie directly in it;
- a class-folder tree (``ROOT/<class>/**/*.png``, nothing directly in ``ROOT``): labels are the
  indices of the sorted class-folder names, written to ``labels.json`` beside the shards;
- a CIFAR-10 / CIFAR-100 python tarball (``cifar-10-python.tar.gz``: ``cifar-10-batches-py/
  data_batch_1..5``, ``test_batch``, ``batches.meta``; ``cifar-100-python.tar.gz``:
  ``cifar-100-python/train``, ``test``, ``meta``, fine labels) or its extracted folder,
  ``--split train|test``;
- an ``.npz`` (``images``/``x`` uint8 [N, H, W, C] or [N, C, H, W], optional ``labels``/``y``).

Nothing is unpickled blindly. CIFAR's batches *are* pickles; they are read by an unpickler
that resolves exactly the globals a pickled numpy array needs (``_reconstruct``/``_frombuffer``,
``ndarray``, ``dtype``, and ``_codecs.encode`` restricted to latin-1) and refuses every other
global, so a hostile batch (an ``os.system`` reduce, say) is an error before anything runs.
``.npz`` files are read with ``allow_pickle=False``.

Every image is centre-cropped to a square and resized to ``--resolution`` with Lanczos (EDM's
``center-crop`` transform); without ``--resolution`` the first image's side is used. Channels:
the first readable image decides (grey → 1, colour → 3) unless ``--channels`` says; a grey
image in a colour set is replicated, a colour image in a grey set is skipped ("wrong mode")
unless ``--channels 1`` was given explicitly (then converted to luma). Unreadable, corrupt or
16-bit/float images are skipped, counted, and listed in ``skipped.txt``; they never abort
the conversion (only a set with no usable image at all is an error).

Output, deterministic for a given (source, seed, shard size, resolution, channels) whatever the
number of worker processes: the items are shuffled with ``random.Random(seed)``, cut into parts
of ``shard_size``, and each part is written by one worker as a tar with fixed headers
(``<key>.png`` + ``<key>.cls``, key = position in the shuffled order). Parts are written to
temporary names and renamed at the end; ``dataset.json`` (the manifest: per-shard sample count,
size and sha256, total, classes, resolution, channels, source, skipped files) is written last,
atomically. An interrupted run leaves a ``.incomplete`` marker and no manifest, and training
refuses the folder until the command is rerun.

Training checks the manifest (:func:`check_manifest`): a listed shard missing, a shard the
manifest does not list, a size mismatch, or a resolution/channels/num_classes that differs from
the config is a one-line error (exit 2). Sizes are always compared (a ``stat`` per shard);
sha256 checksums are verified when the shards total at most 1 GiB (a second or two), or always
with ``VDMPP_VERIFY_SHARDS=1`` (``0`` checks sizes only); ``vdmpp-train shards DIR --verify``
hashes every shard in parallel on demand.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import pickle
import random
import re
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .config import ConfigError
from .log import Progress

__all__ = [
    "MANIFEST",
    "check_manifest",
    "digits_images",
    "read_cifar",
    "verify_shards",
    "write_shards",
]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
MANIFEST = "dataset.json"
LABELS = "labels.json"
SKIPPED = "skipped.txt"
INCOMPLETE = ".incomplete"
FORMAT = "vdmpp-shards/1"
SHARD_RE = re.compile(r"shard-\d{6}\.tar")
VERIFY_AUTO_BYTES = 1 << 30  # sha256 at every start up to this total size (see module docstring)
PROGRESS_EVERY_S = 10.0  # without a terminal: a plain progress line at most this often
_GREY_MODES = {"1", "L", "LA"}
_COLOUR_MODES = {"RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "La"}


def shards_command(out: str | Path, resolution: int | None) -> str:
    """The command that writes shards to ``out`` (for error messages)."""
    res = f" --resolution {resolution}" if resolution is not None else " --resolution R"
    return f"vdmpp-train shards SRC {out}{res}"


SRC_KINDS = ("SRC: an image folder, a class-folder tree, a CIFAR-10/100 python tarball, an .npz "
             "or 'digits'")  # fmt: skip


# --- digits and .npz --------------------------------------------------------------------------
DIGITS_SPLITS = ("train", "test", "all")


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


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(uint8 [N, H, W, C], int64 labels or None) from an .npz; object arrays are refused."""
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            ik = next((k for k in ("images", "x", "arr_0") if k in keys), None)
            if ik is None:
                raise ConfigError(
                    f"{path}: no 'images' (or 'x', 'arr_0') array; has {sorted(keys)}"
                )
            images = z[ik]
            lk = next((k for k in ("labels", "y", "arr_1") if k in keys), None)
            labels = z[lk] if lk else None
    except ConfigError:
        raise
    except Exception as e:  # object arrays (pickles, refused), torn zips, not an npz at all
        raise ConfigError(f"{path}: not a readable .npz of numeric arrays (pickled object "
                          f"arrays are refused): {str(e).splitlines()[0][:200]}") from None
    if images.dtype.kind not in "uif" or (labels is not None and labels.dtype.kind not in "ui"):
        raise ConfigError(f"{path}: images must be numbers and labels integers, got "
                          f"{images.dtype} / {None if labels is None else labels.dtype}")
    if labels is not None:
        labels = labels.astype(np.int64)
        if labels.ndim == 2 and labels.shape[1] == 1:  # [N, 1] columns, as some tools save them
            labels = labels[:, 0]
        if labels.ndim != 1 or len(labels) != len(images) or (len(labels) and labels.min() < 0):
            raise ConfigError(f"{path}: labels must be {len(images)} integers >= 0, got "
                              f"shape {labels.shape}")
    images = _nhwc(images, str(path))
    if images.dtype != np.uint8:
        if images.min() >= -1.0 and images.max() <= 1.0 and images.min() < 0:
            images = (images + 1.0) * 127.5  # [-1, 1] floats
        elif images.max() <= 1.0:
            images = images * 255.0
        images = np.round(images).clip(0, 255).astype(np.uint8)
    return images, labels


# --- CIFAR python tarballs, without trusting pickle -----------------------------------------
def _latin1(s: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of ``bytes`` use it; latin-1 only."""
    if encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError(f"refused _codecs.encode(..., {encoding!r})")
    return s.encode("latin1", errors)


def _numpy_globals() -> dict[tuple[str, str], Any]:
    core = getattr(np, "_core", None)
    if core is None:  # numpy < 2
        core = np.core
    ma, num = core.multiarray, core.numeric
    found = {"_reconstruct": ma._reconstruct, "_frombuffer": getattr(num, "_frombuffer", None)}
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray,
                                           ("numpy", "dtype"): np.dtype,
                                           ("_codecs", "encode"): _latin1}  # fmt: skip
    for pkg in ("numpy.core", "numpy._core"):
        allowed[(f"{pkg}.multiarray", "_reconstruct")] = found["_reconstruct"]
        if found["_frombuffer"] is not None:
            allowed[(f"{pkg}.numeric", "_frombuffer")] = found["_frombuffer"]
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """Resolves only the globals a pickled numpy array (and a dict of them) needs."""

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed.get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"refused to load global {module}.{name}")
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused a persistent id")


def _unpickle_batch(data: bytes, where: str) -> dict[str, Any]:
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # refused globals, truncation, not a pickle
        raise ConfigError(f"{where}: not a CIFAR batch this reader accepts (only numpy arrays, "
                          f"lists, numbers and strings; nothing else is loaded): "
                          f"{type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a dict, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


_CIFAR = {  # kind → (folder, {split: batch names}, meta name, label key, names key)
    "cifar10": ("cifar-10-batches-py",
                {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                "batches.meta", "labels", "label_names"),
    "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]}, "meta",
                 "fine_labels", "fine_label_names"),
}  # fmt: skip


def _cifar_dir(path: Path) -> tuple[str, Path] | None:
    """(kind, folder holding the batches) when ``path`` is an extracted CIFAR python folder."""
    for kind, (folder, splits, *_) in _CIFAR.items():
        for root in (path, path / folder):
            if (root / splits["test"][0]).is_file() and (root / splits["train"][0]).is_file():
                return kind, root
    return None


def _cifar_blobs(path: Path, split: str) -> tuple[str, dict[str, bytes]]:
    """(kind, {member name: bytes}) of the batches of ``split`` and the meta file."""
    def wanted(kind: str) -> list[str]:
        _, splits, meta, *_ = _CIFAR[kind]
        if split not in splits:
            raise ConfigError(f"{path}: --split must be 'train' or 'test' for CIFAR, got "
                              f"{split!r}")
        return [*splits[split], meta]

    if path.is_dir():
        found = _cifar_dir(path)
        if found is None:
            raise ConfigError(f"{path}: not an extracted CIFAR-10/100 python folder")
        kind, root = found
        return kind, {n: (root / n).read_bytes() for n in wanted(kind) if (root / n).is_file()}
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {m.name.lstrip("./"): m for m in tar.getmembers() if m.isfile()}
            kind = next((k for k, (folder, *_) in _CIFAR.items()
                         if any(n.startswith(folder + "/") for n in members)), None)  # fmt: skip
            if kind is None:
                raise ConfigError(f"{path}: a tarball, but not a CIFAR python one (expected "
                                  "cifar-10-batches-py/ or cifar-100-python/ inside)")
            folder = _CIFAR[kind][0]
            blobs = {}
            for n in wanted(kind):
                m = members.get(f"{folder}/{n}")
                f = tar.extractfile(m) if m is not None else None
                if f is not None:
                    blobs[n] = f.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ConfigError(f"{path}: not a readable tarball ({type(e).__name__}: {e})") from None
    return kind, blobs


def read_cifar(path: str | Path, split: str = "train"
               ) -> tuple[np.ndarray, np.ndarray, list[str], str]:  # fmt: skip
    """(uint8 [N, H, W, 3], int64 labels, class names, "cifar10"|"cifar100") of one split.

    ``path``: ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` or the folder they unpack
    to. CIFAR-100 uses the fine labels (100 classes). Only numpy arrays, lists, numbers and
    strings are unpickled (see the module docstring).
    """
    path = Path(path)
    kind, blobs = _cifar_blobs(path, split)
    folder, splits, meta_name, label_key, names_key = _CIFAR[kind]
    images, labels = [], []
    for name in splits[split]:
        where = f"{path}: {folder}/{name}"
        if name not in blobs:
            raise ConfigError(f"{where} is missing")
        batch = _unpickle_batch(blobs[name], where)
        data, lab = batch.get("data"), batch.get(label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
            raise ConfigError(f"{where}: 'data' must be a uint8 [N, 3·H·W] array")
        side = math.isqrt(data.shape[1] // 3)
        if 3 * side * side != data.shape[1] or side == 0:
            raise ConfigError(f"{where}: rows of {data.shape[1]} values are not 3 square planes")
        try:
            lab_arr = np.asarray(lab, dtype=np.int64).reshape(-1)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: '{label_key}' must be a list of integers") from None
        if len(lab_arr) != len(data) or (len(lab_arr) and lab_arr.min() < 0):
            raise ConfigError(f"{where}: '{label_key}' must be {len(data)} integers >= 0")
        images.append(data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1))
        labels.append(lab_arr)
    if len({im.shape[1:] for im in images}) > 1:
        raise ConfigError(f"{path}: the {split} batches hold images of different sizes")
    classes: list[str] = []
    if meta_name in blobs:
        names = _unpickle_batch(blobs[meta_name], f"{path}: {folder}/{meta_name}").get(names_key)
        if isinstance(names, list):
            classes = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n)
                       for n in names]  # fmt: skip
    lab = np.concatenate(labels)
    n_cls = max(len(classes), int(lab.max()) + 1 if len(lab) else 0)
    classes += [str(i) for i in range(len(classes), n_cls)]
    return np.ascontiguousarray(np.concatenate(images)), lab, classes, kind


# --- image folders ----------------------------------------------------------------------------
def _images_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                  and p.is_file() and not any(q.startswith(".") for q in p.relative_to(root).parts))


def folder_items(root: Path, labels: str = "auto"
                 ) -> tuple[list[tuple[str, int | None]], list[str] | None]:  # fmt: skip
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


class _Skip(Exception):
    """An input image that is left out (and reported)."""


def _fit(img: Image.Image, resolution: int) -> Image.Image:
    """EDM's ``center-crop``: the central square, resized with Lanczos."""
    w, h = img.size
    if (w, h) == (resolution, resolution):
        return img
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    if s != w or s != h:
        img = img.crop((left, top, left + s, top + s))
    return img.resize((resolution, resolution), Image.Resampling.LANCZOS)


def _convert(img: Image.Image, channels: int, forced: bool) -> Image.Image:
    mode = img.mode
    if mode in _GREY_MODES:
        return img.convert("L" if channels == 1 else "RGB")
    if mode not in _COLOUR_MODES:
        raise _Skip(f"wrong mode {mode} (16-bit or float images are not converted)")
    if channels == 1 and not forced:
        raise _Skip(f"wrong mode {mode}: a colour image in a 1-channel set (pass --channels 3, "
                    "or --channels 1 to convert to grey)")
    if mode in ("P", "PA"):
        img = img.convert("RGBA" if "transparency" in img.info or mode == "PA" else "RGB")
    return img.convert("L" if channels == 1 else "RGB")


def _read_image(path: str, resolution: int, channels: int, forced: bool) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            img = _convert(im, channels, forced)
    except _Skip:
        raise
    except Exception as e:  # PIL raises many types on corrupt files; never abort the run
        raise _Skip(f"not a readable image ({type(e).__name__}: {e})") from None
    arr = np.asarray(_fit(img, resolution))
    return arr[..., None] if arr.ndim == 2 else arr


def _peek(files: Iterable[tuple[str, int | None]]) -> tuple[int, int] | None:
    """(side, channels) of the first readable image (sorted order), None when there is none."""
    for f, _ in files:
        try:
            with Image.open(f) as im:
                im.load()
                w, h, mode = im.width, im.height, im.mode
        except Exception:
            continue
        if mode in _GREY_MODES:
            return min(w, h), 1
        if mode in _COLOUR_MODES:
            return min(w, h), 3
    return None


def png_bytes(arr: np.ndarray) -> bytes:
    """8-bit PNG of a uint8 [H, W, 1|3] array (deterministic bytes)."""
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _array_image(arr: np.ndarray, resolution: int, channels: int) -> np.ndarray:
    if arr.shape[:2] == (resolution, resolution) and arr.shape[-1] == channels:
        return arr
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    img = _fit(img.convert("L" if channels == 1 else "RGB"), resolution)
    out = np.asarray(img)
    return out[..., None] if out.ndim == 2 else out


# --- the parallel writer -----------------------------------------------------------------------
@dataclass
class _Part:
    """One shard's work: written by one worker process (picklable, spawn-safe)."""

    index: int
    keys: list[int]
    labels: list[int | None]
    tmp: str
    resolution: int
    channels: int
    forced: bool
    files: list[str] | None = None
    images: np.ndarray | None = None


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _write_part(part: _Part) -> dict[str, Any]:
    """Decode, crop/resize and PNG-encode one part, write it as a tar; its count/size/sha256."""
    skipped: list[tuple[str, str]] = []
    count = 0
    class_counts: dict[int, int] = {}
    with open(part.tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for j, key in enumerate(part.keys):
                label = part.labels[j]
                if part.files is not None:
                    try:
                        arr = _read_image(part.files[j], part.resolution, part.channels,
                                          part.forced)  # fmt: skip
                    except _Skip as e:
                        skipped.append((part.files[j], str(e)))
                        continue
                else:
                    assert part.images is not None
                    arr = _array_image(part.images[j], part.resolution, part.channels)
                _add(tar, f"{key:09d}.png", png_bytes(arr))
                if label is not None:
                    _add(tar, f"{key:09d}.cls", str(label).encode("ascii"))
                    class_counts[label] = class_counts.get(label, 0) + 1
                count += 1
        f.flush()
        os.fsync(f.fileno())
    return {"index": part.index, "count": count, "bytes": os.path.getsize(part.tmp),
            "sha256": sha256_file(part.tmp), "skipped": skipped, "class_counts": class_counts,
            "tmp": part.tmp, "items": len(part.keys)}  # fmt: skip


def _run_parts(parts: Iterable[_Part], n_parts: int, workers: int,
               progress: Progress) -> list[dict[str, Any]]:  # fmt: skip
    results: list[dict[str, Any]] = []
    if workers <= 1 or n_parts <= 1:
        for p in parts:
            results.append(_write_part(p))
            progress.update(results[-1]["items"])
        return results
    with cf.ProcessPoolExecutor(max_workers=min(workers, n_parts), mp_context=_mp_context()
                                ) as pool:  # fmt: skip
        pending: set[cf.Future[dict[str, Any]]] = set()
        it = iter(parts)
        try:
            for p in it:  # at most 2 × workers parts in flight (bounded memory for arrays)
                pending.add(pool.submit(_write_part, p))
                while len(pending) >= 2 * workers:
                    done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                    for fut in done:
                        results.append(fut.result())
                        progress.update(results[-1]["items"])
            for fut in cf.as_completed(pending):
                results.append(fut.result())
                progress.update(results[-1]["items"])
        except cf.process.BrokenProcessPool as e:
            raise ConfigError(f"shards: a worker process died ({e}; out of memory?); rerun with "
                              "fewer --workers") from None
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
    return sorted(results, key=lambda r: r["index"])


def _mp_context() -> mp.context.BaseContext:
    """Workers start clean (no inherited threads or state; the worker function is top-level):
    forked from a fork server that has imported this module once (POSIX; no per-worker import
    of torch, shared pages), else spawned."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return mp.get_context("spawn")  # pragma: no cover - not POSIX


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 16))


def _source(src: str | Path, split: str | None, labels: str, resolution: int | None
            ) -> dict[str, Any]:  # fmt: skip
    """Everything known about ``src`` before decoding: items, classes, native side/channels."""
    name, _, colon_split = str(src).partition(":")
    if name == "digits" and not Path(str(src)).exists():
        split = split or colon_split or "train"
        images, lab = digits_images(resolution or 16, split)
        return {"kind": "digits", "split": split, "images": images, "labels": lab,
                "classes": [str(i) for i in range(10)]}  # fmt: skip
    path = Path(src)
    tar_or_cifar = (path.is_file() and tarfile.is_tarfile(path)) or (path.is_dir()
                                                                     and _cifar_dir(path))
    if split is not None and not tar_or_cifar:
        raise ConfigError(f"shards: --split applies to CIFAR tarballs and 'digits', not {src}")
    if path.suffix == ".npz" and path.is_file():
        images, lab = load_npz(path)
        classes = None if lab is None else [str(i) for i in range(int(lab.max()) + 1 if len(lab)
                                                                  else 0)]  # fmt: skip
        return {"kind": "npz", "images": images, "labels": lab, "classes": classes}
    if tar_or_cifar:
        images, lab, classes, kind = read_cifar(path, split or "train")
        return {"kind": kind, "split": split or "train", "images": images, "labels": lab,
                "classes": classes}  # fmt: skip
    if path.is_dir():
        items, classes = folder_items(path, labels)
        return {"kind": "class-folders" if classes is not None else "folder", "files": items,
                "classes": classes}  # fmt: skip
    if not path.exists():
        raise ConfigError(f"shards: {src!r}: no such file or folder ({SRC_KINDS})")
    raise ConfigError(f"shards: {src!r} is not a folder, a CIFAR python tarball, an .npz or "
                      "'digits'")  # fmt: skip


def _clean(out: Path, keep: set[str] | None) -> None:
    """Remove temporary parts and (unless ``keep`` is None) shards not in ``keep``."""
    for p in out.iterdir():
        stale_shard = keep is not None and SHARD_RE.fullmatch(p.name) and p.name not in keep
        if stale_shard or (p.name.startswith(".part-") and p.name.endswith(".tmp")):
            p.unlink(missing_ok=True)


def write_shards(
    src: str | Path,
    out: str | Path,
    *,
    maxcount: int = 1000,
    resolution: int | None = None,
    seed: int = 0,
    verbose: bool = False,
    workers: int = 1,
    progress: bool | None = None,
    split: str | None = None,
    labels: str = "auto",
    channels: int | None = None,
) -> dict[str, Any]:
    """Write shuffled WebDataset shards ``OUT/shard-NNNNNN.tar`` and the manifest
    ``OUT/dataset.json`` (returned); see the module docstring for sources and guarantees.

    ``resolution``: the side after centre crop + resize (digits: the padded size, default 16;
    others: default the first image's side). ``workers`` > 1 writes shards in that many worker
    processes (same bytes as 1). ``progress``: a bar/periodic lines on stderr (default off;
    ``verbose`` turns it on). ``split``: train/test for CIFAR and digits. ``labels``: auto,
    folders or none for image folders. ``channels``: 1 or 3 (default: the first image's).
    """
    if maxcount < 1:
        raise ConfigError(f"shard size must be >= 1, got {maxcount}")
    if resolution is not None and resolution < 1:
        raise ConfigError(f"--resolution must be >= 1, got {resolution}")
    if channels not in (None, 1, 3):
        raise ConfigError(f"--channels must be 1 or 3, got {channels}")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    out = Path(out)
    s = _source(src, split, labels, resolution)
    files: list[tuple[str, int | None]] | None = s.get("files")
    if files is not None:
        peek = _peek(files)
        if peek is None:
            raise ConfigError(_no_usable(len(files), _first_failures(files)))
        side, ch = peek
    else:
        images: np.ndarray = s["images"]
        if not len(images):
            raise ConfigError(f"shards: {src}: no images")
        side, ch = min(images.shape[1:3]), images.shape[-1]
    res = resolution if resolution is not None else side
    chan = channels if channels is not None else ch
    n = len(files) if files is not None else len(s["images"])
    lab_arr = s.get("labels")

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"shards: cannot create {out}: {e}") from None
    (out / INCOMPLETE).write_text("a `vdmpp-train shards` run is writing here (or was killed)\n")
    (out / MANIFEST).unlink(missing_ok=True)  # the old manifest would describe other shards
    (out / LABELS).unlink(missing_ok=True)
    _clean(out, keep=None)  # parts a killed run left behind

    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_parts = (n + maxcount - 1) // maxcount

    def parts() -> Iterable[_Part]:
        for p in range(n_parts):
            idx = order[p * maxcount : (p + 1) * maxcount]
            keys = list(range(p * maxcount, p * maxcount + len(idx)))
            tmp = str(out / f".part-{p:06d}.tar.tmp")
            common = dict(index=p, keys=keys, tmp=tmp, resolution=res, channels=chan,
                          forced=channels is not None)  # fmt: skip
            if files is not None:
                yield _Part(labels=[files[i][1] for i in idx], files=[files[i][0] for i in idx],
                            **common)  # fmt: skip
            else:
                lab = [None] * len(idx) if lab_arr is None else [int(lab_arr[i]) for i in idx]
                yield _Part(labels=lab, images=s["images"][np.asarray(idx)], **common)

    show = bool(verbose) if progress is None else progress
    bar = Progress(n, "images", desc="shards", enabled=show, every=PROGRESS_EVERY_S)
    try:
        results = _run_parts(parts(), n_parts, workers, bar)
    finally:
        bar.close()

    skipped = [x for r in results for x in r["skipped"]]
    entries = []
    for r in results:
        if r["count"] == 0:
            Path(r["tmp"]).unlink(missing_ok=True)
            continue
        name = f"shard-{len(entries):06d}.tar"
        entries.append({"name": name, "count": r["count"], "bytes": r["bytes"],
                        "sha256": r["sha256"], "tmp": r["tmp"]})  # fmt: skip
    if not entries:
        _clean(out, keep=set())
        (out / INCOMPLETE).unlink(missing_ok=True)
        raise ConfigError(_no_usable(n, skipped))
    for e in entries:
        os.replace(e.pop("tmp"), out / e["name"])
    _clean(out, keep={e["name"] for e in entries})  # shards of an earlier, larger write
    classes = s.get("classes")
    class_counts = None
    if classes is not None:
        cc = [0] * len(classes)
        for r in results:
            for k, v in r["class_counts"].items():
                cc[k] += v
        class_counts = cc
        _write_json(out / LABELS, {c: i for i, c in enumerate(classes)})
    total = sum(e["count"] for e in entries)
    if skipped:
        with open(out / SKIPPED, "w") as f:
            f.writelines(f"{p}\t{why}\n" for p, why in skipped)
    else:
        (out / SKIPPED).unlink(missing_ok=True)
    source: dict[str, Any] = {"kind": s["kind"], "path": str(src)}
    if "split" in s:
        source["split"] = s["split"]
    meta = {
        "format": FORMAT,
        "count": total,
        "shards": len(entries),
        "pattern": f"shard-{{000000..{len(entries) - 1:06d}}}.tar",
        "files": entries,
        "classes": classes,
        "num_classes": None if classes is None else len(classes),
        "class_counts": class_counts,
        "resolution": res,
        "channels": chan,
        "transform": "centre crop to a square, Lanczos resize (EDM dataset_tool center-crop)",
        "source": source,
        "seed": seed,
        "shard_size": maxcount,
        "skipped": {"count": len(skipped), "first": [f"{p}: {w}" for p, w in skipped[:10]]},
    }
    _fsync_dir(out)
    _write_json(out / MANIFEST, meta)  # last: its presence means the shards are complete
    (out / INCOMPLETE).unlink(missing_ok=True)
    _fsync_dir(out)
    return meta


def _first_failures(files: list[tuple[str, int | None]], k: int = 3) -> list[tuple[str, str]]:
    fails = []
    for f, _ in files[:k]:
        try:
            _read_image(f, 8, 3, True)
        except _Skip as e:
            fails.append((f, str(e)))
    return fails


def _no_usable(n: int, skipped: list[tuple[str, str]]) -> str:
    eg = "; ".join(f"{Path(p).name}: {w}" for p, w in skipped[:3])
    return f"shards: no usable image among {n} input(s), e.g. {eg}"


def skipped_line(meta: dict[str, Any], out: str | Path) -> str | None:
    """One line naming how many inputs were skipped and the first few (None: none skipped)."""
    sk = meta.get("skipped") or {}
    if not sk.get("count"):
        return None
    first = "; ".join(sk["first"][:3])
    return (f"skipped {sk['count']} input(s) (unreadable, corrupt or wrong mode; all listed in "
            f"{Path(out) / SKIPPED}): {first}")  # fmt: skip


# --- checking a shard folder against its manifest ----------------------------------------------
def _load_manifest(root: Path) -> dict[str, Any] | None:
    path = root / MANIFEST
    if not path.is_file():
        if (root / INCOMPLETE).exists():
            raise ConfigError(f"{root}: a `vdmpp-train shards` run writing here was interrupted "
                              f"(no {MANIFEST}); rerun it: {shards_command(root, None)}")
        return None
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable manifest ({e}); rewrite the shards with "
                          f"{shards_command(root, None)}") from None
    return meta


def _verify_mode() -> str:
    v = os.environ.get("VDMPP_VERIFY_SHARDS", "auto").strip().lower()
    if v in ("1", "all", "true", "yes"):
        return "all"
    if v in ("0", "size", "sizes", "false", "no"):
        return "size"
    return "auto"


def check_manifest(
    root: str | Path,
    urls: list[str] | None,
    resolution: int | None,
    channels: int | None,
    num_classes: int | None,
    *,
    checksums: bool | None = None,
    workers: int = 1,
) -> dict[str, Any] | None:
    """Validate a shard folder that has a ``dataset.json`` (None when it has none).

    ``urls``: the shards a run will read from ``root`` (None: the whole folder, which must hold
    exactly the listed shards). ``resolution``/``channels``/``num_classes``: the config's (None:
    not checked; ``num_classes`` None means unconditional, so labels are not needed).
    ``checksums``: None → ``$VDMPP_VERIFY_SHARDS`` (auto: when the shards total ≤ 1 GiB).
    Every problem is a one-line :class:`ConfigError`.
    """
    root = Path(root)
    meta = _load_manifest(root)
    if meta is None:
        return None
    where = f"{root / MANIFEST}"
    mres, mch, mcls = meta.get("resolution"), meta.get("channels"), meta.get("num_classes")
    redo = shards_command(root, resolution if resolution is not None else mres)
    if resolution is not None and mres is not None and mres != resolution:
        raise ConfigError(f"data.resolution = {resolution} but {root} holds {mres}×{mres} images "
                          f"(per its {MANIFEST}; rewrite the shards with `{redo}` or set "
                          f"data.resolution = {mres})")  # fmt: skip
    if channels is not None and mch is not None and mch != channels:
        raise ConfigError(f"data.channels = {channels} but {root} holds {mch}-channel images "
                          f"(per its {MANIFEST}); set data.channels = {mch} or rewrite the "
                          f"shards with `{redo} --channels {channels}`")  # fmt: skip
    if num_classes is not None and "num_classes" in meta:
        if mcls is None:
            raise ConfigError(f"data.num_classes = {num_classes} but {root} has no labels (per "
                              f"its {MANIFEST}); set data.num_classes = \"none\" for "
                              "unconditional training")  # fmt: skip
        if mcls != num_classes:
            raise ConfigError(f"data.num_classes = {num_classes} but {root} has {mcls} classes "
                              f"(per its {MANIFEST}); set data.num_classes = {mcls}")
    listed = meta.get("files")
    if not isinstance(listed, list):
        return meta  # a manifest of vdmpp < 0.2 (no per-shard entries): metadata checked only
    by_name = {e.get("name"): e for e in listed if isinstance(e, dict)}
    if any(not isinstance(n, str) or Path(n).name != n or not n.endswith(".tar") for n in by_name):
        raise ConfigError(f"{where}: its 'files' must name .tar files inside {root}; rewrite the "
                          f"shards with `{redo}`")
    if urls is None:
        wanted = sorted(by_name)
        present = {p.name for p in root.glob("*.tar")}
        extra = sorted(present - set(by_name))
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise ConfigError(f"{root}: {extra[0]}{more} is not listed in {where}; move it "
                              f"elsewhere or rewrite the shards with `{redo}`")
    else:
        wanted = []
        for u in urls:
            name = Path(u).name
            if name not in by_name:
                raise ConfigError(f"{u} is not listed in {where}; move it elsewhere or "
                                  f"rewrite the shards with `{redo}`")
            wanted.append(name)
    total = 0
    for name in wanted:
        e, p = by_name[name], root / name
        if not p.is_file():
            raise ConfigError(f"{root}: {name} is listed in {MANIFEST} but missing; restore it "
                              f"or rewrite the shards with `{redo}`")
        size = p.stat().st_size
        if size != e.get("bytes"):
            raise ConfigError(f"{p}: {size} bytes but {MANIFEST} says {e.get('bytes')} (a "
                              f"truncated or replaced shard); rewrite the shards with `{redo}`")
        total += size
    mode = _verify_mode()
    if checksums is None:
        checksums = mode == "all" or (mode == "auto" and total <= VERIFY_AUTO_BYTES)
    if checksums:
        bad = _bad_checksums([(root / n, by_name[n].get("sha256")) for n in wanted], workers)
        if bad:
            raise ConfigError(f"{bad[0]}: sha256 differs from {MANIFEST} ({len(bad)} shard(s) "
                              f"corrupt); rewrite the shards with `{redo}`")
    return meta


def _bad_checksums(pairs: list[tuple[Path, str | None]], workers: int) -> list[str]:
    paths = [str(p) for p, _ in pairs]
    if workers > 1 and len(paths) > 1:
        with cf.ProcessPoolExecutor(min(workers, len(paths)), mp_context=_mp_context()
                                    ) as pool:  # fmt: skip
            sums = list(pool.map(sha256_file, paths))
    else:
        sums = [sha256_file(p) for p in paths]
    return [p for p, s, (_, want) in zip(paths, sums, pairs) if s != want]


def verify_shards(root: str | Path, *, workers: int = 1) -> dict[str, Any]:
    """Check every shard of ``root`` against its manifest, sha256 included (``--verify``)."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root}: no such shard folder")
    meta = check_manifest(root, None, None, None, None, checksums=True, workers=workers)
    if meta is None:
        raise ConfigError(f"{root}: no {MANIFEST} to verify against (shards written by "
                          "`vdmpp-train shards` have one)")
    if not isinstance(meta.get("files"), list):
        raise ConfigError(f"{root / MANIFEST}: has no per-shard checksums (written by an older "
                          f"vdmpp); rewrite the shards with {shards_command(root, None)}")
    return meta
