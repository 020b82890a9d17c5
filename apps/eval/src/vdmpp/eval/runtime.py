"""Where a command runs and what it may read: device, rank, process group, the run's status.

Ranks and devices come from ``vdmpp.train.distributed`` (torchrun's variables, else srun's), so
``srun vdmpp-eval ...`` gets the same rank, world size and device as ``srun vdmpp-train``; its
errors reach the user as :class:`EvalError`, worded for the ``--device`` flag.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .model import EvalError

__all__ = ["device_name", "join", "progress_on", "rank", "require_done"]

_log = logging.getLogger("vdmpp.eval")
_FLAG = {"what": "--device", "use": "--device cpu"}


def device_name(name: str) -> str:
    """A validated, available device: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` (``auto`` picks).

    A bare ``cuda`` stays bare: a rank of several gets ``cuda:<local rank>`` in :func:`join`.
    """
    from vdmpp.train.distributed import DeviceError, resolve_device

    try:
        dev = resolve_device(name, **_FLAG)
    except DeviceError as e:
        raise EvalError(str(e)) from None
    return "cuda" if dev.type == "cuda" and ":" not in name else str(dev)


def rank() -> int:
    """This process's rank (torchrun's or srun's environment; 0 alone)."""
    from vdmpp.train.distributed import dist_env

    return dist_env()[0]


def join(device: str = "auto") -> Any:
    """This process's :class:`vdmpp.train.distributed.Dist`: rank, world, local rank, device.

    Several ranks join one gloo process group (``sample`` needs only barriers; gloo works on CPU
    and GPU hosts); a bare ``cuda`` becomes ``cuda:<local rank>``."""
    from vdmpp.train.distributed import init_distributed
    from vdmpp.train.errors import ConfigError

    try:
        return init_distributed(device, backend="gloo", **_FLAG)
    except ConfigError as e:  # DeviceError too; MASTER_ADDR/PORT missing under srun
        raise EvalError(str(e)) from None


def leave(d: Any) -> None:
    """Leave the process group :func:`join` joined (a single process has none)."""
    import torch.distributed as dist

    if d.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def progress_on(requested: bool) -> bool:
    """A tqdm bar only when asked for and stderr is a terminal (never ``\\r`` in a log)."""
    from vdmpp.train.log import progress_allowed

    return progress_allowed(requested)


def require_done(path: str | Path, allow_partial: bool = False) -> None:
    """Refuse a run that did not finish (``RUN/status.json``), unless ``allow_partial``."""
    from vdmpp.train.status import StatusError
    from vdmpp.train.status import require_done as check

    try:
        rec = check(path, allow_partial=allow_partial)
    except StatusError as e:
        raise EvalError(str(e)) from None
    if rec is not None and rec.get("status") != "done":
        _log.warning(
            "%s: the training run is %s (--allow-partial): these numbers are not final",
            path,
            rec.get("status"),
        )
