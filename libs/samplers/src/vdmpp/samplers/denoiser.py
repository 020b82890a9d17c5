"""Denoisers in EDM's units, adapters from λ-conditioned models, and classifier-free guidance.

A denoiser is ``D(x, sigma, **kwargs) -> x0_hat`` (EDM §2): ``x = data + sigma·n`` with
``x`` of shape ``[B, ...]`` and ``sigma`` of shape ``[B]`` (samplers pass a float32 tensor, or
float64 when ``x`` is float64), returning the data estimate, shaped like ``x``.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Real
from typing import Any, Protocol

import torch
from torch import Tensor

from vdmpp.schedules import edm_coefficients_logsnr, logsnr_from_sigma, ve, vp

__all__ = ["PARAMETERIZATIONS", "Denoiser", "as_denoiser", "guided"]

PARAMETERIZATIONS = ("eps", "x", "v", "edm", "score", "flow")


class Denoiser(Protocol):
    def __call__(self, x: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor: ...


def _sigma_column(sigma: Tensor | float, x: Tensor) -> Tensor:
    """σ as a float32/float64 tensor of shape [B, 1, …, 1] on x's device."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    s = torch.as_tensor(sigma, device=x.device, dtype=dt)
    if s.ndim == 0:
        s = s.expand(x.shape[0])
    return s.reshape(-1, *([1] * (x.ndim - 1)))


class ModelDenoiser:
    """D(x; σ) from a λ-conditioned network ``model(z, logsnr, class_labels=None)``.

    Scaling (EDM eq. 4 / Table 1, VDM++ App. E.4): λ = −2 log σ, and the network sees
    z = α·x with (α, σ_p) = ``vp(λ)`` (α = 1/√(1+σ²), σ_p = σ·α) or ``ve(λ)`` (α = 1, σ_p = σ).
    Its output ``o`` becomes the data estimate x̂ by the definitions of VDM++ App. E.2:

    ========  =========================================  ===========================================
    name      the network predicts                       x̂
    ========  =========================================  ===========================================
    eps       ε, with z = αx + σ_p ε                      (z − σ_p·o)/α
    x         x                                           o
    v         v = αε − σ_p x (D.2)                        (α z − σ_p·o)/(α² + σ_p²)
    score     ∇_z log q(z) = −ε/σ_p (eq. 109)             (z + σ_p²·o)/α
    flow      o = x − ε (D.3, eq. 72)                     (z + σ_p·o)/(α + σ_p)
    edm       EDM's F (EDM eq. 7, σ_d=sigma_data)   σ_d²/(σ²+σ_d²)·z/α + σσ_d/√(σ²+σ_d²)·o
    ========  =========================================  ===========================================

    (σ without subscript is EDM's σ = e^{−λ/2}. The ``edm`` row is EDM's c_skip, c_out applied
    to z/α = x + σε, EDM's own units (EDM eq. 4); VDM++ eq. 119 prints α on the wrong
    side of z. vdmpp.models.Preconditioned and vdmpp.losses use the same form.) The full set of
    conversions lives in vdmpp.losses; this is the one-way map a sampler needs.
    The arithmetic runs in float32 (float64 for float64 inputs) and x̂ is cast to x's dtype.
    """

    def __init__(
        self,
        model: Callable[..., Tensor],
        parameterization: str = "eps",
        process: str = "vp",
        *,
        sigma_data: float = 0.5,
    ) -> None:
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"unknown parameterization {parameterization!r}; "
                f"expected one of {PARAMETERIZATIONS}"
            )
        if process not in ("vp", "ve"):
            raise ValueError(f"unknown process {process!r}; expected 'vp' or 've'")
        self.model = model
        self.parameterization = parameterization
        self.process = process
        self.sigma_data = float(sigma_data)

    def __call__(
        self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None
    ) -> Tensor:
        s = _sigma_column(sigma, x)
        lam = logsnr_from_sigma(s)
        alpha, sig = (vp if self.process == "vp" else ve)(lam)
        z = (alpha * x.to(s.dtype)).to(x.dtype)
        o = self.model(z, lam.reshape(-1), class_labels=class_labels).to(s.dtype)
        zc = z.to(s.dtype)
        p = self.parameterization
        if p == "eps":
            x0 = (zc - sig * o) / alpha
        elif p == "x":
            x0 = o
        elif p == "v":
            x0 = (alpha * zc - sig * o) / (alpha * alpha + sig * sig)
        elif p == "score":
            x0 = (zc + sig * sig * o) / alpha
        elif p == "flow":
            x0 = (zc + sig * o) / (alpha + sig)
        else:  # edm: D = c_skip·z/α + c_out·F (EDM eq. 7, Table 1)
            c_skip, c_out, _, _ = edm_coefficients_logsnr(lam, self.sigma_data)
            x0 = c_skip * (zc / alpha) + c_out * o
        return x0.to(x.dtype)

    def __repr__(self) -> str:
        return (
            f"as_denoiser({self.model!r}, {self.parameterization!r}, {self.process!r}, "
            f"sigma_data={self.sigma_data})"
        )


def as_denoiser(
    model: Callable[..., Tensor],
    parameterization: str = "eps",
    process: str = "vp",
    *,
    sigma_data: float = 0.5,
) -> ModelDenoiser:
    """Adapt a λ-conditioned VP/VE model to a denoiser D(x, sigma, class_labels=None).

    See :class:`ModelDenoiser` for the scaling and the parameterization table.
    """
    return ModelDenoiser(model, parameterization, process, sigma_data=sigma_data)


class Guided:
    """Classifier-free guidance: D = D_u + w·(D_c − D_u) (Ho & Salimans 2022).

    w = 1 returns D_c alone and w = 0 returns D_u alone (one evaluation, and exactly equal).
    Otherwise each call evaluates both, so a sampler's NFE counts guided calls, each costing two
    network evaluations.
    """

    def __init__(self, cond: Denoiser, uncond: Denoiser | None, scale: float) -> None:
        self.cond, self.uncond, self.scale = cond, uncond, float(scale)

    def _uncond(self, x: Tensor, sigma: Tensor, kwargs: dict[str, Any]) -> Tensor:
        if self.uncond is not None:
            return self.uncond(x, sigma, **{k: v for k, v in kwargs.items() if k != "class_labels"})
        return self.cond(x, sigma, **{**kwargs, "class_labels": None})

    def __call__(self, x: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        if self.scale == 1.0:
            return self.cond(x, sigma, **kwargs)
        if self.scale == 0.0:
            return self._uncond(x, sigma, kwargs)
        d_c = self.cond(x, sigma, **kwargs)
        d_u = self._uncond(x, sigma, kwargs)
        return d_u + self.scale * (d_c - d_u)


def guided(
    cond_denoiser: Denoiser,
    uncond_denoiser: Denoiser | float | None = None,
    scale: float | None = None,
) -> Guided:
    """Classifier-free guidance of a denoiser.

    ``guided(D_c, D_u, scale)``: two denoisers. ``guided(D, scale)`` or ``guided(D, None, scale)``:
    one class-conditional denoiser, called with ``class_labels=None`` for the unconditional pass.
    """
    if isinstance(uncond_denoiser, Real) and not isinstance(uncond_denoiser, bool):
        if scale is not None:
            raise TypeError("guided(D, scale) takes no third argument; use guided(D, D_u, scale)")
        uncond_denoiser, scale = None, float(uncond_denoiser)
    if scale is None:
        raise TypeError("guided() needs a guidance scale")
    if uncond_denoiser is not None and not callable(uncond_denoiser):
        raise TypeError(f"uncond_denoiser must be a denoiser or None, got {uncond_denoiser!r}")
    return Guided(cond_denoiser, uncond_denoiser, scale)
