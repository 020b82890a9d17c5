"""The training objective: schedule + weighting + parameterization → per-example weighted loss.

Thin seams over the libraries (DESIGN.md names): ``vdmpp.schedules`` (schedules, ``vp``/``ve``,
time samplers, ``Adaptive``), ``vdmpp.losses`` (``weightings.get``, ``WeightedLoss``) and
``vdmpp.models`` (``build``, ``Preconditioned``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .config import Config, ConfigError

__all__ = ["Objective", "build_net", "build_schedule", "build_weighting", "model_spec"]

_SCHEDULES = {
    "cosine": "Cosine",
    "edm_training": "EDMTraining",
    "edm_sampling": "EDMSampling",
    "flow_ot": "FlowOT",
    "linear_vp": "LinearVP",
    "learned": "Learned",
}


def build_weighting(cfg: Config) -> Any:
    from vdmpp.losses import weightings

    o = cfg.objective
    try:
        return weightings.get(o.weighting, **o.weighting_args)
    except (KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"config: objective.weighting = {o.weighting!r}: {e}") from None


def build_schedule(cfg: Config, weighting: Any) -> Any:
    """The training schedule: ``Adaptive`` when objective.adaptive, else the named one."""
    import vdmpp.schedules as S

    o = cfg.objective
    ends = {"logsnr_min": o.logsnr_min, "logsnr_max": o.logsnr_max}
    try:
        if o.adaptive:
            return S.Adaptive(weighting, bins=o.adaptive_bins, decay=o.adaptive_decay, **ends)
        return getattr(S, _SCHEDULES[o.schedule])(**{**ends, **o.schedule_args})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config: objective schedule {o.schedule!r}: {e}") from None


def model_spec(cfg: Config) -> dict[str, Any]:
    """``{"name", "overrides"}`` with the data's shape filled in (what model.json records)."""
    d = cfg.data
    implied = {"in_channels": d.channels, "resolution": d.resolution, "num_classes": d.num_classes}
    over = dict(cfg.model.overrides)
    for k, v in implied.items():
        if k in over and over[k] != v:
            raise ConfigError(
                f"config: model.overrides.{k} = {over[k]!r} contradicts data ({k} = {v!r}); "
                f"drop the override, it is filled in from [data]"
            )
    return {"name": cfg.model.name, "overrides": {**over, **implied}}


def build_net(cfg: Config) -> nn.Module:
    """``Preconditioned(vdmpp.models.build(name, **overrides), ...)`` — clear errors on bad keys."""
    from vdmpp.models import Preconditioned, build

    spec = model_spec(cfg)
    o = cfg.objective
    try:
        net = build(spec["name"], **spec["overrides"])
        return Preconditioned(net, o.parameterization, sigma_data=o.sigma_data, process=o.process)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config: model {spec['name']!r} with {spec['overrides']}: {e}") from None


class Objective(nn.Module):
    """Seed 000 eq. 7 via ``vdmpp.losses.WeightedLoss``: ½·w(λ)/p(λ)·‖ε − ε̂‖² per example.

    Returns (per-example weighted loss, λ, unweighted ‖ε − ε̂‖²); the last two feed the adaptive
    schedule's bin statistics. Randomness comes only from ``generator`` (deterministic runs).
    Holds the schedule as a sub-module so its state (adaptive bins, learned parameters) moves
    with ``.to(device)`` and checkpoints.
    """

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        from vdmpp.losses import WeightedLoss

        o = cfg.objective
        weighting = build_weighting(cfg)
        self.schedule = build_schedule(cfg, weighting)
        try:
            self.loss = WeightedLoss(
                self.schedule,
                weighting,
                o.parameterization,
                o.process,
                sigma_data=o.sigma_data,
                time_sampler=o.time_sampler,
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config: [objective]: {e}") from None

    def forward(
        self, model: nn.Module, x: Tensor, labels: Tensor | None, generator: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor]:
        out = self.loss(model, x, labels, generator=generator)
        return out.loss, out.logsnr.detach(), out.unweighted.detach()


def schedule_meta(cfg: Config, schedule: Any) -> dict[str, Any]:
    """JSON description of the training schedule for model.json."""
    o = cfg.objective
    meta: dict[str, Any] = {
        "name": "adaptive" if o.adaptive else o.schedule,
        "weighting": o.weighting,
        "weighting_args": dict(o.weighting_args),
        "time_sampler": o.time_sampler,
    }
    if o.adaptive:
        meta.update(bins=o.adaptive_bins, decay=o.adaptive_decay)
        meta["density"] = [
            float(v) for v in (schedule.cdf[1:] - schedule.cdf[:-1]).tolist()
        ]
    else:
        meta["args"] = dict(o.schedule_args)
    lo, hi = schedule.logsnr_min, schedule.logsnr_max
    meta["logsnr_range"] = [float(lo), float(hi)]
    if not all(math.isfinite(v) for v in meta["logsnr_range"]):  # pragma: no cover
        raise ConfigError("schedule has non-finite ends")
    return meta
