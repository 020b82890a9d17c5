"""Ranks and devices: torchrun's or srun's environment, the device choice, the process group.

The one home of this decision for ``vdmpp-train``, ``vdmpp-train --check`` and ``vdmpp-eval``,
so ``srun vdmpp-eval ...`` gets the same rank, world size and device as ``srun vdmpp-train``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import ConfigError

__all__ = ["DeviceError", "Dist", "dist_env", "init_distributed", "resolve_device"]

_DEVICE = re.compile(r"auto|cpu|mps|cuda(?::\d+)?")


class DeviceError(ConfigError):
    """The requested device is not a device, or is not available here."""


@dataclass
class Dist:
    """This process's place in the run: rank, world size, local rank and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.on:
            dist.barrier()

    def all_reduce(self, t: Tensor, op: Any = None) -> Tensor:
        if self.on:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
        if not self.on:
            return [obj]
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, obj)
        return parts


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) of this process: torchrun's variables, else srun's.

    torchrun (and ``torch.distributed.run``) sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``. A
    task of an ``srun`` job step started without torchrun has ``SLURM_PROCID``,
    ``SLURM_STEP_NUM_TASKS`` (or ``SLURM_NTASKS``) and ``SLURM_LOCALID`` instead; they are used
    only inside a job step (``SLURM_STEP_ID`` set: the batch script itself is not a rank) and
    are copied to the torchrun names so that ``init_process_group("env://")`` finds them —
    ``MASTER_ADDR``/``MASTER_PORT`` must then be exported by the job script.
    """
    env = os.environ
    if "WORLD_SIZE" not in env and "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        world = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
        if int(world) > 1:
            env["WORLD_SIZE"], env["RANK"] = world, env["SLURM_PROCID"]
            env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    return (
        int(env.get("RANK", "0")),
        int(env.get("WORLD_SIZE", "1")),
        int(env.get("LOCAL_RANK", "0")),
    )


def resolve_device(
    name: str, *, local_rank: int = 0, what: str = "device", use: str = "device cpu"
) -> torch.device:
    """``auto | cpu | cuda | cuda:N | mps`` → an available device; a rank of several on CUDA
    gets ``cuda:<local rank>``. :class:`DeviceError` names the fix when it is not available."""
    if not isinstance(name, str) or not _DEVICE.fullmatch(name):
        raise DeviceError(f"{what} {name!r} is not a device; use cpu, cuda, cuda:N, mps or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"{what} {name!r}: no CUDA device is available here; use {use} (or auto, which "
                "picks CUDA when there is one)"
            )
        n = torch.cuda.device_count()
        idx = int(name.partition(":")[2]) if ":" in name else local_rank
        if idx >= n:
            raise DeviceError(
                f"{what} {name!r}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}"
            )
        return torch.device("cuda", idx)
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError(f"{what} mps: Apple's MPS backend is not available here; use {use}")
    return torch.device(name)


def init_distributed(
    device: str = "auto",
    *,
    backend: str | None = None,
    what: str = "config: device =",
    use: str = "device = 'cpu'",
) -> Dist:
    """Read the environment (:func:`dist_env`), pick and set the device, join the process group
    when there are several ranks (NCCL on GPUs, gloo on CPUs, unless ``backend`` is given)."""
    rank, world, local = dist_env()
    if world > 1 and not dist.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ConfigError(
                f"{world} ranks but {' and '.join(missing)} not set: start with torchrun, or "
                "export MASTER_ADDR (the first node) and MASTER_PORT in the job script"
            )
    dev = resolve_device(device, local_rank=local if world > 1 else 0, what=what, use=use)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if dev.type == "cuda" else "gloo"))
    return Dist(rank=rank, world=world, local_rank=local, device=dev)
