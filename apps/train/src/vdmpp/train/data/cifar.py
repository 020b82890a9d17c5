"""CIFAR-10 / CIFAR-100 python tarballs (or their extracted folders), without trusting pickle.

CIFAR's batches are pickles; they are read by an unpickler that resolves exactly the globals a
pickled numpy array needs (``_reconstruct``/``_frombuffer``, ``ndarray``, ``dtype``, and
``_codecs.encode`` restricted to latin-1) and refuses every other global, so a hostile batch (an
``os.system`` reduce, say) is an error before anything runs.
"""

from __future__ import annotations

import io
import math
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError

__all__ = ["CIFAR", "cifar_dir", "read_cifar"]


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
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1,
    }
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
        raise ConfigError(
            f"{where}: not a CIFAR batch this reader accepts (only numpy arrays, "
            f"lists, numbers and strings; nothing else is loaded): "
            f"{type(e).__name__}: {e}"
        ) from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a dict, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


CIFAR = {  # kind → (folder, {split: batch names}, meta name, label key, names key)
    "cifar10": (
        "cifar-10-batches-py",
        {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
        "batches.meta",
        "labels",
        "label_names",
    ),
    "cifar100": (
        "cifar-100-python",
        {"train": ["train"], "test": ["test"]},
        "meta",
        "fine_labels",
        "fine_label_names",
    ),
}


def cifar_dir(path: Path) -> tuple[str, Path] | None:
    """(kind, folder holding the batches) when ``path`` is an extracted CIFAR python folder."""
    for kind, (folder, splits, *_) in CIFAR.items():
        for root in (path, path / folder):
            if (root / splits["test"][0]).is_file() and (root / splits["train"][0]).is_file():
                return kind, root
    return None


def _cifar_blobs(path: Path, split: str) -> tuple[str, dict[str, bytes]]:
    """(kind, {member name: bytes}) of the batches of ``split`` and the meta file."""

    def wanted(kind: str) -> list[str]:
        _, splits, meta, *_ = CIFAR[kind]
        if split not in splits:
            raise ConfigError(f"{path}: --split must be 'train' or 'test' for CIFAR, got {split!r}")
        return [*splits[split], meta]

    if path.is_dir():
        found = cifar_dir(path)
        if found is None:
            raise ConfigError(f"{path}: not an extracted CIFAR-10/100 python folder")
        kind, root = found
        return kind, {n: (root / n).read_bytes() for n in wanted(kind) if (root / n).is_file()}
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {m.name.lstrip("./"): m for m in tar.getmembers() if m.isfile()}
            kind = next(
                (
                    k
                    for k, (folder, *_) in CIFAR.items()
                    if any(n.startswith(folder + "/") for n in members)
                ),
                None,
            )
            if kind is None:
                raise ConfigError(
                    f"{path}: a tarball, but not a CIFAR python one (expected "
                    "cifar-10-batches-py/ or cifar-100-python/ inside)"
                )
            folder = CIFAR[kind][0]
            blobs = {}
            for n in wanted(kind):
                m = members.get(f"{folder}/{n}")
                f = tar.extractfile(m) if m is not None else None
                if f is not None:
                    blobs[n] = f.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ConfigError(f"{path}: not a readable tarball ({type(e).__name__}: {e})") from None
    return kind, blobs


def read_cifar(
    path: str | Path, split: str = "train"
) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """(uint8 [N, H, W, 3], int64 labels, class names, "cifar10"|"cifar100") of one split.

    ``path``: ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` or the folder they unpack
    to. CIFAR-100 uses the fine labels (100 classes). Only numpy arrays, lists, numbers and
    strings are unpickled (see the module docstring).
    """
    path = Path(path)
    kind, blobs = _cifar_blobs(path, split)
    folder, splits, meta_name, label_key, names_key = CIFAR[kind]
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
            classes = [
                n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names
            ]
    lab = np.concatenate(labels)
    n_cls = max(len(classes), int(lab.max()) + 1 if len(lab) else 0)
    classes += [str(i) for i in range(len(classes), n_cls)]
    return np.ascontiguousarray(np.concatenate(images)), lab, classes, kind
