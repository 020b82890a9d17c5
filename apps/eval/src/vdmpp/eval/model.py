"""Loading an exported vdmpp model and turning it into an EDM denoiser.

The checkpoint format is vdmpp-train's export (``vdmpp.train.export``): ``ema.safetensors`` plus
``model.json``. Nothing else is read: a ``.pt``/``.pth``/``.pkl`` file (a pickle, or a training
checkpoint) is refused with a message naming the export to use instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["EvalError", "denoiser_for", "load_model", "to_uint8"]


class EvalError(ValueError):
    """A user error (bad path, bad format, bad argument): printed without a traceback."""


_PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin"}


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode, model.json) from a run dir, RUN/export or its ``ema.safetensors``."""
    from vdmpp.train.export import ExportError, load_exported

    p = Path(path)
    if not p.exists():
        raise EvalError(
            f"{p}: no such checkpoint (expected a run directory, RUN/export/ or "
            "RUN/export/ema.safetensors)"
        )
    if p.is_file() and p.suffix.lower() in _PICKLE_SUFFIXES:
        raise EvalError(
            f"{p}: refusing a {p.suffix} file: vdmpp-eval reads only vdmpp-model exports "
            "(ema.safetensors + model.json, written by vdmpp-train into RUN/export/), never "
            "pickles. Pass the run directory or its export/ directory."
        )
    try:
        return load_exported(p, map_location=device)
    except ExportError as e:
        raise EvalError(str(e)) from None


class _XModel:
    """A λ-conditioned model seen through ``denoise`` (x̂ for every parameterization)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, z: Tensor, logsnr: Tensor, class_labels: Tensor | None = None) -> Tensor:
        return self.model.denoise(z, logsnr, class_labels)


def denoiser_for(model: Any, meta: dict) -> Any:
    """EDM denoiser D(x, σ, class_labels=None) of an exported model (vdmpp.samplers.as_denoiser).

    A ``Preconditioned`` model knows its own x̂ (``denoise``), so it is adapted as an x-predictor
    and the parameterization-specific algebra stays in one place (vdmpp.models); any other
    callable is adapted by its declared parameterization.
    """
    from vdmpp.samplers import as_denoiser

    process = meta.get("process", "vp")
    if hasattr(model, "denoise"):
        return as_denoiser(_XModel(model), "x", process)
    return as_denoiser(
        model, meta["parameterization"], process, sigma_data=float(meta.get("sigma_data", 0.5))
    )


def to_uint8(x: Tensor, data_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """[B, C, H, W] floats in ``data_range`` → uint8 [B, H, W, C] (round to nearest)."""
    lo, hi = float(data_range[0]), float(data_range[1])
    y = ((x.detach().float().cpu() - lo) * (255.0 / (hi - lo))).round().clamp(0, 255)
    return y.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def from_uint8(images: np.ndarray, data_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """uint8 [N, H, W, C] → float32 [N, C, H, W] in ``data_range`` (the 256 bin centres' grid)."""
    lo, hi = float(data_range[0]), float(data_range[1])
    t = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return t * ((hi - lo) / 255.0) + lo
