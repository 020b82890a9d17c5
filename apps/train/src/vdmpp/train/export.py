"""The export contract between vdmpp-train and its consumers (vdmpp-eval).

A run directory ``RUN/`` holds::

    config.toml            the resolved config
    checkpoints/           ckpt-<step>.pt (weights-only loadable)
    metrics.jsonl          one JSON object per log step
    samples/*.png          preview grids
    export/ema.safetensors EMA weights of the λ-conditioned model (``Preconditioned`` state dict)
    export/model.json      {"format": "vdmpp-model", "version": 1, "weights_sha256": hex,
                            "model": {"name": ..., "overrides": {...}},
                            "parameterization": ..., "process": "vp" | "ve", "sigma_data": float,
                            "resolution": int, "channels": int, "num_classes": int | null,
                            "data_range": [-1, 1], "logsnr_min": float, "logsnr_max": float,
                            "schedule": {...}, "step": int}

:func:`load_exported` rebuilds the model from ``model.json`` with ``vdmpp.models.build`` and
``Preconditioned`` and loads the safetensors weights; no pickle is ever read.

``export`` is a symlink to a generation directory ``.export.<digest>`` holding the pair, so
the two files are replaced together (:func:`write_export`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import write_atomic_bytes

__all__ = [
    "FORMAT",
    "VERSION",
    "ExportError",
    "build_model",
    "clean_stale",
    "export_step",
    "load_exported",
    "read_meta",
    "verify_weights",
    "write_export",
]

FORMAT = "vdmpp-model"
VERSION = 1
WEIGHTS = "ema.safetensors"
META = "model.json"


class ExportError(ValueError):
    """Not a vdmpp-model export (wrong format, a pickle, missing files)."""


def build_model(meta: dict[str, Any]) -> nn.Module:
    """The λ-conditioned model described by ``meta`` (random weights)."""
    from vdmpp.models import Preconditioned, build

    spec = meta["model"]
    net = build(spec["name"], **spec.get("overrides", {}))
    return Preconditioned(
        net, meta["parameterization"], sigma_data=meta["sigma_data"], process=meta["process"]
    )


def _to_jsonable(v: Any) -> Any:
    if isinstance(v, tuple | list):
        return [_to_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _to_jsonable(x) for k, x in v.items()}
    return v


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    return True


def clean_stale(directory: str | Path) -> list[Path]:
    """Remove what killed writers of ``directory`` (an export dir) left next to it.

    Temp dirs/links ``.<name>.<pid>.*tmp`` of dead processes, and export generations other than
    the current one and the one before it (a reader may still be reading that). Returns them.
    """
    d = Path(directory)
    parent = d.parent
    if not parent.is_dir():
        return []
    current = os.readlink(d) if d.is_symlink() else None
    prefix = f".{d.name}."
    gens = []
    gone = []
    for p in parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        rest = p.name[len(prefix) :]
        kind = rest.rsplit(".", 1)[-1]
        if kind in ("tmp", "linktmp", "legacy"):
            head = rest.split(".", 1)[0]
            pid = int(head) if head.isdigit() else None
            mine = pid == os.getpid()
            if (kind == "legacy" and mine) or pid is None or (not mine and not _alive(pid)):
                _remove(p)
                gone.append(p)
        elif p.name != current:
            gens.append(p)
    gens.sort(key=lambda p: p.stat().st_mtime_ns if p.exists() else 0)
    for p in gens[:-1]:  # keep the newest non-current generation (the previous export)
        _remove(p)
        gone.append(p)
    if d.is_dir():  # temp files of the old in-place layout (write_atomic_bytes)
        for p in d.glob(".*.tmp"):
            head = p.name.rsplit(".", 2)[-2]
            if not head.isdigit() or (int(head) != os.getpid() and not _alive(int(head))):
                _remove(p)
                gone.append(p)
    return gone


def _remove(p: Path) -> None:
    if p.is_symlink() or p.is_file():
        p.unlink(missing_ok=True)
    elif p.is_dir():
        shutil.rmtree(p, ignore_errors=True)


def write_export(directory: str | Path, state_dict: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``ema.safetensors`` + ``model.json`` into ``directory`` as one atomic pair.

    Both files go into a fresh generation directory ``.export.<digest>`` beside ``directory``
    (fsynced), and ``directory`` becomes a symlink to it with one ``os.replace``: a reader, or
    a process killed at any instant, sees the previous complete pair or the new one, never a mix.
    ``model.json`` records ``weights_sha256``, which :func:`load_exported` checks. Temp files of
    killed writers and older generations are removed. Where symlinks are unavailable the two
    files are replaced in place, weights first (the digest still catches a mixed pair).
    """
    from safetensors.torch import save

    d = Path(directory)
    parent = d.parent
    parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    blob = save(tensors, metadata={"format": FORMAT})
    digest = hashlib.sha256(blob).hexdigest()
    meta = {"format": FORMAT, "version": VERSION, **_to_jsonable(meta), "weights_sha256": digest}
    meta_bytes = (json.dumps(meta, indent=2) + "\n").encode()
    gen_digest = hashlib.sha256(blob + meta_bytes).hexdigest()[:16]
    gen = parent / f".{d.name}.{gen_digest}"
    if d.is_dir() and not d.is_symlink() and not _symlinks_ok(parent):
        write_atomic_bytes(blob, d / WEIGHTS)
        write_atomic_bytes(meta_bytes, d / META)
        return d
    if not gen.is_dir():
        tmp = parent / f".{d.name}.{os.getpid()}.{time.time_ns()}.tmp"
        tmp.mkdir()
        _write_file(tmp / WEIGHTS, blob)
        _write_file(tmp / META, meta_bytes)
        _fsync_dir(tmp)
        os.replace(tmp, gen)
    link = parent / f".{d.name}.{os.getpid()}.linktmp"
    link.unlink(missing_ok=True)
    os.symlink(gen.name, link)
    if d.is_dir() and not d.is_symlink():  # the old in-place layout: move it aside once
        legacy = parent / f".{d.name}.{os.getpid()}.legacy"
        os.replace(d, legacy)
    os.replace(link, d)
    _fsync_dir(parent)
    clean_stale(d)
    return d


def _symlinks_ok(parent: Path) -> bool:
    probe = parent / f".symlink-probe.{os.getpid()}.linktmp"
    try:
        os.symlink(".", probe)
    except (OSError, NotImplementedError):
        return False
    probe.unlink(missing_ok=True)
    return True


def _locate(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if not p.exists():
        raise ExportError(f"{p}: missing (expected a run dir, export dir or ema.safetensors)")
    if p.is_dir():
        if (p / "export" / META).is_file():
            p = p / "export"
        weights, meta = p / WEIGHTS, p / META
    elif p.suffix == ".safetensors":
        weights, meta = p, p.with_name(META)
    elif p.name == META:
        weights, meta = p.with_name(WEIGHTS), p
    else:
        raise ExportError(
            f"{p}: expected a run directory, an export directory or a .safetensors file "
            f"(vdmpp-model format); pickled checkpoints ({p.suffix or 'no suffix'}) are refused"
        )
    for f in (weights, meta):
        if not f.is_file():
            raise ExportError(f"{f}: missing (a vdmpp-model export has {WEIGHTS} and {META})")
    return weights, meta


def read_meta(path: str | Path) -> dict[str, Any]:
    """The validated ``model.json`` of an export (same path forms as :func:`load_exported`)."""
    _, meta_path = _locate(path)
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{meta_path}: not JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ExportError(f"{meta_path}: format is not {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise ExportError(f"{meta_path}: version {meta.get('version')!r} (supported: {VERSION})")
    for key in ("model", "parameterization", "process", "sigma_data", "resolution", "channels"):
        if key not in meta:
            raise ExportError(f"{meta_path}: missing {key!r}")
    return meta


def verify_weights(weights: str | Path, meta: dict[str, Any]) -> None:
    """Raise :class:`ExportError` unless ``weights`` has the ``weights_sha256`` of ``meta``."""
    want = meta.get("weights_sha256")
    if want is None:  # exports written before 0.2.0 carry no digest
        return
    h = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != want:
        raise ExportError(
            f"{weights}: does not match the weights_sha256 in {META} (a mixed or torn export; "
            f"`vdmpp-train CONFIG --resume` rewrites it from the latest checkpoint)"
        )


def export_step(path: str | Path) -> int | None:
    """The step of a complete, self-consistent export at ``path``; None if there is none."""
    try:
        weights, _ = _locate(path)
        meta = read_meta(weights)
        verify_weights(weights, meta)
    except (ExportError, OSError):
        return None
    step = meta.get("step")
    return step if isinstance(step, int) else None


def load_exported(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, meta) from a run dir, its ``export/`` dir or ``ema.safetensors``.

    The model is called as ``model(z, logsnr, class_labels)`` and returns the prediction named by
    ``meta["parameterization"]`` (``model.denoise`` gives x̂ for any of them).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights, _ = _locate(path)
    meta = read_meta(weights)
    verify_weights(weights, meta)
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"{weights}: not a readable safetensors file: {e}") from None
    model = build_model(meta)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ExportError(f"{weights}: weights do not match the model in model.json: {e}") from None
    return model.to(map_location).eval().requires_grad_(False), meta
