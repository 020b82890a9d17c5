"""The sampling settings of ``vdmpp-eval``: the one place where sampler arguments are checked.

:class:`SampleSpec` holds everything that decides image k besides seed k and the model. Its
:meth:`~SampleSpec.check` (before any work) and :meth:`~SampleSpec.validate` (against the
model's ``model.json``) are the only checks of sampler names, steps, σ grid and per-sampler
options; the CLI, ``sample``, ``metrics`` and the library functions all call them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
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
        return self

    def validate(self, meta: dict) -> SampleSpec:
        """:meth:`check`, then against the model: its classes and guidance."""
        self.check()
        n = meta.get("num_classes")
        if self.class_label is not None and (not n or not 0 <= self.class_label < n):
            raise EvalError(
                f"--class {self.class_label} is outside the model's classes "
                f"({n or 'unconditional'})"
            )
        if self.guidance != 1.0 and not n:
            raise EvalError("--guidance needs a class-conditional model")
        return self

    def sigmas(self) -> torch.Tensor:
        from vdmpp.samplers import karras_sigmas

        return karras_sigmas(self.steps, self.sigma_min, self.sigma_max, self.rho)

    def options(self) -> dict[str, Any]:
        """The keyword arguments of the sampler function (its own options only)."""
        return {k: getattr(self, k) for k in _OPTIONS[self.sampler]}

    def record(self) -> dict[str, Any]:
        """The settings as JSON (``sample.json``; ``s_tmax`` inf → null)."""
        s = asdict(self)
        s["s_tmax"] = None if math.isinf(self.s_tmax) else self.s_tmax
        return s


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
