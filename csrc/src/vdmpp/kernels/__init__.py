"""Fused torch custom ops for vdmpp (``vdmpp::heun_step``, ``vdmpp::churn``,
``vdmpp::adaptive_ema_update`` and the data-parallel pair ``vdmpp::adaptive_bin_stats`` →
all-reduce → ``vdmpp::adaptive_apply_stats``), CPU and CUDA.

Importing this package never fails because of the compiled library: if ``_C`` cannot be loaded
the reason is kept in :data:`load_error`, a warning is issued once, and :func:`can_use` answers
``False`` so every caller stays on its pure-PyTorch reference.
"""

from __future__ import annotations

import contextlib
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

from .ops import (  # noqa: E402
    adaptive_apply_stats,
    adaptive_bin_stats,
    adaptive_ema_update,
    churn,
    heun_step,
)

__all__ = [
    "OPS",
    "adaptive_apply_stats",
    "adaptive_bin_stats",
    "adaptive_ema_update",
    "available",
    "can_use",
    "churn",
    "device_ok",
    "has_kernel",
    "heun_step",
    "load_error",
]

OPS = ("heun_step", "churn", "adaptive_ema_update", "adaptive_bin_stats", "adaptive_apply_stats")
_ELEMENTWISE = ("heun_step", "churn")
_ADAPTIVE = ("adaptive_ema_update", "adaptive_bin_stats", "adaptive_apply_stats")
_FLOATS = (torch.float32, torch.bfloat16)
_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}
CUDA_MAX_BINS = 2048  # the CUDA adaptive kernels keep [bins] sums+counts in shared memory
_DEVICE_OK: dict[torch.device, bool] = {}  # per CUDA device: does a kernel image fit it?
_HAS_KERNEL: dict[tuple[str, str], bool] = {}


def available() -> bool:
    """Whether the compiled extension loaded."""
    return load_error is None


def has_kernel(op_name: str, device: torch.device | str) -> bool:
    """Whether ``vdmpp::<op_name>`` has a kernel registered for ``device``'s type."""
    dtype = torch.device(device).type
    hit = _HAS_KERNEL.get((op_name, dtype))
    if hit is None:
        key = _DISPATCH_KEY.get(dtype)
        hit = load_error is None and op_name in OPS and key is not None
        hit = hit and bool(
            torch._C._dispatch_has_kernel_for_dispatch_key(f"vdmpp::{op_name}", key)
        )
        _HAS_KERNEL[(op_name, dtype)] = hit
    return hit


def device_ok(device: torch.device | str) -> bool:
    """Whether this build's kernels can run on ``device`` (asked once per device, cached).

    CPU: yes. CUDA: the build must hold a kernel image for the device's architecture (SASS for
    it, or PTX of an older one the driver can JIT). If none fits, e.g. a wheel built for
    "8.0;9.0" without PTX on a T4 (7.5), the answer is no and one warning says so: every caller
    then stays on its PyTorch reference instead of failing at launch. No launch and no sync.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return device.type == "cpu"
    if device.index is None:
        with contextlib.suppress(Exception):  # no CUDA runtime: keep the index-less device
            device = torch.device("cuda", torch.cuda.current_device())
    ok = _DEVICE_OK.get(device)
    if ok is None:
        try:
            ok = bool(torch.ops.vdmpp.kernel_image_ok(torch.empty(0, device=device)))
            why = "no kernel image of this build fits it"
        except Exception as e:  # any failure means: do not dispatch here
            ok, why = False, f"{type(e).__name__}: {e}"
        if not ok:
            try:
                cc = ".".join(map(str, torch.cuda.get_device_capability(device)))
                what = f"{torch.cuda.get_device_name(device)}, compute capability {cc}"
            except Exception as e:  # e.g. no CUDA driver at all
                what = f"not usable: {type(e).__name__}"
            warnings.warn(
                f"vdmpp.kernels: the CUDA kernels cannot run on {device} ({what}): {why}; the "
                "pure-PyTorch reference paths are used instead (rebuild with "
                "TORCH_CUDA_ARCH_LIST including this architecture, or with +PTX)",
                RuntimeWarning,
                stacklevel=3,
            )
        _DEVICE_OK[device] = ok
    return ok


def _dense(t: Tensor) -> bool:
    """Contiguous in some dimension order the kernels loop over flat (row-major, NHWC, NDHWC)."""
    if t.is_contiguous():
        return True
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    return t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)


def can_use(op_name: str, *tensors: Tensor | None) -> bool:
    """Can the fused ``op_name`` serve these tensors? (``None`` entries are skipped.)

    Cheap (attribute reads, no host sync): callers ask it on every call. Yes when: the
    extension loaded, ``VDMPP_KERNELS`` is not "0", a kernel is registered for the tensors'
    (common) device and a kernel image fits that device (:func:`device_ok`), they are float32 /
    bfloat16 tensors and none needs a gradient (the ops have no autograd formula; the adaptive
    ops refuse an input that requires grad even under ``torch.no_grad()``).
    ``heun_step`` / ``churn``: equal shapes and one dense memory layout (same strides: row-major,
    channels_last, ...). ``adaptive_ema_update``: ``(ema, logsnr[, value])``, ``ema`` a 1-D
    float32 buffer; ``adaptive_bin_stats``: ``(stats, logsnr[, value])``, ``stats`` float32
    [2, bins]; ``adaptive_apply_stats``: ``(ema, cdf, stats)``; at most :data:`CUDA_MAX_BINS`
    bins on CUDA; the adaptive operands contiguous.
    """
    if load_error is not None or os.environ.get("VDMPP_KERNELS", "").strip() == "0":
        return False
    ts = [t for t in tensors if t is not None]
    if op_name not in OPS or not ts or not all(isinstance(t, Tensor) for t in ts):
        return False
    first = ts[0]
    device = first.device
    if not has_kernel(op_name, device) or not device_ok(device):
        return False
    # The adaptive ops' Autograd kernel (ops.cpp) refuses any input that requires grad, in every
    # grad mode (no_grad leaves the Autograd dispatch key set); heun_step/churn run under
    # no_grad but have no derivative with grad enabled.
    grad = torch.is_grad_enabled() or op_name in _ADAPTIVE
    for t in ts:
        if t.device != device or t.dtype not in _FLOATS or (grad and t.requires_grad):
            return False
    if op_name in _ELEMENTWISE:
        if not _dense(first):
            return False
        shape, stride = first.shape, first.stride()
        return all(t.shape == shape and t.stride() == stride for t in ts[1:])
    if not all(t.is_contiguous() for t in ts):
        return False
    if op_name == "adaptive_apply_stats":
        if len(ts) != 3:
            return False
        ema, cdf, stats = ts
        bins = ema.numel()
        ok = ema.dim() == 1 and bins >= 1 and cdf.shape == (bins + 1,)
        ok = ok and stats.shape == (2, bins)
        ok = ok and all(t.dtype == torch.float32 for t in ts)
    else:
        acc = first
        if acc.dtype != torch.float32 or acc.numel() < 1:
            return False
        if op_name == "adaptive_bin_stats":
            ok = acc.dim() == 2 and acc.shape[0] == 2
            bins = acc.shape[1] if acc.dim() == 2 else 0
        else:
            ok, bins = acc.dim() == 1, acc.numel()
        ok = ok and all(t.dim() == 1 for t in ts[1:])
    if device.type == "cuda" and bins > CUDA_MAX_BINS:
        return False
    return bool(ok)
