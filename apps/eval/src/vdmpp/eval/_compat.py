"""Importing torch-fidelity (and so torchvision) on a CPU-only torch.

The torchvision wheel that matches a torch release on PyPI is a CUDA build. On a CPU-only torch
(``torch.version.cuda is None``) its import dies registering fake kernels for ``torchvision::nms``
with ``RuntimeError: operator torchvision::nms does not exist`` because the compiled ops library
could not be loaded. torch-fidelity needs none of those ops, so in exactly that case we declare
the two op schemas torchvision registers fakes for and import again. A CUDA torch, or any other
failure, is left alone.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIB: torch.library.Library | None = None  # kept alive: dropping it unregisters the schemas


def import_torchvision() -> ModuleType:
    """``import torchvision``; define the nms/qnms schemas first only when a CPU torch needs it."""
    global _LIB
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as e:
        if torch.version.cuda is not None or "torchvision::nms does not exist" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # the half-imported package
    _LIB = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS.values():
        _LIB.define(schema)
    return importlib.import_module("torchvision")


def import_torch_fidelity() -> ModuleType:
    """``import torch_fidelity`` (after :func:`import_torchvision`), with an install hint."""
    try:
        import_torchvision()
        return importlib.import_module("torch_fidelity")
    except ImportError as e:
        raise ImportError(
            f"vdmpp-eval metrics need torch-fidelity and torchvision ({e}); install them with "
            "`pip install torch-fidelity torchvision==<the build matching your torch>`"
        ) from e
