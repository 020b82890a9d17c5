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
                            "schedule": {...}, "label_dropout": float, "step": int}

``label_dropout`` (0 when absent: exports before 0.3) is the probability with which training
replaced a label by the null class; vdmpp-eval refuses ``--guidance`` when it is 0, since the
unconditional branch would then be untrained.

:func:`load_exported` rebuilds the model from ``model.json`` with ``vdmpp.models.build`` and
``Preconditioned`` and loads the safetensors weights; no pickle is ever read.

``export`` is a symlink to a generation directory ``.export.<digest>`` holding the pair, so
the two files are replaced together (:func:`write_export`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vdmpp.schedules import NETWORK_HEADS, PROCESSES

from .fileio import fsync_dir, pid_alive, write_atomic

__all__ = [
    "FORMAT",
    "VERSION",
    "ExportError",
    "build_model",
    "clean_stale",
    "export_meta",
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


def export_meta(
    cfg: Any, schedule: Any, step: int, *, ema: dict | None = None, uncertainty: dict | None = None
) -> dict[str, Any]:
    """``model.json`` of a run's export: how to rebuild the network and what it was trained on
    (plus, when present, which EMA it holds and the learned u(λ) of EDM2 eq. 21)."""
    from .objective import model_spec, schedule_meta

    extra: dict[str, Any] = {}
    if ema is not None:
        extra["ema"] = ema
    if uncertainty is not None:
        extra["uncertainty"] = uncertainty
    return {
        "model": model_spec(cfg),
        "parameterization": cfg.objective.parameterization,
        "process": cfg.objective.process,
        "sigma_data": cfg.objective.sigma_data,
        "resolution": cfg.data.resolution,
        "channels": cfg.data.channels,
        "num_classes": cfg.data.num_classes,
        "data_range": [-1, 1],
        "logsnr_min": float(torch.as_tensor(schedule.logsnr_min).detach()),
        "logsnr_max": float(torch.as_tensor(schedule.logsnr_max).detach()),
        "schedule": schedule_meta(cfg, schedule),
        "label_dropout": cfg.objective.label_dropout,
        "step": step,
        **extra,
    }


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
            if (kind == "legacy" and mine) or pid is None or (not mine and not pid_alive(pid)):
                _remove(p)
                gone.append(p)
        elif p.name != current:
            gens.append(p)
    gens.sort(key=lambda p: p.stat().st_mtime_ns if p.exists() else 0)
    for p in gens[:-1]:  # keep the newest non-current generation (the previous export)
        _remove(p)
        gone.append(p)
    if d.is_dir():  # temp files of the old in-place layout (fileio.write_atomic)
        for p in d.glob(".*.tmp"):
            head = p.name.rsplit(".", 2)[-2]
            if not head.isdigit() or (int(head) != os.getpid() and not pid_alive(int(head))):
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
        write_atomic(d / WEIGHTS, blob)
        write_atomic(d / META, meta_bytes)
        return d
    if not gen.is_dir():
        tmp = parent / f".{d.name}.{os.getpid()}.{time.time_ns()}.tmp"
        tmp.mkdir()
        write_atomic(tmp / WEIGHTS, blob)
        write_atomic(tmp / META, meta_bytes)
        fsync_dir(tmp)
        os.replace(tmp, gen)
    link = parent / f".{d.name}.{os.getpid()}.linktmp"
    link.unlink(missing_ok=True)
    os.symlink(gen.name, link)
    if d.is_dir() and not d.is_symlink():  # the old in-place layout: move it aside once
        legacy = parent / f".{d.name}.{os.getpid()}.legacy"
        os.replace(d, legacy)
    os.replace(link, d)
    fsync_dir(parent)
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
    _check_fields(meta, meta_path)
    return meta


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_fields(meta: dict[str, Any], where: Path) -> None:
    """Types and ranges of ``model.json`` (a bad field is an ExportError, not a traceback)."""
    model = meta["model"]
    checks = [
        (
            "model",
            isinstance(model, dict)
            and isinstance(model.get("name"), str)
            and isinstance(model.get("overrides", {}), dict),
            'an object {"name": str, "overrides"}',
        ),
        (
            "parameterization",
            meta["parameterization"] in NETWORK_HEADS,
            "one of " + ", ".join(NETWORK_HEADS),
        ),
        ("process", meta["process"] in PROCESSES, " or ".join(PROCESSES)),
        ("sigma_data", _number(meta["sigma_data"]) and meta["sigma_data"] > 0, "a number > 0"),
        (
            "resolution",
            _int(meta["resolution"]) and 1 <= meta["resolution"] <= 8192,
            "an integer in [1, 8192]",
        ),
        ("channels", _int(meta["channels"]) and 1 <= meta["channels"] <= 4, "1, 2, 3 or 4"),
        (
            "num_classes",
            meta.get("num_classes") is None
            or (_int(meta["num_classes"]) and meta["num_classes"] >= 1),
            "null or an integer >= 1",
        ),
        (
            "data_range",
            isinstance(meta.get("data_range", [-1, 1]), list)
            and len(meta.get("data_range", [-1, 1])) == 2
            and all(_number(x) for x in meta.get("data_range", [-1, 1]))
            and meta.get("data_range", [-1, 1])[0] < meta.get("data_range", [-1, 1])[1],
            "[lo, hi] with lo < hi",
        ),
        (
            "logsnr_min/logsnr_max",
            all(_number(meta.get(k, 0.0)) for k in ("logsnr_min", "logsnr_max")),
            "finite numbers",
        ),
        (
            "step",
            meta.get("step") is None or (_int(meta["step"]) and meta["step"] >= 0),
            "an integer >= 0",
        ),
        (
            "weights_sha256",
            meta.get("weights_sha256") is None
            or (isinstance(meta["weights_sha256"], str) and len(meta["weights_sha256"]) == 64),
            "a sha256 hex digest",
        ),
    ]
    for key, ok, what in checks:
        if not ok:
            raise ExportError(
                f"{where}: {key} must be {what}, got "
                f"{json.dumps(meta.get(key.split('/')[0]))[:100]}"
            )


def _build(meta: dict[str, Any], weights: Path) -> nn.Module:
    try:
        return build_model(meta)
    except (TypeError, ValueError, KeyError, AttributeError, AssertionError) as e:
        raise ExportError(
            f"{weights.with_name(META)}: cannot build the model it describes: "
            f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        ) from None


def _check_header(weights: Path, meta: dict[str, Any]) -> None:
    """Compare the tensor names and shapes of the safetensors header with the model that
    ``model.json`` describes, built on the meta device (no memory): a model.json asking for a
    huge model is refused before anything is allocated."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), "pt", device="cpu") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"{weights}: not a readable safetensors file: {e}") from None
    with torch.device("meta"):
        model = _build(meta, weights)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if want != shapes:
        diff = sorted(set(want) ^ set(shapes)) or [k for k in want if want[k] != shapes[k]]
        raise ExportError(
            f"{weights}: weights do not match the model in {META} ({len(want)} tensors wanted, "
            f"{len(shapes)} stored; first difference: {diff[0]!r}: "
            f"{want.get(diff[0])} vs {shapes.get(diff[0])})"
        )


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
    _check_header(weights, meta)  # before any memory is spent on the model model.json names
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"{weights}: not a readable safetensors file: {e}") from None
    model = _build(meta, weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ExportError(f"{weights}: weights do not match the model in model.json: {e}") from None
    return model.to(map_location).eval().requires_grad_(False), meta
