"""The sampling settings of ``vdmpp-eval``: the one place where sampler arguments are checked.

:class:`SampleSpec` holds everything that decides image k besides seed k and the model. Its
:meth:`~SampleSpec.check` (before any work) and :meth:`~SampleSpec.validate` (against the
model's ``model.json``) are the only checks of sampler names, steps, σ grid and per-sampler
options; the CLI, ``sample``, ``metrics`` and the library functions all call them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vdmpp.samplers import SAMPLERS as _REGISTRY

from .model import EvalError

__all__ = ["SAMPLERS", "OptionFlag", "SampleSpec", "option_flags", "run_sampler", "sampler_row"]

# ``--sampler`` takes every name of vdmpp.samplers.SAMPLERS, and ``edm`` (vdmpp-eval 0.2's name)
_ALIASES = {"edm": "edm_stochastic"}
SAMPLERS = (*_REGISTRY, *_ALIASES)
# registry options that are not flags: the grid's own --sigma-min/--sigma-max, kernel dispatch
_NOT_FLAGS = ("sigma_min", "sigma_max", "use_kernels")
# options that are SampleSpec fields (vdmpp-eval 0.2); at these defaults they count as unset
_FIELDS = {"churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0, "eta": None}
_FINITE = ("churn", "s_tmin", "s_noise", "guidance", "sigma_min", "sigma_max", "rho")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def sampler_row(name: str) -> Any:
    """The ``vdmpp.samplers.SAMPLERS`` row of ``name`` (``edm`` is ``edm_stochastic``)."""
    row = _REGISTRY.get(_ALIASES.get(name, name))
    if row is None:
        raise EvalError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")
    return row


@dataclass(frozen=True)
class OptionFlag:
    """A per-sampler option as one flag: its type, the most common help line among the samplers
    that take it, their defaults ({sampler: default}) and the union of their choices."""

    type: type
    help: str
    defaults: Mapping[str, Any]
    choices: tuple | None


def option_flags() -> dict[str, OptionFlag]:
    """Every option of ``vdmpp.samplers.SAMPLERS`` that is a flag, by name."""
    from collections import Counter

    rows: dict[str, list[tuple[str, Any]]] = {}
    for row in _REGISTRY.values():
        for key, opt in row.options.items():
            if key not in _NOT_FLAGS:
                rows.setdefault(key, []).append((row.name, opt))
    out = {}
    for key, takers in rows.items():
        opts = [o for _, o in takers]
        choices = None
        if all(o.choices for o in opts):
            choices = tuple(dict.fromkeys(c for o in opts for c in o.choices))
        out[key] = OptionFlag(
            type=opts[0].type,
            help=Counter(o.help for o in opts).most_common(1)[0][0],
            defaults={name: o.default for name, o in takers},
            choices=choices,
        )
    return out


@dataclass(frozen=True)
class SampleSpec:
    """Everything that decides image k besides seed k and the model.

    Sampler options: ``churn``, ``s_tmin``, ``s_tmax``, ``s_noise`` and ``eta`` are fields (at
    their defaults: unset); every other option of the sampler's ``vdmpp.samplers.SAMPLERS`` row
    goes in ``options``. An unset option keeps the sampler's default. ``given`` names options
    set explicitly (the CLI's flags), so that one a sampler does not take is refused even at its
    default value."""

    sampler: str = "heun"
    steps: int = 18
    churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0
    eta: float | None = None
    guidance: float = 1.0
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    class_label: int | None = None
    precision: str = "fp32"
    guidance_interval: tuple[float, float] | None = None
    guide: str | None = None
    force_guidance: bool = field(default=False, compare=False)
    options: Mapping[str, Any] = field(default_factory=dict)
    given: frozenset[str] = field(default=frozenset(), compare=False)

    @classmethod
    def from_options(cls, options: Mapping[str, Any], **settings: Any) -> SampleSpec:
        """``settings`` plus the sampler options set explicitly (the CLI's flags)."""
        fields_ = {k: v for k, v in options.items() if k in _FIELDS}
        rest = {k: v for k, v in options.items() if k not in _FIELDS}
        return cls(**settings, **fields_, options=rest, given=frozenset(options))

    def sampler_options(self) -> dict[str, Any]:
        """The options to pass to the sampler: ``options`` and the option fields that are set."""
        out = dict(self.options)
        for key, default in _FIELDS.items():
            v = getattr(self, key)
            if key in self.given or v != default:
                if key in self.options:
                    raise EvalError(f"{_flag(key)} is given twice (as a field and in options)")
                out[key] = v
        return out

    def check(self) -> SampleSpec:
        """The checks that need no model: names, counts, finite numbers, the σ range, and that
        every option set is one the sampler takes (with a value of its type and choices)."""
        self._check_options()
        if self.steps < 1:
            raise EvalError(f"--steps must be >= 1, got {self.steps}")
        for name in _FINITE:
            v = getattr(self, name)
            if not math.isfinite(v):
                raise EvalError(f"{_flag(name)} must be a finite number, got {v}")
        if math.isnan(self.s_tmax):
            raise EvalError("--s-tmax must be a number (inf allowed), got nan")
        if not 0 < self.sigma_min < self.sigma_max:
            raise EvalError(
                f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}"
            )
        if self.precision not in ("fp32", "bf16"):
            raise EvalError(f"--precision must be fp32 or bf16, got {self.precision!r}")
        self._check_guidance()
        return self

    def _check_options(self) -> None:
        from vdmpp.samplers import check_options

        row = sampler_row(self.sampler)
        opts = self.sampler_options()
        for key, value in opts.items():
            if key not in row.options or key in _NOT_FLAGS:
                takes = [_flag(k) for k in row.options if k not in _NOT_FLAGS]
                raise EvalError(
                    f"{_flag(key)}: sampler {self.sampler} does not take it (its options: "
                    f"{', '.join(takes) or 'none'})"
                )
            inf_ok = key == "s_tmax" and value == math.inf
            if isinstance(value, float) and not math.isfinite(value) and not inf_ok:
                raise EvalError(f"{_flag(key)} must be a finite number, got {value}")
        try:
            check_options(row.name, opts)
        except ValueError as e:  # a value of the wrong type or outside the option's choices
            raise EvalError(f"--sampler {self.sampler}: {e}") from None

    def _check_guidance(self) -> None:
        if self.guidance == 1.0:
            for flag, v in (
                ("--guidance-interval", self.guidance_interval),
                ("--guide", self.guide),
            ):
                if v is not None:
                    raise EvalError(f"{flag} needs --guidance w with w != 1 (1: no guidance)")
        if self.guidance_interval is not None:
            lo, hi = (float(v) for v in self.guidance_interval)
            if not (math.isfinite(lo) and 0 <= lo < hi) or math.isnan(hi):
                raise EvalError(
                    f"--guidance-interval {lo:g} {hi:g}: need 0 <= LO < HI (σ; HI may be inf)"
                )

    def validate(self, meta: dict, guide_meta: dict | None = None) -> SampleSpec:
        """:meth:`check`, then against the model (``model.json``): its classes, and whether it
        can be guided — by its own null class (CFG: trained with label dropout) or by
        ``guide_meta``'s model (autoguidance: the same data shape and classes)."""
        self.check()
        n = meta.get("num_classes")
        if self.class_label is not None and (not n or not 0 <= self.class_label < n):
            raise EvalError(
                f"--class {self.class_label} is outside the model's classes "
                f"({n or 'unconditional'})"
            )
        if self.guide is not None:
            if guide_meta is not None:  # (None: the model's checks only, the guide not loaded)
                _check_guide(self.guide, meta, guide_meta)
        elif self.guidance != 1.0:
            if not n:
                raise EvalError(
                    "--guidance needs a class-conditional model (or --guide MODEL: autoguidance)"
                )
            dropout = meta.get("label_dropout") or 0.0
            if not dropout and not self.force_guidance:
                raise EvalError(
                    f"--guidance {self.guidance:g}: this model was trained without label dropout "
                    f"(model.json label_dropout = {dropout:g}), so its unconditional (null-class) "
                    "branch is untrained and classifier-free guidance would use a random "
                    "embedding; train with [objective] label_dropout = 0.1, guide it with another "
                    "model (--guide RUN_OR_EXPORT), or pass --force-guidance to use it anyway"
                )
        return self

    def sigmas(self) -> torch.Tensor:
        from vdmpp.samplers import karras_sigmas

        return karras_sigmas(self.steps, self.sigma_min, self.sigma_max, self.rho)

    def record(self) -> dict[str, Any]:
        """The settings as JSON (``sample.json``; ``s_tmax`` inf → null; the guide's resolved
        path). Settings added after 0.2 appear only when set, so older records still match."""
        s = asdict(self)
        s["s_tmax"] = None if math.isinf(self.s_tmax) else self.s_tmax
        del s["force_guidance"], s["given"]  # checks, not settings: the images are the same
        if not self.options:
            del s["options"]
        else:
            s["options"] = dict(sorted(self.options.items()))
        if self.guidance_interval is None:
            del s["guidance_interval"]
        else:
            lo, hi = (float(v) for v in self.guidance_interval)
            s["guidance_interval"] = [lo, None if math.isinf(hi) else hi]
        if self.guide is None:
            del s["guide"]
        else:
            s["guide"] = str(Path(self.guide).resolve())
        return s

    def denoiser(self, denoiser: Any, guide: Any = None) -> Any:
        """``denoiser`` guided as asked (``vdmpp.samplers.guided``), or unchanged at w = 1."""
        if self.guidance == 1.0:
            return denoiser
        from vdmpp.samplers import guided

        kw: dict[str, Any] = {}
        if guide is not None:
            kw["guide"] = guide
        if self.guidance_interval is not None:
            kw["interval"] = tuple(float(v) for v in self.guidance_interval)
        return guided(denoiser, self.guidance, **kw)


def _check_guide(path: str, meta: dict, guide_meta: dict) -> None:
    """An autoguidance guide sees the same images and classes as the model it guides."""
    for key in ("resolution", "channels", "num_classes"):
        if guide_meta.get(key) != meta.get(key):
            raise EvalError(
                f"--guide {path}: its {key} is {guide_meta.get(key)} but the model's is "
                f"{meta.get(key)}; a guide must share the model's resolution, channels and "
                "classes (e.g. an earlier or smaller model trained on the same data)"
            )


def run_sampler(
    denoiser: Any, noise: torch.Tensor, spec: SampleSpec, gen: Any, extra: dict
) -> tuple[torch.Tensor, int]:
    """(images, NFE) of one batch: ``spec``'s sampler on its σ grid (``dpm_adaptive`` uses
    the grid's ends as its σ_max and σ_min)."""
    row = sampler_row(spec.sampler)
    try:
        x, info = row.fn(
            denoiser,
            noise,
            spec.sigmas(),
            generator=gen,
            extra_args=extra,
            return_info=True,
            **spec.sampler_options(),
        )
    except ValueError as e:  # an option value the sampler refuses (its own range checks)
        raise EvalError(f"--sampler {spec.sampler}: {e}") from None
    return x, info.nfe
