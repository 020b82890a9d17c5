"""The sampling settings of ``vdmpp-eval``: the one place where sampler arguments are checked.

:class:`SampleSpec` holds everything that decides image k besides seed k and the model. Its
:meth:`~SampleSpec.check` (before any work) and :meth:`~SampleSpec.validate` (against the
model's ``model.json``) are the only checks of sampler names, steps, σ grid and per-sampler
options; the CLI, ``sample``, ``metrics`` and the library functions all call them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .model import EvalError

__all__ = ["SAMPLERS", "SampleSpec", "run_sampler"]

# name → the SampleSpec fields the sampler takes (besides the σ grid)
_OPTIONS: dict[str, tuple[str, ...]] = {
    "heun": (),
    "edm": ("churn", "s_tmin", "s_tmax", "s_noise"),
    "euler": (),
    "ddpm": (),
    "ddim": ("eta",),
}
SAMPLERS = tuple(_OPTIONS)
_FINITE = ("churn", "s_tmin", "s_noise", "eta", "guidance", "sigma_min", "sigma_max", "rho")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class SampleSpec:
    """Everything that decides image k besides seed k and the model."""

    sampler: str = "heun"
    steps: int = 18
    churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0
    eta: float = 0.0
    guidance: float = 1.0
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    class_label: int | None = None
    precision: str = "fp32"
    guidance_interval: tuple[float, float] | None = None
    guide: str | None = None
    force_guidance: bool = field(default=False, compare=False)

    def check(self) -> SampleSpec:
        """The checks that need no model: names, counts, finite numbers, the σ range."""
        if self.sampler not in SAMPLERS:
            raise EvalError(f"unknown sampler {self.sampler!r}; expected one of {SAMPLERS}")
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

    def options(self) -> dict[str, Any]:
        """The keyword arguments of the sampler function (its own options only)."""
        return {k: getattr(self, k) for k in _OPTIONS[self.sampler]}

    def record(self) -> dict[str, Any]:
        """The settings as JSON (``sample.json``; ``s_tmax`` inf → null; the guide's resolved
        path). Settings added after 0.2 appear only when set, so older records still match."""
        s = asdict(self)
        s["s_tmax"] = None if math.isinf(self.s_tmax) else self.s_tmax
        del s["force_guidance"]  # a check, not a setting: the images are the same
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


_FUNCTIONS = {"edm": "edm_stochastic"}  # sampler name → function of vdmpp.samplers


def run_sampler(
    denoiser: Any, noise: torch.Tensor, spec: SampleSpec, gen: Any, extra: dict
) -> tuple[torch.Tensor, int]:
    """(images, NFE) of one batch: ``spec``'s sampler on its σ grid."""
    from vdmpp import samplers as S

    fn = getattr(S, _FUNCTIONS.get(spec.sampler, spec.sampler))
    x, info = fn(
        denoiser,
        noise,
        spec.sigmas(),
        generator=gen,
        extra_args=extra,
        return_info=True,
        **spec.options(),
    )
    return x, info.nfe
