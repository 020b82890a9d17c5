"""``vdmpp-train CONFIG --check``: a dry run that does everything a run does before its first
step — and writes nothing.

Resolves every name (schedule, weighting, parameterization, process: from the libraries'
registries; model config), validates ``*_args`` against the constructors' signatures (both in
:meth:`Config.validate`), builds the model and the objective, probes the data (one decoded
sample of the shards, or the built-in digits in memory; for a missing source it says how to
write shards with ``vdmpp-train shards``), checks the device and the batch split for the world
size, and returns a one-screen summary. Every problem is a :class:`ConfigError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import Config

__all__ = ["check_device", "dry_run"]


def check_device(name: str) -> str:
    """The device type a run would use ("cpu" or "cuda"); ConfigError when it is not available
    (:func:`vdmpp.train.distributed.resolve_device`, the one home of this decision)."""
    from .distributed import resolve_device

    return resolve_device(name, what="config: device =", use="device = 'cpu'").type


def _probe_data(cfg: Config) -> str:
    from .data import digits_images, expand_source, probe

    d = cfg.data
    if d.source == "digits":
        images, labels = digits_images(d.resolution, "train")
        return (
            f"digits (built in): {len(images)} train images {d.resolution}×{d.resolution}, "
            f"{int(labels.max()) + 1} classes; shards are written to "
            f"{Path(cfg.out) / 'data'} on the first run"
        )
    urls = expand_source(d.source, d.resolution)  # a missing source names the shards command
    probe(urls, d.resolution, d.channels, d.num_classes)
    return f"{d.source}: {len(urls)} shard(s), first sample decodes as {d.resolution}² ok"


def dry_run(cfg: Config, *, resume: bool = False, world: int | None = None) -> str:
    """Every check of a run's start-up, nothing written; the one-screen summary."""
    import torch

    from . import checkpoint as ckpt
    from .objective import Objective, build_net, model_spec

    cfg.validate()
    if world is None:
        from .distributed import dist_env

        world = dist_env()[1]
    device = check_device(cfg.device)
    per_device, accum = cfg.micro_batches(world)
    ckpt.check_run_dir(cfg.out, resume)
    with torch.device("meta"):
        net = build_net(cfg)
    n_params = sum(p.numel() for p in net.parameters())
    objective = Objective(cfg)
    sched = objective.schedule
    weighting = objective.loss.weighting
    data = _probe_data(cfg)
    o = cfg.objective
    lo, hi = (float(torch.as_tensor(v).detach()) for v in (sched.logsnr_min, sched.logsnr_max))
    sched_name = (
        f"adaptive ({o.adaptive_bins} bins, decay {o.adaptive_decay})"
        if o.adaptive
        else f"{o.schedule} {dict(o.schedule_args) or ''}".strip()
    )
    spec = model_spec(cfg)
    rows: list[tuple[str, Any]] = [
        (
            "model",
            f"{spec['name']} {cfg.data.channels}×{cfg.data.resolution}², "
            f"{n_params / 1e6:.2f}M parameters, classes: {cfg.data.num_classes}",
        ),
        (
            "objective",
            f"{weighting!r} weighting, {o.parameterization} head, {o.process} "
            f"process, {o.time_sampler} t",
        ),
        ("schedule", sched_name),
        (
            "λ range",
            f"[{lo:g}, {hi:g}] (σ from {torch.exp(torch.tensor(-hi / 2)):.3g} to "
            f"{torch.exp(torch.tensor(-lo / 2)):.3g})",
        ),
        ("data", data),
        ("device", f"{device} (device = {cfg.device!r}), precision {cfg.precision}"),
        (
            "batch",
            f"global {cfg.batch.global_size} = per-device {per_device} × accumulation "
            f"{accum} × world size {world}",
        ),
        (
            "optimizer",
            f"{cfg.optimizer.name} lr {cfg.optimizer.lr:g}, clip "
            f"{cfg.optimizer.grad_clip:g}, {cfg.steps} steps",
        ),
        (
            "previews",
            f"heun, {cfg.sample.steps} steps, every {cfg.sample.every} steps"
            if cfg.sample.every
            else "off",
        ),
        ("out", f"{cfg.out} (nothing written by --check)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
