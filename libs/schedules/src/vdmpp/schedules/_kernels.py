"""The one place vdmpp libraries import the optional ``vdmpp-kernels`` extension from.

Internal to vdmpp (vdmpp-samplers depends on vdmpp-schedules and uses it too). The import is
tried once and cached: not installed → ``None`` silently; installed but broken → ``None`` and
one warning with the reason; never an exception at import time.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

__all__ = ["disabled_by_env", "kernels_error", "load_kernels", "reset_kernels_cache"]

_UNSET = object()
_module: object = _UNSET  # ModuleType once loaded, None when unavailable
_error: BaseException | None = None


def load_kernels() -> ModuleType | None:
    """``vdmpp.kernels`` if importable and its compiled library loaded, else None (cached)."""
    global _module, _error
    if _module is _UNSET:
        try:
            mod = importlib.import_module("vdmpp.kernels")
            available = getattr(mod, "available", lambda: True)
            if not available():
                _error = getattr(mod, "load_error", None)  # the extension warned already
                mod = None
            _module = mod
        except ImportError as e:  # not installed: the reference path, silently
            _module, _error = None, e
        except Exception as e:  # installed but broken: say why, once
            _module, _error = None, e
            warnings.warn(
                f"vdmpp.kernels failed to load ({type(e).__name__}: {e}); vdmpp uses the "
                "pure-PyTorch reference",
                RuntimeWarning,
                stacklevel=3,
            )
    return _module  # type: ignore[return-value]


def kernels_error() -> BaseException | None:
    """Why :func:`load_kernels` returned None (after it was called)."""
    return _error


def reset_kernels_cache() -> None:
    """Forget the cached import (for tests)."""
    global _module, _error
    _module, _error = _UNSET, None


def disabled_by_env() -> bool:
    """``VDMPP_KERNELS=0`` forces every vdmpp hot path onto its pure-PyTorch reference."""
    return os.environ.get("VDMPP_KERNELS", "").strip() == "0"
