"""``SAMPLERS``: every sampler by name, with the options it takes (type, default, help).

A new sampler is one function, one row here and one test row. Apps read this table for their
``--sampler`` choices and per-sampler flags, and call :func:`check_options` so that an option a
sampler does not take is refused with one line::

    spec = SAMPLERS["dpmpp_2m_sde"]
    opts = check_options("dpmpp_2m_sde", {"eta": 0.5})   # {"eta": 0.5}
    x0, info = spec.fn(D, noise, sigmas, generator=gen, return_info=True, **opts)
    check_options("dpmpp_2m", {"eta": 0.5})               # ValueError, one line

The common arguments of every sampler (``generator``, ``callback``, ``extra_args``,
``return_info``, ``check_finite``, ``progress``) are not options.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .adaptive import dpm_adaptive
from .fast import (
    dpm_2,
    dpm_2_ancestral,
    dpmpp_2m,
    dpmpp_2m_sde,
    dpmpp_2s_ancestral,
    dpmpp_3m_sde,
    dpmpp_sde,
    euler_ancestral,
    lms,
)
from .samplers import ddim, ddpm, edm_stochastic, euler, heun
from .unipc import unipc

__all__ = ["SAMPLERS", "SamplerOption", "SamplerSpec", "check_options"]

COMMON = ("generator", "callback", "extra_args", "return_info", "check_finite", "progress")


@dataclass(frozen=True)
class SamplerOption:
    """One keyword option: its Python type (``float``, ``int``, ``str``, ``bool``), default,
    allowed values (``choices``, or None for any) and a one-line help."""

    type: type
    default: Any
    help: str
    choices: tuple | None = None


@dataclass(frozen=True)
class SamplerSpec:
    """A registry row: the function, its options, and what a caller needs to drive it.

    ``nfe(n)``: denoiser evaluations on a grid of n steps ending at σ = 0 (None for the adaptive
    solver, whose NFE depends on its tolerances). ``stochastic``: draws noise with its defaults.
    ``grid``: False when the sampler takes σ bounds rather than a step grid (``dpm_adaptive``).
    """

    name: str
    fn: Callable[..., Any]
    help: str
    options: Mapping[str, SamplerOption] = field(default_factory=dict)
    nfe: Callable[[int], int] | None = None
    stochastic: bool = False
    grid: bool = True


def _eta(default: float, what: str = "ancestral noise: 0 deterministic, 1 the DDPM posterior"):
    return SamplerOption(float, default, f"η, {what}")


_S_NOISE = SamplerOption(float, 1.0, "scale of the added noise (1: exact)")
_KERNELS = SamplerOption(bool, None, "fused vdmpp.kernels ops: None auto, True demand, False off")
_SDE_ETA = _eta(1.0, "SDE noise: 0 is the ODE solver")


def _one(n: int) -> int:
    return n


def _two(n: int) -> int:
    return 2 * n - 1


_ROWS = [
    SamplerSpec("euler", euler, "Euler on the PF-ODE (EDM Alg. 1 without the correction)",
                {"use_kernels": _KERNELS}, _one),
    SamplerSpec("heun", heun, "EDM's Heun sampler (EDM Alg. 1), 2nd order",
                {"use_kernels": _KERNELS}, _two),
    SamplerSpec("edm_stochastic", edm_stochastic, "EDM's stochastic sampler (EDM Alg. 2)", {
        "churn": SamplerOption(float, 0.0, "S_churn: total noise added (0: Heun)"),
        "s_tmin": SamplerOption(float, 0.0, "S_tmin: churn only for σ >= s_tmin"),
        "s_tmax": SamplerOption(float, math.inf, "S_tmax: churn only for σ <= s_tmax"),
        "s_noise": SamplerOption(float, 1.0, "S_noise: churn noise scale"),
        "use_kernels": _KERNELS}, _two, stochastic=False),
    SamplerSpec("ddpm", ddpm, "DDPM ancestral sampling (VDM eq. 28)", {}, _one, stochastic=True),
    SamplerSpec("ddim", ddim, "DDIM (Song et al. 2021); eta=1 is ddpm",
                {"eta": _eta(0.0, "DDIM's noise: 0 deterministic, 1 DDPM")}, _one),
    SamplerSpec("euler_ancestral", euler_ancestral, "ancestral sampling with Euler steps",
                {"eta": _eta(1.0), "s_noise": _S_NOISE}, _one, stochastic=True),
    SamplerSpec("dpm_2", dpm_2, "k-diffusion's DPM-Solver-2 (midpoint in log σ), 2nd order",
                {}, _two),
    SamplerSpec("dpm_2_ancestral", dpm_2_ancestral, "ancestral sampling with DPM-Solver-2 steps",
                {"eta": _eta(1.0), "s_noise": _S_NOISE}, _two, stochastic=True),
    SamplerSpec("lms", lms, "linear multistep (Adams–Bashforth in σ)", {
        "order": SamplerOption(int, 4, "multistep order", (1, 2, 3, 4, 5, 6, 7, 8))}, _one),
    SamplerSpec("dpmpp_2s_ancestral", dpmpp_2s_ancestral,
                "ancestral sampling with DPM-Solver++(2S) steps",
                {"eta": _eta(1.0), "s_noise": _S_NOISE}, _two, stochastic=True),
    SamplerSpec("dpmpp_sde", dpmpp_sde, "DPM-Solver++ stochastic 2-stage (k-diffusion)", {
        "eta": _SDE_ETA, "s_noise": _S_NOISE,
        "r": SamplerOption(float, 0.5, "relative position of the stage point in λ")},
        _two, stochastic=True),
    SamplerSpec("dpmpp_2m", dpmpp_2m, "DPM-Solver++(2M) multistep, 2nd order", {}, _one),
    SamplerSpec("dpmpp_2m_sde", dpmpp_2m_sde, "DPM-Solver++(2M) SDE", {
        "eta": _SDE_ETA, "s_noise": _S_NOISE,
        "solver_type": SamplerOption(str, "midpoint", "second-order term", ("midpoint", "heun"))},
        _one, stochastic=True),
    SamplerSpec("dpmpp_3m_sde", dpmpp_3m_sde, "DPM-Solver++(3M) SDE (eta=0: 3M ODE, 3rd order)",
                {"eta": _SDE_ETA, "s_noise": _S_NOISE}, _one, stochastic=True),
    SamplerSpec("unipc", unipc, "UniPC multistep predictor-corrector (Zhao et al. 2023)", {
        "order": SamplerOption(int, 2, "order of the predictor (UniC adds one)", (1, 2, 3)),
        "variant": SamplerOption(str, "bh1", "B(h): bh1 = −h, bh2 = expm1(−h)", ("bh1", "bh2"))},
        _one),
    SamplerSpec("dpm_adaptive", dpm_adaptive,
                "adaptive-step DPM-Solver-12/23 from sigma_max to sigma_min", {
        "sigma_min": SamplerOption(float, None, "lowest σ (default: the grid's smallest > 0)"),
        "sigma_max": SamplerOption(float, None, "highest σ (default: the grid's largest)"),
        "order": SamplerOption(int, 3, "2: DPM-Solver-12, 3: DPM-Solver-23", (2, 3)),
        "rtol": SamplerOption(float, 0.05, "relative error tolerance"),
        "atol": SamplerOption(float, 0.0078, "absolute error tolerance"),
        "h_init": SamplerOption(float, 0.05, "first step size in λ = −log σ"),
        "pcoeff": SamplerOption(float, 0.0, "PID controller: proportional coefficient"),
        "icoeff": SamplerOption(float, 1.0, "PID controller: integral coefficient"),
        "dcoeff": SamplerOption(float, 0.0, "PID controller: derivative coefficient"),
        "accept_safety": SamplerOption(float, 0.81, "accept a step when its factor >= this"),
        "eta": _eta(0.0), "s_noise": _S_NOISE,
        "denoise_to_zero": SamplerOption(bool, False, "finish with x = D(x; sigma_min) (+1 NFE)")},
        None, grid=False),
]  # fmt: skip

SAMPLERS: Mapping[str, SamplerSpec] = MappingProxyType({r.name: r for r in _ROWS})


def _coerce(name: str, key: str, opt: SamplerOption, value: Any) -> Any:
    if value is None and opt.default is None:
        return None
    t = opt.type
    ok = (
        isinstance(value, bool)
        if t is bool
        else isinstance(value, int) and not isinstance(value, bool)
        if t is int
        else isinstance(value, (int, float)) and not isinstance(value, bool)
        if t is float
        else isinstance(value, t)
    )
    if not ok:
        raise ValueError(f"sampler {name!r}: option {key!r} must be {t.__name__}, got {value!r}")
    value = float(value) if t is float else value
    if opt.choices is not None and value not in opt.choices:
        allowed = ", ".join(map(str, opt.choices))
        raise ValueError(
            f"sampler {name!r}: option {key!r} must be one of {allowed}, got {value!r}"
        )
    return value


def check_options(name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Validate ``options`` for sampler ``name`` and return them (floats coerced to float).

    Raises ``ValueError`` with one line for an unknown sampler (listing the known ones), an
    option the sampler does not take (naming both, and what it does take), a value of the wrong
    type, or one outside the option's choices. Options left out keep the function's defaults.
    """
    spec = SAMPLERS.get(name)
    if spec is None:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
    out: dict[str, Any] = {}
    for key, value in (options or {}).items():
        opt = spec.options.get(key)
        if opt is None:
            takes = ", ".join(spec.options) or "no options"
            raise ValueError(f"sampler {name!r} does not take option {key!r} (it takes: {takes})")
        out[key] = _coerce(name, key, opt, value)
    return out
