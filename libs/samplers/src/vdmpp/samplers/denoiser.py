"""Denoisers in EDM's units, adapters from λ-conditioned models, and guidance (CFG, autoguidance,
guidance intervals).

A denoiser is ``D(x, sigma, **kwargs) -> x0_hat`` (EDM §2): ``x = data + sigma·n`` with
``x`` of shape ``[B, ...]`` and ``sigma`` of shape ``[B]`` (samplers pass a float32 tensor, or
float64 when ``x`` is float64), returning the data estimate, shaped like ``x``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from numbers import Real
from typing import Any, Protocol

import torch
from torch import Tensor

from vdmpp.schedules import PARAMETERIZATIONS, edm_coefficients_logsnr, logsnr_from_sigma, ve, vp

__all__ = ["PARAMETERIZATIONS", "Denoiser", "as_denoiser", "guided"]


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


def _counted(
    denoiser: Denoiser,
    x: Tensor,
    sigma: Tensor | float,
    kwargs: Mapping[str, Any],
    sigma_value: float | None = None,
) -> tuple[Tensor, int]:
    """``(D(x, sigma, **kwargs), evaluations)``: 1 for a plain denoiser; a denoiser with a
    ``call_counted`` method (:class:`Guided`) reports how many it made. ``sigma_value`` is the
    Python float the caller built a constant ``sigma`` tensor from (samplers pass it), so a
    guidance interval is decided without reading the tensor."""
    call_counted = getattr(denoiser, "call_counted", None)
    if call_counted is not None:
        return call_counted(x, sigma, sigma_value=sigma_value, **kwargs)
    return denoiser(x, sigma, **kwargs), 1


def _host_readable(t: Tensor) -> bool:
    """Whether reading ``t`` on the host is free: a CPU tensor outside ``torch.compile``."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _interval(interval: Any) -> tuple[float, float] | None:
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise TypeError(
            f"interval must be a pair (sigma_lo, sigma_hi) of numbers, got {interval!r}"
        ) from None
    if math.isnan(lo) or math.isnan(hi) or math.isinf(lo):
        raise ValueError(f"interval edges must be numbers (sigma_hi may be inf), got {interval!r}")
    if lo < 0:
        raise ValueError(f"interval edges must be >= 0 (they are noise levels), got {interval!r}")
    if not lo < hi:
        raise ValueError(
            f"interval (sigma_lo, sigma_hi] = ({lo:g}, {hi:g}] is empty: need sigma_lo < sigma_hi"
        )
    return lo, hi


class Guided:
    """Guidance of a denoiser D_c by a reference D_r: D = D_r + w·(D_c − D_r).

    * **CFG** (Ho & Salimans 2022, eq. 6 with their w = our w − 1): D_r = D_u is the
      unconditional denoiser — ``uncond`` (called without ``class_labels``) or, by default, D_c
      itself called with ``class_labels=None`` (the null class; a model trained with
      ``objective.label_dropout > 0``).
    * **Autoguidance** (Karras et al. 2024, "Guiding a diffusion model with a bad version of
      itself", §3: D_w(x; σ, c) = w·D_1(x; σ, c) + (1 − w)·D_0(x; σ, c), the CFG form of their §2
      with D_0 a smaller or less-trained model of the *same* condition): D_r = ``guide``,
      called with the same keyword arguments as D_c, class labels included.
    * **Guidance interval** (Kynkäänniemi et al. 2024, §4: w(σ) = w for σ ∈ (σ_lo, σ_hi], 1
      otherwise): with ``interval=(lo, hi)`` the combination is used only where
      lo < σ ≤ hi (open below, closed above); elsewhere D = D_c from one evaluation. EDM2's
      ``generate_images.py`` has no interval (it guides every step as
      ``gnet(x, t, labels).lerp(net(x, t, labels), guidance)``, the autoguidance form above).

    w = 1 is D_c alone and w = 0 is D_r alone (one evaluation each, and exactly equal to it).

    **Evaluations.** ``call_counted(x, sigma, sigma_value=None, **kw) -> (D, n)`` also returns
    the number n of denoiser evaluations made (nested :class:`Guided` count theirs); the
    samplers add n to ``SampleInfo.nfe``. Whether σ is inside the interval is decided, without a
    host sync, from ``sigma_value`` (the Python float a sampler built its constant σ tensor
    from, compared in float64), from a Python-float ``sigma``, or from a CPU σ tensor (compared
    in its own dtype; per-sample σ's may straddle an edge). A σ tensor on an accelerator is not
    read: both branches run on the whole batch and ``torch.where`` keeps D_c outside (n = 2).
    When some samples of a batch are inside, both branches run on the whole batch (n = 2).
    """

    def __init__(
        self,
        cond: Denoiser,
        uncond: Denoiser | None = None,
        scale: float = 1.0,
        *,
        guide: Denoiser | None = None,
        interval: tuple[float, float] | None = None,
    ) -> None:
        if not callable(cond):
            raise TypeError(f"the denoiser must be callable, got {cond!r}")
        if uncond is not None and not callable(uncond):
            raise TypeError(f"uncond must be a denoiser or None, got {uncond!r}")
        if guide is not None and not callable(guide):
            raise TypeError(f"guide must be a denoiser or None, got {guide!r}")
        if guide is not None and uncond is not None:
            raise ValueError(
                "give either uncond= (classifier-free guidance) or guide= (autoguidance), not both"
            )
        if isinstance(scale, bool) or not isinstance(scale, (Real, Tensor)):
            raise TypeError(f"the guidance scale must be a number, got {scale!r}")
        w = float(scale)
        if not math.isfinite(w):
            raise ValueError(f"the guidance scale must be finite, got {w}")
        self.cond, self.uncond, self.guide, self.scale = cond, uncond, guide, w
        self.interval = _interval(interval)

    def _reference(
        self, x: Tensor, sigma: Tensor | float, kw: Mapping[str, Any], sv: float | None
    ) -> tuple[Tensor, int]:
        if self.guide is not None:  # autoguidance: the same conditioning
            return _counted(self.guide, x, sigma, kw, sv)
        if self.uncond is not None:
            return _counted(
                self.uncond, x, sigma, {k: v for k, v in kw.items() if k != "class_labels"}, sv
            )
        return _counted(self.cond, x, sigma, {**kw, "class_labels": None}, sv)

    def _inside(self, x: Tensor, sigma: Tensor | float, sv: float | None) -> bool | Tensor:
        """True/False for the whole batch, or a boolean σ-column mask (mixed or unread)."""
        lo, hi = self.interval  # type: ignore[misc]
        if sv is None and not isinstance(sigma, Tensor):
            sv = float(sigma)
        if sv is not None:
            return lo < sv <= hi
        mask = (sigma > lo) & (sigma <= hi)
        if _host_readable(mask):
            if bool(mask.all()):
                return True
            if not bool(mask.any()):
                return False
        return mask.reshape(-1, *([1] * (x.ndim - 1))) if mask.ndim == 1 else mask

    def call_counted(
        self, x: Tensor, sigma: Tensor | float, *, sigma_value: float | None = None, **kwargs: Any
    ) -> tuple[Tensor, int]:
        """``(D(x, sigma, **kwargs), denoiser evaluations made)``; see the class docstring."""
        sv = sigma_value
        if self.scale == 1.0:
            return _counted(self.cond, x, sigma, kwargs, sv)
        inside: bool | Tensor = True if self.interval is None else self._inside(x, sigma, sv)
        if inside is False:
            return _counted(self.cond, x, sigma, kwargs, sv)
        if inside is True and self.scale == 0.0:
            return self._reference(x, sigma, kwargs, sv)
        d_c, n_c = _counted(self.cond, x, sigma, kwargs, sv)
        d_r, n_r = self._reference(x, sigma, kwargs, sv)
        d = d_r if self.scale == 0.0 else d_r + self.scale * (d_c - d_r)
        if inside is not True:  # a mask: D_c exactly where σ is outside the interval
            d = torch.where(inside, d, d_c)
        return d, n_c + n_r

    def __call__(self, x: Tensor, sigma: Tensor | float, **kwargs: Any) -> Tensor:
        return self.call_counted(x, sigma, **kwargs)[0]

    def __repr__(self) -> str:
        ref = f"guide={self.guide!r}" if self.guide is not None else f"uncond={self.uncond!r}"
        return f"guided({self.cond!r}, {self.scale}, {ref}, interval={self.interval})"


def guided(
    denoiser: Denoiser,
    scale: float | Denoiser | None = None,
    legacy_scale: float | None = None,
    /,
    *,
    uncond: Denoiser | None = None,
    guide: Denoiser | None = None,
    interval: tuple[float, float] | None = None,
) -> Guided:
    """Guide ``denoiser`` with strength ``scale`` = w: D = D_r + w·(D_c − D_r) (see
    :class:`Guided` for the papers, the edges of ``interval`` and how evaluations are counted).

    * ``guided(D, w)``: classifier-free guidance through the null class — the reference is D
      called with ``class_labels=None``.
    * ``guided(D, w, uncond=D_u)``: CFG with a separate unconditional denoiser (called without
      ``class_labels``). The older positional form ``guided(D_c, D_u, w)`` means the same.
    * ``guided(D, w, guide=D_g)``: autoguidance; D_g receives the same conditioning as D.
    * ``interval=(sigma_lo, sigma_hi)``: guidance only for sigma_lo < σ ≤ sigma_hi
      (0 ≤ sigma_lo < sigma_hi ≤ inf); one evaluation of D elsewhere.

    Raises TypeError for a missing or non-numeric scale and ValueError for an empty or negative
    interval, a non-finite scale, or ``uncond`` together with ``guide``.
    """
    if legacy_scale is not None or scale is None or callable(scale):
        if scale is not None and not callable(scale):
            raise TypeError(
                f"guided(D, scale) takes no third argument (got {scale!r}, {legacy_scale!r}); "
                "for a separate unconditional denoiser use guided(D, scale, uncond=D_u)"
            )
        if uncond is not None and scale is not None:
            raise TypeError("the unconditional denoiser is given twice (positionally and uncond=)")
        if legacy_scale is None:
            raise TypeError("guided() needs a guidance scale: guided(denoiser, scale)")
        uncond = scale if scale is not None else uncond  # guided(D_c, D_u, w) / guided(D, None, w)
        scale = legacy_scale
    return Guided(denoiser, uncond, scale, guide=guide, interval=interval)
