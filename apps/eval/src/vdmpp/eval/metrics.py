"""``vdmpp-eval metrics``: FID, IS, KID, precision/recall through torch-fidelity, in memory.

Images never round-trip through files: both sets are uint8 tensors wrapped in a
``torch.utils.data.Dataset`` and handed to torch-fidelity's feature extractors; the metrics are
torch-fidelity's own functions on those features. Reference features are cached (safetensors,
keyed by a hash of the images, the extractor and its weights) under ``$VDMPP_CACHE/eval``.

Inception weights offline. torch-fidelity's ``inception-v3-compat`` loads a state dict saved
with ``torch.save`` (``feature_extractor_weights_path``). vdmpp-eval takes the file from
``--inception-weights PATH`` or ``$VDMPP_INCEPTION_WEIGHTS``, else torch hub's cache, where
torch-fidelity keeps it. When none is there and the machine is online, it is downloaded into
that cache (its name's sha256 prefix checked, as torch hub does; ``VDMPP_OFFLINE=1`` never
tries); offline, the error says what to fetch. The file is read with ``weights_only=True``,
its keys are checked,
and hands torch-fidelity a verified copy in its cache — never the user's file, which
torch-fidelity would unpickle without restriction. The copy is named by the digests of the
source and of itself and re-verified on every use (a swapped or torn file is rebuilt), and
torch-fidelity's ``torch.load`` of it runs forced weights-only (:func:`weights_only_torch_load`),
so even a poisoned cache is never unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vdmpp.train.fileio import atomic_open, write_atomic

from ._compat import import_torch_fidelity
from .digits import cache_dir
from .model import EvalError

__all__ = [
    "INCEPTION_FILE",
    "INCEPTION_URL",
    "compute_metrics",
    "create_extractor",
    "download_inception",
    "extract_features",
    "inception_weights",
    "weights_only_torch_load",
]

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256_PREFIX = "6726825d"  # torch hub's convention: the name carries the digest
INCEPTION = "inception-v3-compat"
_INCEPTION_KEYS = ("Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.conv.weight", "fc.weight")


def _missing_weights_message(path: Path | None, why: str = "") -> str:
    where = f"{path} does not exist. " if path is not None else ""
    why = f" ({why})" if why else ""
    hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    return (
        f"Inception weights not found. {where}FID/IS/KID/PR use torch-fidelity's "
        f"Inception-v3 ({INCEPTION}), whose weights could not be downloaded{why}. Fetch\n"
        f"  {INCEPTION_URL}\n"
        f"(~92 MB) on a machine with internet access, copy it here, and pass "
        f"--inception-weights PATH or set VDMPP_INCEPTION_WEIGHTS=PATH (or put it at {hub})."
    )


def inception_weights(path: str | Path | None = None, *, required: bool = True) -> Path | None:
    """A verified copy of the Inception state dict for torch-fidelity, or None if absent.

    ``path``: explicit file (an error if missing), else ``$VDMPP_INCEPTION_WEIGHTS``, else torch
    hub's cache, downloaded there first when ``required`` and online. With nothing found:
    EvalError naming what to download (``required``) or None.
    """
    explicit = path or os.environ.get("VDMPP_INCEPTION_WEIGHTS") or None
    p = Path(explicit) if explicit else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not p.is_file():
        if explicit:
            raise EvalError(_missing_weights_message(p))
        if not required:
            return None
        why = download_inception(p)
        if why:
            raise EvalError(_missing_weights_message(None, why))
    data = p.read_bytes()
    digest = hashlib.sha256(data).hexdigest()[:16]
    cache = cache_dir() / "eval"
    for cached in sorted(cache.glob(f"inception-{digest}-*.pt")):
        if _verified(cached):  # checked on every use: a swapped or torn file is rebuilt
            return cached
        cached.unlink(missing_ok=True)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise EvalError(
            f"{p}: not a weights-only state dict (refusing to unpickle it): "
            f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        ) from None
    if not isinstance(state, dict) or not all(k in state for k in _INCEPTION_KEYS):
        raise EvalError(
            f"{p}: not torch-fidelity's Inception-v3 state dict (keys "
            f"{_INCEPTION_KEYS} expected); download {INCEPTION_URL}"
        )
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    buf = io.BytesIO()
    torch.save(state, buf)
    blob = buf.getvalue()
    safe = cache / f"inception-{digest}-{hashlib.sha256(blob).hexdigest()}.pt"
    return write_atomic(safe, blob)


def download_inception(dst: Path, *, timeout: float = 30.0) -> str:
    """Fetch :data:`INCEPTION_URL` to ``dst`` atomically; "" on success, else why not.

    The file's sha256 must start with :data:`INCEPTION_SHA256_PREFIX` (torch hub's check);
    a failed or partial download leaves nothing behind. ``VDMPP_OFFLINE=1`` skips the attempt.
    """
    import sys
    import urllib.request

    from tqdm import tqdm

    if os.environ.get("VDMPP_OFFLINE", "") not in ("", "0"):
        return "VDMPP_OFFLINE is set"
    try:
        h = hashlib.sha256()
        # atomic_open: the file appears whole (fsynced) or not at all
        with (
            urllib.request.urlopen(INCEPTION_URL, timeout=timeout) as r,
            atomic_open(dst, "wb") as f,
        ):
            total = int(r.headers.get("Content-Length") or 0) or None
            tty = sys.stderr.isatty()
            bar = tqdm(
                total=total, unit="B", unit_scale=True, desc="Inception weights", disable=not tty
            )
            with bar:
                while chunk := r.read(1 << 20):
                    h.update(chunk)
                    f.write(chunk)
                    bar.update(len(chunk))
            if not h.hexdigest().startswith(INCEPTION_SHA256_PREFIX):
                raise _BadDigest(
                    f"the download's sha256 {h.hexdigest()[:16]}… does not start with "
                    f"{INCEPTION_SHA256_PREFIX}"
                )
        return ""
    except _BadDigest as e:
        return str(e)
    except Exception as e:  # offline, refused, timed out, disk full: say which
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}".rstrip(": ")


class _BadDigest(Exception):
    """The downloaded bytes are not the file torch hub names (nothing is kept)."""


def _verified(path: Path) -> bool:
    """``inception-<source digest>-<sha256 of this file>.pt`` holds the bytes its name says."""
    want = path.stem.rsplit("-", 1)[-1]
    try:
        return len(want) == 64 and hashlib.sha256(path.read_bytes()).hexdigest() == want
    except OSError:
        return False


@contextlib.contextmanager
def weights_only_torch_load() -> Iterator[None]:
    """Every ``torch.load`` inside is weights-only, whatever the caller asks for.

    torch-fidelity reads ``feature_extractor_weights_path`` with ``weights_only=False`` (it
    would run any pickle); PyTorch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` overrides that.
    """
    keys = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    old = {k: os.environ.get(k) for k in keys}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def create_extractor(
    extractor: str, layers: list[str], *, weights: str | Path | None = None, cuda: bool = False
) -> Any:
    """torch-fidelity's feature extractor, its weights file read weights-only."""
    import_torch_fidelity()
    from torch_fidelity.utils import create_feature_extractor

    kw: dict[str, Any] = {"verbose": False}
    if weights is not None:
        w = Path(weights)
        cached = w.name.startswith("inception-") and w.parent == cache_dir() / "eval"
        if cached and not _verified(w):
            raise EvalError(f"{w}: cached Inception weights fail their digest check")
        kw["feature_extractor_weights_path"] = str(w)
    try:
        with weights_only_torch_load():
            return create_feature_extractor(extractor, list(layers), cuda=cuda, **kw)
    except pickle.UnpicklingError as e:
        raise EvalError(
            f"{weights}: refusing to unpickle feature-extractor weights: "
            f"{str(e).splitlines()[0][:200]}"
        ) from None


class _Images(torch.utils.data.Dataset):
    """uint8 [N, H, W, C] as uint8 [C, H, W] tensors (3 channels for Inception)."""

    def __init__(self, images: np.ndarray, rgb: bool) -> None:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        self.x = x.expand(-1, 3, -1, -1) if rgb and x.shape[1] == 1 else x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i].contiguous()


def extract_features(
    images: np.ndarray,
    extractor: str,
    layers: list[str],
    *,
    weights: str | Path | None = None,
    cuda: bool | None = None,
    batch_size: int = 64,
    cache: bool = False,
) -> dict[str, torch.Tensor]:
    """Features of uint8 images [N, H, W, C] from a torch-fidelity feature extractor."""
    import_torch_fidelity()
    from torch_fidelity.utils import get_featuresdict_from_dataset

    if images.ndim != 4 or images.dtype != np.uint8 or len(images) == 0:
        raise EvalError(
            f"expected a non-empty uint8 [N, H, W, C] array, got {images.dtype} {images.shape}"
        )
    cuda = torch.cuda.is_available() if cuda is None else cuda
    key = None
    if cache:
        h = hashlib.sha256(images.tobytes())
        h.update(repr((images.shape, extractor, sorted(layers))).encode())
        if weights is not None:
            h.update(Path(weights).name.encode())
        key = cache_dir() / "eval" / "features" / f"{extractor}-{h.hexdigest()[:24]}.safetensors"
        if key.is_file():
            from safetensors.torch import load_file

            return load_file(str(key))
    fe = create_extractor(extractor, layers, weights=weights, cuda=cuda)
    feats = get_featuresdict_from_dataset(
        _Images(images, rgb=extractor == INCEPTION), fe, batch_size, cuda, True, False
    )
    feats = {k: v.float().contiguous() for k, v in feats.items()}
    if key is not None:
        from safetensors.torch import save

        write_atomic(key, save(feats))
    return feats


def fid_from_features(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """Fréchet distance between two feature sets (torch-fidelity's FID formula, float64)."""
    import_torch_fidelity()
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    s1 = fid_features_to_statistics(f1.double())
    s2 = fid_features_to_statistics(f2.double())
    return float(fid_statistics_to_metric(s1, s2, False)["frechet_inception_distance"])


def compute_metrics(
    samples: np.ndarray,
    reference: np.ndarray,
    *,
    extractor: str = INCEPTION,
    weights: str | Path | None = None,
    metrics: tuple[str, ...] = ("fid", "isc", "kid", "prc"),
    cuda: bool | None = None,
    batch_size: int = 64,
    kid_subsets: int = 100,
) -> dict[str, float]:
    """FID/IS/KID/PR of ``samples`` against ``reference`` (both uint8 [N, H, W, C])."""
    import_torch_fidelity()
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    if extractor == "digits":
        from . import digits

        extractor = digits.register()
    if extractor == INCEPTION:
        weights = inception_weights(weights)
    fid_layer = "2048" if extractor == INCEPTION else "128"
    logit_layer = "logits_unbiased" if extractor == INCEPTION else "logits"
    layers = [fid_layer] + ([logit_layer] if "isc" in metrics else [])
    common = dict(weights=weights, cuda=cuda, batch_size=batch_size)
    f1 = extract_features(samples, extractor, layers, **common)
    out: dict[str, float] = {}
    if "isc" in metrics:
        isc = isc_features_to_metric(f1[logit_layer], splits=10, shuffle=True, rng_seed=2020)
        out["isc_mean"] = float(isc["inception_score_mean"])
        out["isc_std"] = float(isc["inception_score_std"])
    if not {"fid", "kid", "prc"} & set(metrics):
        return out
    f2 = extract_features(reference, extractor, [fid_layer], cache=True, **common)[fid_layer]
    a = f1[fid_layer]
    if "fid" in metrics:
        out["fid"] = fid_from_features(a, f2)
    if "kid" in metrics:
        size = min(1000, len(a), len(f2))
        kid = kid_features_to_metric(
            a, f2, kid_subsets=kid_subsets, kid_subset_size=size, verbose=False
        )
        out["kid_mean"] = float(kid["kernel_inception_distance_mean"])
        out["kid_std"] = float(kid["kernel_inception_distance_std"])
    if "prc" in metrics:
        prc = prc_features_to_metric(a, f2, verbose=False)
        out["precision"] = float(prc["precision"])
        out["recall"] = float(prc["recall"])
    return out
