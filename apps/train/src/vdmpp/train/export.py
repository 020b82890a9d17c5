"""The export contract between vdmpp-train and its consumers (vdmpp-eval).

A run directory ``RUN/`` holds::

    config.toml            the resolved config
    checkpoints/           ckpt-<step>.pt (weights-only loadable)
    metrics.jsonl          one JSON object per log step
    samples/*.png          preview grids
    export/ema.safetensors EMA weights of the λ-conditioned model (``Preconditioned`` state dict)
    export/model.json      {"format": "vdmpp-model", "version": 1,
                            "model": {"name": ..., "overrides": {...}},
                            "parameterization": ..., "process": "vp" | "ve", "sigma_data": float,
                            "resolution": int, "channels": int, "num_classes": int | null,
                            "data_range": [-1, 1], "logsnr_min": float, "logsnr_max": float,
                            "schedule": {...}, "step": int}

:func:`load_exported` rebuilds the model from ``model.json`` with ``vdmpp.models.build`` and
``Preconditioned`` and loads the safetensors weights; no pickle is ever read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import write_atomic_bytes

__all__ = ["FORMAT", "VERSION", "ExportError", "build_model", "load_exported", "write_export"]

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


def write_export(directory: str | Path, state_dict: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``ema.safetensors`` then ``model.json`` (both atomically) into ``directory``."""
    from safetensors.torch import save

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    write_atomic_bytes(save(tensors, metadata={"format": FORMAT}), d / WEIGHTS)
    meta = {"format": FORMAT, "version": VERSION, **_to_jsonable(meta)}
    write_atomic_bytes((json.dumps(meta, indent=2) + "\n").encode(), d / META)
    return d


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
