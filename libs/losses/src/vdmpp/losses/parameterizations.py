"""Network-output parameterizations and exact conversions (VDM++ App. E.2, D.2, D.3).

Given z = αx + σε at log-SNR λ (α, σ of the ``process``: "vp" or "ve", from
``vdmpp.schedules.vp`` / ``ve``), every parameterization is a linear target y = A·x + B·ε:

========  =====================================  =========================================
name      target                                 (A, B)
========  =====================================  =========================================
``eps``   ε                                      (0, 1)
``x``     x                                      (1, 0)
``v``     v = αε − σx  (eq. 49)                  (−σ, α)
``score`` ∇_z log q(z|x) = −ε/σ  (eq. 117)       (0, −1/σ)
``flow``  o = x − ε  (eq. 72)                    (1, −1)
``edm``   F, x = c_skip·z/α + c_out·F            (e^{−λ/2}/(σ_d r), −σ_d/r), r = √(e^{−λ}+σ_d²)
========  =====================================  =========================================

``edm`` is EDM's F (EDM Table 1) applied to the input in EDM's units z/α = x + e^{−λ/2}ε:
c_skip = σ_d²/(e^{−λ} + σ_d²), c_out = e^{−λ/2}σ_d/r, so F = (e^{−λ/2}x/σ_d − σ_d ε)/r. For VE this
is VDM++ eq. 118; eq. 119 generalises it with c_skip·α·z, which agrees only for α = 1 — we keep
EDM's own definition (the input rescaled to VE units) so an EDM network means the same thing under
both processes. Its error relation ‖ε − ε̂‖² = (e^{−λ}/σ_d² + 1)^{−1}‖F − F̂‖² (eq. 126) holds either
way.

Conversion: with det = αB − σA ≠ 0, x = (Bz − σy)/det and ε = (αy − Az)/det. Because a prediction ŷ
and the truth y share z, ε − ε̂ = (α/det)(y − ŷ): :func:`eps_scale` gives that factor, so the
ε-error (eq. 122–126) is computed without the cancellation of going through ε̂.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vdmpp.schedules import PARAMETERIZATIONS, PROCESSES, ve, vp

__all__ = [
    "NAMES",
    "PROCESSES",
    "alpha_sigma",
    "check_name",
    "check_process",
    "coefficients",
    "convert",
    "eps_scale",
    "target",
    "to_eps",
    "to_x",
]

NAMES = PARAMETERIZATIONS  # vdmpp.schedules: the one list every package reads


def check_name(name: str) -> str:
    """Return ``name`` if it is a known parameterization, else raise ValueError."""
    if name not in NAMES:
        raise ValueError(f"unknown parameterization {name!r}; choose one of {', '.join(NAMES)}")
    return name


def check_process(process: str) -> str:
    """Return ``process`` if it is "vp" or "ve", else raise ValueError."""
    if process not in PROCESSES:
        raise ValueError(f"unknown process {process!r}; choose one of {', '.join(PROCESSES)}")
    return process


def _check_sigma_data(sigma_data: float) -> None:
    if not (isinstance(sigma_data, (int, float)) and sigma_data > 0 and math.isfinite(sigma_data)):
        raise ValueError(f"sigma_data must be a positive finite float, got {sigma_data!r}")


def alpha_sigma(logsnr: Tensor, process: str = "vp") -> tuple[Tensor, Tensor]:
    """(α, σ) of the process at λ: ``vdmpp.schedules.vp`` or ``ve``."""
    return vp(logsnr) if check_process(process) == "vp" else ve(logsnr)


def coefficients(
    name: str, logsnr: Tensor, *, process: str = "vp", sigma_data: float = 0.5
) -> tuple[Tensor, Tensor]:
    """(A, B) with target = A·x + B·ε for parameterization ``name`` at λ (same shape as λ)."""
    check_name(name)
    alpha, sigma = alpha_sigma(logsnr, process)
    if name == "eps":
        return torch.zeros_like(alpha), torch.ones_like(alpha)
    if name == "x":
        return torch.ones_like(alpha), torch.zeros_like(alpha)
    if name == "v":
        return -sigma, alpha
    if name == "score":
        return torch.zeros_like(alpha), -1.0 / sigma
    if name == "flow":
        return torch.ones_like(alpha), -torch.ones_like(alpha)
    _check_sigma_data(sigma_data)
    lam = logsnr.float() if logsnr.dtype in (torch.float16, torch.bfloat16) else logsnr
    log_sd = math.log(sigma_data)
    log_r = 0.5 * torch.logaddexp(-lam, torch.full_like(lam, 2.0 * log_sd))  # r = √(e^{−λ}+σ_d²)
    a = torch.exp(-0.5 * lam - log_sd - log_r)
    b = -torch.exp(log_sd - log_r)
    return a.to(alpha.dtype), b.to(alpha.dtype)


def _per_example(logsnr: Tensor, like: Tensor, what: str = "logsnr") -> Tensor:
    """Reshape λ of shape [] or [B] to broadcast against ``like`` of shape [B, ...]."""
    if not isinstance(logsnr, Tensor):
        logsnr = torch.as_tensor(logsnr, dtype=like.dtype, device=like.device)
    if logsnr.dim() == 0:
        return logsnr
    if like.dim() == 0 or logsnr.shape != like.shape[:1]:
        raise ValueError(
            f"{what} must have shape [] or [batch] = [{like.shape[0] if like.dim() else ''}], "
            f"got {tuple(logsnr.shape)} for data of shape {tuple(like.shape)}"
        )
    return logsnr.reshape(logsnr.shape + (1,) * (like.dim() - 1))


def _same_shape(a: Tensor, b: Tensor, na: str, nb: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{na} and {nb} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def target(
    name: str,
    x: Tensor,
    eps: Tensor,
    logsnr: Tensor,
    *,
    process: str = "vp",
    sigma_data: float = 0.5,
) -> Tensor:
    """The regression target A·x + B·ε of parameterization ``name`` for data x and noise ε."""
    _same_shape(x, eps, "x", "eps")
    lam = _per_example(logsnr, x)
    a, b = coefficients(name, lam, process=process, sigma_data=sigma_data)
    if name == "eps":
        return eps
    if name == "x":
        return x
    return a * x + b * eps


def convert(
    output: Tensor,
    src: str,
    dst: str,
    z: Tensor,
    logsnr: Tensor,
    *,
    process: str = "vp",
    sigma_data: float = 0.5,
) -> Tensor:
    """Convert a network output from parameterization ``src`` to ``dst`` given z and λ.

    z is in the units of ``process``; λ has shape [] or [batch]. Exact up to rounding.
    """
    check_name(src), check_name(dst)
    _same_shape(output, z, "output", "z")
    if src == dst:
        return output
    lam = _per_example(logsnr, z)
    alpha, sigma = alpha_sigma(lam, process)
    a_s, b_s = coefficients(src, lam, process=process, sigma_data=sigma_data)
    det = alpha * b_s - sigma * a_s
    if dst == "eps":
        return (alpha * output - a_s * z) / det
    if dst == "x":
        return (b_s * z - sigma * output) / det
    x = (b_s * z - sigma * output) / det
    eps = (alpha * output - a_s * z) / det
    a_d, b_d = coefficients(dst, lam, process=process, sigma_data=sigma_data)
    return a_d * x + b_d * eps


def to_eps(output: Tensor, name: str, z: Tensor, logsnr: Tensor, **kwargs: float | str) -> Tensor:
    """ε̂ from a network output in parameterization ``name`` (see :func:`convert`)."""
    return convert(output, name, "eps", z, logsnr, **kwargs)  # type: ignore[arg-type]


def to_x(output: Tensor, name: str, z: Tensor, logsnr: Tensor, **kwargs: float | str) -> Tensor:
    """x̂ from a network output in parameterization ``name`` (see :func:`convert`)."""
    return convert(output, name, "x", z, logsnr, **kwargs)  # type: ignore[arg-type]


def eps_scale(name: str, logsnr: Tensor, *, process: str = "vp", sigma_data: float = 0.5) -> Tensor:
    """c(λ) = α/(αB − σA) with ε − ε̂ = c·(y − ŷ) for parameterization ``name`` (shape of λ).

    So ‖ε − ε̂‖² = c²‖y − ŷ‖²: c² = e^λ for x (eq. 122), σ² for score (eq. 123), α²/(α² + σ²)²
    for v (eq. 124–125), (e^{−λ}/σ_d² + 1)^{−1} for edm (eq. 126), (1 + e^{−λ/2})^{−2} for flow
    (eq. 78).
    """
    alpha, sigma = alpha_sigma(logsnr, process)
    a, b = coefficients(name, logsnr, process=process, sigma_data=sigma_data)
    return alpha / (alpha * b - sigma * a)
