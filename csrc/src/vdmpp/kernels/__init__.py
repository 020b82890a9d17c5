"""Fused torch custom ops for vdmpp (``vdmpp::heun_step``, ``vdmpp::churn``,
``vdmpp::adaptive_ema_update``), CPU and CUDA.

Importing this package never fails because of the compiled library: if ``_C`` cannot be loaded
the reason is kept in :data:`load_error`, a warning is issued once, and :func:`can_use` answers
``False`` so every caller stays on its pure-PyTorch reference.
"""

from __future__ import annotations

import os
import warnings
from importlib.metadata import PackageNotFoundError, version

import torch
from torch import Tensor

try:
    __version__ = version("vdmpp-kernels")
except PackageNotFoundError:  # an in-place build on sys.path
    __version__ = "0.0.0+local"

load_error: BaseException | None = None
try:
    from . import _C  # noqa: F401  (registers the ops with the dispatcher)
except Exception as e:  # ImportError, OSError (undefined symbol, ABI mismatch), ...
    load_error = e
    warnings.warn(
        f"vdmpp.kernels: the compiled extension failed to load ({type(e).__name__}: {e}); "
        "the pure-PyTorch reference paths are used instead",
        RuntimeWarning,
        stacklevel=2,
    )
else:
    from . import ops as _ops  # noqa: F401  (register_fake for torch.compile)

from .ops import adaptive_ema_update, churn, heun_step  # noqa: E402

__all__ = [
    "OPS",
    "adaptive_ema_update",
    "available",
    "can_use",
    "churn",
    "has_kernel",
    "heun_step",
    "load_error",
]

OPS = ("heun_step", "churn", "adaptive_ema_update")
_FLOATS = (torch.float32, torch.bfloat16)
_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}
CUDA_MAX_BINS = 2048  # the CUDA adaptive kernel keeps [bins] sums+counts in shared memory


def available() -> bool:
    """Whether the compiled extension loaded."""
    return load_error is None


def has_kernel(op_name: str, device: torch.device | str) -> bool:
    """Whether ``vdmpp::<op_name>`` has a kernel registered for ``device``'s type."""
    key = _DISPATCH_KEY.get(torch.device(device).type)
    if load_error is not None or op_name not in OPS or key is None:
        return False
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"vdmpp::{op_name}", key))


def can_use(op_name: str, *tensors: Tensor | None) -> bool:
    """Can the fused ``op_name`` serve these tensors? (``None`` entries are skipped.)

    Yes when: the extension loaded, ``VDMPP_KERNELS`` is not "0", a kernel is registered for the
    tensors' (common) device, they are contiguous float32/bfloat16 tensors and none needs a
    gradient (the ops have no autograd formula). For ``adaptive_ema_update`` pass
    ``(ema, logsnr[, value])``: ``ema`` must be a 1-D float32 buffer (at most
    :data:`CUDA_MAX_BINS` bins on CUDA).
    """
    if load_error is not None or os.environ.get("VDMPP_KERNELS", "").strip() == "0":
        return False
    ts = [t for t in tensors if t is not None]
    if op_name not in OPS or not ts or not all(isinstance(t, Tensor) for t in ts):
        return False
    device = ts[0].device
    if not has_kernel(op_name, device):
        return False
    grad = torch.is_grad_enabled()
    for t in ts:
        if t.device != device or t.dtype not in _FLOATS or not t.is_contiguous():
            return False
        if grad and t.requires_grad:
            return False
    if op_name == "adaptive_ema_update":
        ema = ts[0]
        if ema.dtype != torch.float32 or ema.dim() != 1 or ema.numel() < 1:
            return False
        if device.type == "cuda" and ema.numel() > CUDA_MAX_BINS:
            return False
        return all(t.dim() == 1 for t in ts[1:])
    return all(t.shape == ts[0].shape for t in ts[1:])  # float32/bf16 may mix
