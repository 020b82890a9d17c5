"""The training objective: schedule + weighting + parameterization → per-example weighted loss.

Thin seams over the libraries (DESIGN.md names): ``vdmpp.schedules`` (schedules, ``vp``/``ve``,
time samplers, ``Adaptive``), ``vdmpp.losses`` (``weightings.get``, ``WeightedLoss``) and
``vdmpp.models`` (``build``, ``Preconditioned``).

Every name the config accepts comes from the libraries' own registries (no list is kept here):
schedules are the classes ``vdmpp.schedules`` exports, weightings ``vdmpp.losses.weightings``,
parameterizations and processes ``vdmpp.models``. :func:`check_objective` resolves them all and
validates every ``*_args`` key against the constructor's signature, so a bad config fails in
validation with a message naming the key and the fix — never later in a crash.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Config

__all__ = [
    "Objective",
    "build_net",
    "build_schedule",
    "build_weighting",
    "check_objective",
    "model_spec",
    "parameterization_names",
    "schedule_names",
    "weighting_names",
]

# Not schedules a config can name: the protocol, the base class, and Adaptive (which needs the
# weighting and is selected with objective.adaptive = true).
_NOT_NAMEABLE = {"NoiseSchedule", "TruncatedSchedule", "Adaptive"}
# Fixed keyword arguments the app fills in from other keys (one source of truth).
_FROM_CONFIG = {"logsnr_min": "objective.logsnr_min", "logsnr_max": "objective.logsnr_max"}


def _snake(name: str) -> str:
    s = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()
    return s.replace("log_snr", "logsnr")  # LinearLogSNR → linear_logsnr


def _norm(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "").replace(" ", "")


def schedule_names() -> dict[str, type]:
    """Every schedule class ``vdmpp.schedules`` exports, by config name (``edm_training``...)."""
    import vdmpp.schedules as S

    out: dict[str, type] = {}
    for attr in S.__all__:
        obj = getattr(S, attr)
        if isinstance(obj, type) and attr not in _NOT_NAMEABLE and hasattr(obj, "logsnr"):
            out[_snake(attr)] = obj
    return out


def weighting_names() -> list[str]:
    """Canonical names of ``vdmpp.losses.weightings`` (``weightings.get`` accepts them)."""
    from vdmpp.losses import weightings

    return weightings.names()


def parameterization_names() -> tuple[str, ...]:
    """The heads ``vdmpp.models.Preconditioned`` has (what a trained network can output)."""
    from vdmpp.models import PARAMETERIZATIONS

    return tuple(PARAMETERIZATIONS)


def process_names() -> tuple[str, ...]:
    from vdmpp.models import PROCESSES

    return tuple(PROCESSES)


def _suggest(word: str, options: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def _resolve_schedule(name: str) -> tuple[str, type]:
    names = schedule_names()
    by_norm = {_norm(k): k for k in names}
    key = by_norm.get(_norm(str(name)))
    if key is None:
        raise ConfigError(
            f"config: objective.schedule = {name!r} is not a vdmpp.schedules schedule; "
            f"{_suggest(name, list(names))}choose one of {', '.join(sorted(names))} "
            "(or objective.adaptive = true for VDM++'s adaptive schedule)"
        )
    return key, names[key]


def _accepted(cls: type) -> tuple[set[str], bool]:
    """(keyword names the constructor takes, whether it takes **kwargs)."""
    params = inspect.signature(cls.__init__).parameters.values()
    names = {
        p.name
        for p in params
        if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def _check_args(key: str, args: dict[str, Any], cls: type, what: str, *, reserved=()) -> None:
    names, var_kw = _accepted(cls)
    names -= set(reserved)
    for k in args:
        if k in reserved:
            raise ConfigError(
                f"config: {key}.{k} is set from {_FROM_CONFIG.get(k, k)}; set that key instead"
            )
        if k not in names and not var_kw:
            known = ", ".join(sorted(names)) or "none"
            raise ConfigError(
                f"config: {key}.{k} is not an argument of {what}; "
                f"{_suggest(k, sorted(names))}it takes: {known}"
            )


def check_objective(cfg: Config) -> None:
    """Resolve every objective name and check every ``*_args`` key (VDM++ Sec. 3–5 space).

    Raises :class:`ConfigError` with the key, the reason and what to use instead. Checked:
    schedule (any class ``vdmpp.schedules`` exports, ``learned`` included, or the adaptive
    schedule of VDM++ App. F), weighting (``vdmpp.losses.weightings``), parameterization and
    process (``vdmpp.models``), ``schedule_args``/``weighting_args`` against the constructors'
    signatures, and the combinations that cannot be trained.
    """
    o = cfg.objective
    # parameterization / process: the heads the model library has
    params = parameterization_names()
    if o.parameterization not in params:
        hint = ""
        if o.parameterization in ("flow", "o"):
            hint = (
                "flow matching (VDM++ App. D.3) is objective.schedule = 'flow_ot' with "
                "weighting = 'flowot' and parameterization = 'v'; "
            )
        elif o.parameterization == "score":
            hint = "a score head is ε-prediction up to −1/σ: use parameterization = 'eps'; "
        raise ConfigError(
            f"config: objective.parameterization = {o.parameterization!r} is not a head of "
            f"vdmpp.models.Preconditioned; {hint}{_suggest(o.parameterization, params)}"
            f"choose one of {', '.join(params)}"
        )
    procs = process_names()
    if o.process not in procs:
        raise ConfigError(
            f"config: objective.process = {o.process!r} is not one of {', '.join(procs)}"
        )
    # weighting (every one in the registry builds with its defaults)
    from vdmpp.losses import weightings

    wnames = weighting_names()
    try:
        wcls = type(weightings.get(o.weighting))
    except (TypeError, ValueError):
        raise ConfigError(
            f"config: objective.weighting = {o.weighting!r} is not a vdmpp.losses weighting; "
            f"{_suggest(o.weighting, wnames)}choose one of {', '.join(wnames)}"
        ) from None
    _check_args("objective.weighting_args", o.weighting_args, wcls, f"weighting {o.weighting!r}")
    weighting = build_weighting(cfg)
    # schedule
    name, scls = _resolve_schedule(o.schedule)
    if o.adaptive:
        if name == "learned":
            raise ConfigError(
                "config: objective.schedule = 'learned' with objective.adaptive = true: the "
                "adaptive schedule replaces the schedule; set objective.adaptive = false to learn "
                "the schedule (VDM App. H), or drop objective.schedule"
            )
        if o.schedule_args:
            raise ConfigError(
                f"config: objective.schedule_args = {o.schedule_args!r} with objective.adaptive "
                "= true: the adaptive schedule replaces the fixed one (its knobs are "
                "objective.adaptive_bins/adaptive_decay); set objective.adaptive = false to use "
                f"{name!r} with these arguments, or drop schedule_args"
            )
    else:
        _check_args(
            "objective.schedule_args",
            o.schedule_args,
            scls,
            f"schedule {name!r}",
            reserved=tuple(_FROM_CONFIG),
        )
    if o.label_dropout > 0 and cfg.data.num_classes is None:
        raise ConfigError(
            f"config: objective.label_dropout = {o.label_dropout!r} needs class labels; the data "
            "is unconditional (data.num_classes = none): set label_dropout = 0"
        )
    schedule = build_schedule(cfg, weighting)  # constructor-level checks (degenerate ends, ...)
    build_loss(cfg, schedule, weighting)  # the λ range where the weighting is finite, ...


def build_loss(cfg: Config, schedule: nn.Module, weighting: Any) -> Any:
    """``vdmpp.losses.WeightedLoss`` from already-resolved parts; its checks (the λ range where
    the weighting is finite, VDM++ App. E.3.1) are reported with the config keys."""
    from vdmpp.losses import WeightedLoss

    o = cfg.objective
    inner = schedule.inner if isinstance(schedule, FixedSchedule) else schedule
    try:
        return WeightedLoss(
            inner,
            weighting,
            o.parameterization,
            o.process,
            sigma_data=o.sigma_data,
            time_sampler=o.time_sampler,
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"config: [objective] (logsnr_min/logsnr_max = [{o.logsnr_min:g}, "
            f"{o.logsnr_max:g}], weighting {o.weighting!r}): {e}"
        ) from None


def build_weighting(cfg: Config) -> Any:
    from vdmpp.losses import weightings

    o = cfg.objective
    try:
        return weightings.get(o.weighting, **o.weighting_args)
    except (KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"config: objective.weighting = {o.weighting!r}: {e}") from None


class FixedSchedule(nn.Module):
    """A closed-form schedule seen as an ``nn.Module`` with no parameters and no state.

    The trainer treats every training schedule alike (``.parameters()`` for the optimizer,
    ``.state_dict()`` for checkpoints, ``.to(device)``); ``Adaptive`` and ``Learned`` are modules,
    the fixed schedules of VDM++ Table 4 are plain objects. Attribute reads fall through to the
    wrapped schedule (``logsnr``, ``pdf``, ``logsnr_pdf``, ``logsnr_min``, ...).
    """

    def __init__(self, schedule: Any) -> None:
        super().__init__()
        self.inner = schedule

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("inner")
            if inner is None:
                raise
            return getattr(inner, name)

    def extra_repr(self) -> str:
        return repr(self.inner)


def build_schedule(cfg: Config, weighting: Any) -> nn.Module:
    """The training schedule as a module: ``Adaptive`` when objective.adaptive, ``Learned``, or
    a fixed schedule wrapped in :class:`FixedSchedule`."""
    import vdmpp.schedules as S

    o = cfg.objective
    ends = {"logsnr_min": o.logsnr_min, "logsnr_max": o.logsnr_max}
    name, cls = _resolve_schedule(o.schedule)
    try:
        if o.adaptive:
            return S.Adaptive(weighting, bins=o.adaptive_bins, decay=o.adaptive_decay, **ends)
        sched = cls(**{**o.schedule_args, **ends})
    except (TypeError, ValueError) as e:
        what = "adaptive schedule" if o.adaptive else f"schedule {name!r}"
        raise ConfigError(f"config: objective {what}: {e}") from None
    return sched if isinstance(sched, nn.Module) else FixedSchedule(sched)


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
    from vdmpp.models import CONFIGS, Preconditioned, build

    spec = model_spec(cfg)
    o = cfg.objective
    if spec["name"] not in CONFIGS:
        raise ConfigError(
            f"config: model.name = {spec['name']!r} is not a vdmpp.models config; "
            f"{_suggest(spec['name'], list(CONFIGS))}choose one of {', '.join(CONFIGS)}"
        )
    try:
        net = build(spec["name"], **spec["overrides"])
        return Preconditioned(net, o.parameterization, sigma_data=o.sigma_data, process=o.process)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config: model {spec['name']!r} with {spec['overrides']}: {e}") from None


class Objective(nn.Module):
    """VDM++ eq. 7 via ``vdmpp.losses.WeightedLoss``: ½·w(λ)/p(λ)·‖ε − ε̂‖² per example.

    With ``objective.uncertainty``, EDM2's learned u(λ) (eq. 21) rescales the loss to
    ℓ·e^{−u(λ)} + u(λ), so e^{u} tracks E[ℓ | λ]; the adaptive schedule still bins the
    unweighted ‖ε − ε̂‖², so p(λ) follows w(λ)·E‖ε − ε̂‖² (see ``vdmpp.losses.uncertainty``).

    With ``objective.label_dropout = p`` each label becomes the null class (index
    ``num_classes``, what ``class_labels=None`` selects) with probability p, drawn first from
    the step's ``generator``, so the null embedding is trained for classifier-free guidance.

    Returns (per-example weighted loss, λ, unweighted ‖ε − ε̂‖²); the last two feed the adaptive
    schedule's bin statistics. Randomness comes only from ``generator`` (deterministic runs).
    Holds the schedule as a sub-module (fixed schedules wrapped in :class:`FixedSchedule`) so its
    parameters (``Learned``) reach the optimizer and its state (adaptive bins) moves with
    ``.to(device)`` and checkpoints.
    """

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        # cfg was validated (Config.validate → check_objective): only construction happens here
        weighting = build_weighting(cfg)
        self.schedule = build_schedule(cfg, weighting)
        self.loss = build_loss(cfg, self.schedule, weighting)
        self.label_dropout = float(cfg.objective.label_dropout)
        self.num_classes = cfg.data.num_classes
        self.uncertainty: nn.Module | None = None
        if cfg.objective.uncertainty:  # EDM2 eq. 21; its parameters join the optimizer
            from vdmpp.losses import LogVarianceMLP

            self.uncertainty = LogVarianceMLP()

    def forward(
        self, model: nn.Module, x: Tensor, labels: Tensor | None, generator: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor]:
        if labels is not None and self.label_dropout > 0:  # CFG training (Ho & Salimans 2022)
            drop = torch.rand(labels.shape, generator=generator, device=labels.device)
            labels = torch.where(drop < self.label_dropout, self.num_classes, labels)
        out = self.loss(model, x, labels, generator=generator)
        loss = out.loss
        if self.uncertainty is not None:  # ℓ·e^{−u(λ)} + u(λ); the adaptive bins see ‖ε−ε̂‖²
            from vdmpp.losses import uncertainty_weighted

            loss = uncertainty_weighted(loss, self.uncertainty(out.logsnr.detach()))
        return loss, out.logsnr.detach(), out.unweighted.detach()

    @torch.no_grad()
    def uncertainty_table(self, n: int = 65) -> dict[str, list[float]] | None:
        """u(λ) on a grid of the schedule's λ range (model.json, ``vdmpp-eval plot --run``)."""
        if self.uncertainty is None:
            return None
        lo, hi = (
            float(torch.as_tensor(v).detach())
            for v in (self.schedule.logsnr_min, self.schedule.logsnr_max)
        )
        p = next(self.uncertainty.parameters())
        lam = torch.linspace(lo, hi, n, device=p.device, dtype=torch.float32)
        return {"logsnr": lam.tolist(), "u": self.uncertainty(lam).float().tolist()}


def schedule_meta(cfg: Config, schedule: Any) -> dict[str, Any]:
    """JSON description of the training schedule for model.json."""
    o = cfg.objective
    meta: dict[str, Any] = {
        "name": "adaptive" if o.adaptive else _resolve_schedule(o.schedule)[0],
        "weighting": o.weighting,
        "weighting_args": dict(o.weighting_args),
        "time_sampler": o.time_sampler,
    }
    if o.adaptive:
        meta.update(bins=o.adaptive_bins, decay=o.adaptive_decay)
        meta["density"] = [float(v) for v in (schedule.cdf[1:] - schedule.cdf[:-1]).tolist()]
    else:
        meta["args"] = dict(o.schedule_args)
    lo, hi = schedule.logsnr_min, schedule.logsnr_max  # Learned: parameters
    meta["logsnr_range"] = [float(torch.as_tensor(v).detach()) for v in (lo, hi)]
    if not all(math.isfinite(v) for v in meta["logsnr_range"]):  # pragma: no cover
        raise ConfigError("schedule has non-finite ends")
    return meta
