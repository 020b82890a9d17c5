"""The start-up summary: the first lines of ``RUN/log.txt`` (and of each resumed section)."""

from __future__ import annotations

import hashlib
import os
import socket
import sys
from pathlib import Path
from typing import Any

import torch

from . import log as runlog
from .toml_io import dumps

__all__ = ["startup_summary"]


def startup_summary(t: Any) -> list[str]:
    """What a run is, where it writes and on what it runs, for a :class:`~trainer.Trainer`."""
    cfg, d, o = t.cfg, t.d, t.cfg.objective
    digest = hashlib.sha256(dumps(cfg).encode()).hexdigest()[:16]
    n_model = sum(p.numel() for p in t.model.parameters())
    n_sched = sum(p.numel() for p in t.objective.schedule.parameters())
    src = str(Path(t.config_path).resolve()) if t.config_path else "(in memory)"
    versions = ", ".join(f"{k} {v}" for k, v in runlog.vdmpp_versions().items())
    if t.resumed_from is not None:
        start = f"resumed from {t.resumed_from.name} at step {t.step}"
    else:
        start = f"new run from step {t.step}"
    gpu = torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "CPU"
    sched = f"{o.schedule} schedule" + (" (adaptive)" if o.adaptive else "")
    return [
        f"vdmpp-train start-up summary: {cfg.name} -> {t.out}",
        f"  config      {src} (sha256 {digest}); resolved: {t.out / 'config.toml'}",
        f"  run         {start}, to step {cfg.steps}; seed {cfg.seed}",
        f"  model       {cfg.model.name}: {n_model:,} parameters"
        + (f" (+ {n_sched:,} in the learned schedule)" if n_sched else ""),
        f"  objective   {sched}, {o.weighting} weighting, {o.parameterization}-prediction, "
        f"{o.process}" + (f", label dropout {o.label_dropout:g}" if o.label_dropout else ""),
        f"  device      {d.device} ({gpu}), precision {cfg.precision}, deterministic "
        f"{str(cfg.deterministic).lower()}, compile {str(cfg.compile).lower()}",
        f"  world       {d.world} rank(s) x {t.accum} accumulation step(s) x per-device "
        f"batch {t.per_device} = global batch {t.global_batch}",
        f"  data        {cfg.data.source} ({len(t.data.urls)} shard(s)), "
        f"{cfg.data.resolution}x{cfg.data.resolution}x{cfg.data.channels}, "
        f"{cfg.data.workers} worker(s) per stream",
        f"  versions    {versions}",
        f"  git         {runlog.git_sha() or 'n/a (not a git checkout)'}",
        f"  host        {socket.gethostname()} pid {os.getpid()}, python {sys.version.split()[0]}",
    ]
