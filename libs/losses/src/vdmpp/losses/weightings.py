"""Weighting functions w(λ) of the weighted loss (VDM++ eq. 5–7, Table 1, Sec. 5.1, App. D, I).

Every diffusion objective in the literature is L_w(x) = ½ ∫ w(λ) E_ε‖ε − ε̂(z_λ; λ)‖² dλ for some
w (VDM++ eq. 6); each class below is one such w, derived again from App. D because the PDF
extraction of Table 1 carries typos (derivations in the class docstrings). Weightings are
defined up to a positive constant (it only rescales the loss); the constants chosen are noted.

* ``monotonic``: w is non-increasing in λ, which makes L_w the ELBO of Gaussian-noise-augmented
  data (VDM++ Sec. 4).
* ``shift`` s (App. D.2.1): w_s(λ) = w(λ − 2s). This is the same convention as
  ``vdmpp.schedules.Cosine(shift=s)`` (λ_s(t) = λ(t) + 2s, s = log(64/d)), so
  ``IDDPM(shift=s)`` is exactly ∝ the shifted cosine density; ``for_resolution(d)`` sets
  s = log(base/d).
* Values are computed in log space (softplus, log-sigmoid, log Φ) and exponentiated once, so
  every weighting is finite and non-negative in float32 over λ ∈ [−30, 30] (and far beyond;
  ``logsnr_range`` is where it is guaranteed not to overflow float32).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = [
    "EDM",
    "ELBO",
    "IDDPM",
    "P2",
    "EDMMonotonic",
    "FlowOT",
    "InDI",
    "LowBit",
    "MinSNR",
    "Sigmoid",
    "VPrediction",
    "Weighting",
    "get",
    "names",
]

_LOG2 = math.log(2.0)
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
# Weightings that grow like e^{−λ/2} as λ → −∞ stay below e^{76} ≪ float32 max (e^{88.7})
# for λ − 2s ≥ −150.
_EXP_GROWTH_MIN = -150.0


def _as_float(logsnr: Tensor | float) -> Tensor:
    if not isinstance(logsnr, Tensor):
        return torch.as_tensor(logsnr, dtype=torch.get_default_dtype())
    if not logsnr.is_floating_point():
        return logsnr.to(torch.get_default_dtype())
    return logsnr.float() if logsnr.dtype in (torch.float16, torch.bfloat16) else logsnr


def _log_sech(x: Tensor) -> Tensor:
    """log sech(x) = log 2 − |x| − log1p(e^{−2|x|}), overflow-free."""
    a = x.abs()
    return _LOG2 - a - torch.log1p(torch.exp(-2.0 * a))


def _log_normal_pdf(x: Tensor, mean: float, std: float) -> Tensor:
    z = (x - mean) / std
    return -0.5 * z * z - math.log(std) - _LOG_SQRT_2PI


class Weighting:
    """A weighting function λ ↦ w(λ) ≥ 0 (VDM++ eq. 5–7); subclasses give ``_log_weight``.

    ``w(logsnr)`` returns w in the input's dtype (half precision is computed in float32);
    ``log_weight(logsnr)`` returns log w. ``monotonic`` says whether w is non-increasing in λ;
    ``logsnr_range`` is the λ range over which w is finite in float32.
    """

    name: ClassVar[str] = "weighting"
    monotonic: ClassVar[bool] = False

    def __init__(self, *, shift: float = 0.0) -> None:
        shift = float(shift)
        if not math.isfinite(shift):
            raise ValueError(f"shift must be finite, got {shift}")
        self.shift = shift

    # --- to be provided by subclasses ---------------------------------------------------------
    def _log_weight(self, logsnr: Tensor) -> Tensor:
        raise NotImplementedError

    def _unshifted_range(self) -> tuple[float, float]:
        return (-math.inf, math.inf)

    def _params(self) -> dict[str, float]:
        return {}

    # --- public -------------------------------------------------------------------------------
    @classmethod
    def for_resolution(cls, d: int, base: int = 64, **kwargs: float) -> Weighting:
        """The weighting shifted for resolution d: s = log(base/d) (VDM++ App. D.2.1)."""
        if d <= 0 or base <= 0:
            raise ValueError(f"resolution and base must be positive, got d={d}, base={base}")
        return cls(shift=math.log(base / d), **kwargs)

    @property
    def logsnr_range(self) -> tuple[float, float]:
        """λ interval on which w is finite in float32 (shifted with the weighting)."""
        lo, hi = self._unshifted_range()
        return lo + 2.0 * self.shift, hi + 2.0 * self.shift

    def log_weight(self, logsnr: Tensor) -> Tensor:
        """log w(λ) (may be −inf where w underflows to 0, never NaN for finite λ)."""
        lam = _as_float(logsnr)
        out = self._log_weight(lam - 2.0 * self.shift if self.shift else lam)
        if isinstance(logsnr, Tensor) and logsnr.is_floating_point():
            return out.to(logsnr.dtype)
        return out

    def __call__(self, logsnr: Tensor) -> Tensor:
        lam = _as_float(logsnr)
        w = torch.exp(self._log_weight(lam - 2.0 * self.shift if self.shift else lam))
        if isinstance(logsnr, Tensor) and logsnr.is_floating_point():
            return w.to(logsnr.dtype)
        return w

    def __repr__(self) -> str:
        params = dict(self._params())
        if self.shift:
            params["shift"] = self.shift
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in params.items())})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Weighting):
            return NotImplemented
        return (
            type(self) is type(other)
            and self.shift == other.shift
            and self._params() == other._params()
        )

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.shift, tuple(sorted(self._params().items()))))


class ELBO(Weighting):
    """w(λ) = 1: the continuous-time ELBO (VDM++ eq. 4; VDM eq. 53–54)."""

    name = "elbo"
    monotonic = True

    def _log_weight(self, logsnr: Tensor) -> Tensor:
        return torch.zeros_like(logsnr)


class IDDPM(Weighting):
    """ε-prediction MSE with the cosine schedule: w(λ) = sech(λ/2) (VDM++ Table 1, Sec. 3.1).

    E_{t∼U}‖ε − ε̂‖² = ∫ p(λ)‖ε − ε̂‖² dλ = ½ ∫ 2p(λ)‖ε − ε̂‖² dλ, so w = 2p with the cosine density
    p(λ) = sech(λ/2)/(2π) (Table 4): w = sech(λ/2)/π; the constant 1/π is dropped. With shift s,
    w = sech(λ/2 − s), ∝ the shifted-cosine density.
    """

    name = "iddpm"
    monotonic = False

    def _log_weight(self, logsnr: Tensor) -> Tensor:
        return _log_sech(0.5 * logsnr)


class EDM(Weighting):
    """EDM's loss (EDM Sec. 5; VDM++ App. D.1): w(λ) = N(λ; μ, s²)·(e^{−λ} + σ_d²)/σ_d².

    EDM draws ln σ ∼ N(P_mean, P_std²) and weights ‖D(y + σn; σ) − y‖² by
    (σ² + σ_d²)/(σσ_d)² (EDM). With λ = −2 ln σ, λ ∼ N(μ, s²), μ = −2P_mean = 2.4,
    s = 2P_std = 2.4 (eq. 44), and ‖x − x̂‖² = e^{−λ}‖ε − ε̂‖² (eq. 122), the per-λ integrand is
    p(λ)·(e^{−λ} + σ_d²)/(e^{−λ}σ_d²)·e^{−λ}‖ε − ε̂‖² = p(λ)(e^{−λ} + σ_d²)/σ_d²·‖ε − ε̂‖²
    (eq. 46–47). Hence L_EDM = ∫ w‖ε − ε̂‖² dλ = 2·L_w exactly with the w above; Table 1
    (eq. 48) drops the constant 1/σ_d², kept here so that w/p is exactly EDM's loss weight
    times σ².
    """

    name = "edm"
    monotonic = False

    def __init__(
        self,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        sigma_data: float = 0.5,
        *,
        shift: float = 0.0,
    ) -> None:
        super().__init__(shift=shift)
        if not (p_std > 0 and sigma_data > 0):
            raise ValueError(f"need p_std > 0 and sigma_data > 0, got {p_std}, {sigma_data}")
        self.p_mean, self.p_std, self.sigma_data = float(p_mean), float(p_std), float(sigma_data)
        self.mean, self.std = -2.0 * self.p_mean, 2.0 * self.p_std
        self._log_sd2 = 2.0 * math.log(self.sigma_data)

    def _log_weight(self, logsnr: Tensor) -> Tensor:
        log_sd2 = torch.full_like(logsnr, self._log_sd2)
        return (
            _log_normal_pdf(logsnr, self.mean, self.std)
            + torch.logaddexp(-logsnr, log_sd2)
            - self._log_sd2
        )

    def _params(self) -> dict[str, float]:
        return {"p_mean": self.p_mean, "p_std": self.p_std, "sigma_data": self.sigma_data}


class VPrediction(Weighting):
    """v-prediction MSE with the cosine schedule: w(λ) = e^{−λ/2} (VDM++ App. D.2).

    ‖v − v̂‖² = (e^{−λ} + 1)‖ε − ε̂‖² for VP (eq. 54), so E_{t∼U}‖v − v̂‖² = ½∫ 2p(e^{−λ} + 1)‖ε − ε̂‖²
    with p = sech(λ/2)/(2π): 2p(e^{−λ} + 1) = (e^{−λ} + 1)/(π cosh(λ/2)) = (2/π)e^{−λ/2}
    (eq. 57 prints the constant as π; eq. 60 with s = 0 has the correct 2/π). Monotonic.
    For the shifted cosine the exact v-loss weight is (e^{−λ} + 1)sech(λ/2 − s)/(2π), which is
    not ∝ e^{−λ/2} (eq. 60 is approximate); a shift of this weighting only rescales it.
    """

    name = "vprediction"
    monotonic = True

    def _log_weight(self, logsnr: Tensor) -> Tensor:
        return -0.5 * logsnr

    def _unshifted_range(self) -> tuple[float, float]:
        return (_EXP_GROWTH_MIN, math.inf)


class FlowOT(Weighting):
    """Conditional flow matching with the OT path: w(λ) = e^{−λ/2} (VDM++ App. D.3).

    z_t = (1 − t)x + tε, o = x − ε: λ = 2 log((1 − t)/t), p(λ) = sech²(λ/4)/8 (eq. 69) and
    ‖o − ô‖² = (1 + e^{−λ/2})²‖ε − ε̂‖² (eq. 78), so L_CFM = ½∫ w‖ε − ε̂‖² with
    w = 2(sech²(λ/4)/8)(1 + e^{−λ/2})² = e^{−λ/2} exactly (eq. 86–87; sech²(λ/4) =
    4e^{−λ/2}/(1 + e^{−λ/2})²). Equal to :class:`VPrediction` up to its constant; monotonic.
    """

    name = "flowot"
    monotonic = True

    def _log_weight(self, logsnr: Tensor) -> Tensor:
        return -0.5 * logsnr

    def _unshifted_range(self) -> tuple[float, float]:
        return (_EXP_GROWTH_MIN, math.inf)


class InDI(Weighting):
    """InDI's x-prediction MSE on the FM-OT path: w(λ) = e^{−λ} sech²(λ/4) (VDM++ App. D.4).

    E_{t∼U}‖x − x̂‖² = ∫ p e^{−λ}‖ε − ε̂‖² with p = sech²(λ/4)/8 (eq. 90–91), i.e. w = 2p e^{−λ} =
    e^{−λ}sech²(λ/4)/4; the constant 1/4 is dropped. d log w/dλ = −1 − ½tanh(λ/4) < 0, so it is
    monotonic (decreasing).
    """

    name = "indi"
    monotonic = True

    def _log_weight(self, logsnr: Tensor) -> Tensor:
        return -logsnr + 2.0 * _log_sech(0.25 * logsnr)

    def _unshifted_range(self) -> tuple[float, float]:
        return (_EXP_GROWTH_MIN, math.inf)


class P2(Weighting):
    """P2 weighting with the cosine schedule: w(λ) = sech(λ/2)/(k + e^λ)^γ (VDM++ App. D.5).

    Choi et al. weight the ε-MSE by (k + SNR)^{−γ}: w = p(λ)/(k + e^λ)^γ (eq. 92), and with the
    cosine p ∝ sech(λ/2). Defaults k = 1, γ = 1 (γ = 0.5 is the other published value).
    Non-monotonic (rises like e^{λ/2} as λ → −∞).
    """

    name = "p2"
    monotonic = False

    def __init__(self, gamma: float = 1.0, k: float = 1.0, *, shift: float = 0.0) -> None:
        super().__init__(shift=shift)
        if not (gamma >= 0 and k > 0):
            raise ValueError(f"P2 needs gamma >= 0 and k > 0, got gamma={gamma}, k={k}")
        self.gamma, self.k = float(gamma), float(k)

    def _log_weight(self, logsnr: Tensor) -> Tensor:
        log_k = torch.full_like(logsnr, math.log(self.k))
        return _log_sech(0.5 * logsnr) - self.gamma * torch.logaddexp(log_k, logsnr)

    def _params(self) -> dict[str, float]:
        return {"gamma": self.gamma, "k": self.k}


class MinSNR(Weighting):
    """Min-SNR-γ with the cosine schedule: w(λ) = sech(λ/2)·min(1, γe^{−λ}) (VDM++ App. D.6).

    min(e^λ, γ)‖x − x̂‖² = min(1, γe^{−λ})‖ε − ε̂‖² (eq. 93–94), so w = min(1, γe^{−λ})·p(λ) with
    the cosine p ∝ sech(λ/2). γ = 5 as in Hang et al. Non-monotonic.
    """

    name = "minsnr"
    monotonic = False

    def __init__(self, gamma: float = 5.0, *, shift: float = 0.0) -> None:
        super().__init__(shift=shift)
        if not gamma > 0:
            raise ValueError(f"MinSNR needs gamma > 0, got {gamma}")
        self.gamma = float(gamma)

    def _log_weight(self, logsnr: Tensor) -> Tensor:
        return _log_sech(0.5 * logsnr) + torch.clamp(math.log(self.gamma) - logsnr, max=0.0)

    def _params(self) -> dict[str, float]:
        return {"gamma": self.gamma}


class Sigmoid(Weighting):
    """VDM++'s sigmoid weighting w(λ) = sigmoid(−λ + b) (VDM++ Sec. 5.1; default b = 2).

    Inspired by the low-bit weighting (App. I); monotonic.
    """

    name = "sigmoid"
    monotonic = True

    def __init__(self, bias: float = 2.0, *, shift: float = 0.0) -> None:
        super().__init__(shift=shift)
        if not math.isfinite(float(bias)):
            raise ValueError(f"bias must be finite, got {bias}")
        self.bias = float(bias)

    def _log_weight(self, logsnr: Tensor) -> Tensor:
        return F.logsigmoid(self.bias - logsnr)

    def _params(self) -> dict[str, float]:
        return {"bias": self.bias}


class EDMMonotonic(EDM):
    """'EDM-monotonic' (VDM++ Sec. 5.1): the EDM weighting, held at its peak value left of it.

    w(λ) = max w̃ for λ < λ* = argmax w̃, else w̃(λ), with w̃ the :class:`EDM` weighting. λ* solves
    d log w̃/dλ = −(λ − μ)/s² − e^{−λ}/(e^{−λ} + σ_d²) = 0; it is located once in float64
    (grid search, then bisection). ≈ −3.4 for the defaults. Monotonic.
    """

    name = "edmmonotonic"
    monotonic = True

    def __init__(
        self,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        sigma_data: float = 0.5,
        *,
        shift: float = 0.0,
    ) -> None:
        super().__init__(p_mean, p_std, sigma_data, shift=shift)
        self.peak_logsnr = self._find_peak()
        self._log_peak = float(
            super()._log_weight(torch.tensor(self.peak_logsnr, dtype=torch.float64))
        )

    def _find_peak(self) -> float:
        lo, hi = self.mean - 12.0 * self.std - 40.0, self.mean + 12.0 * self.std
        grid = torch.linspace(lo, hi, 200_001, dtype=torch.float64)
        k = int(torch.argmax(super()._log_weight(grid)))
        a, b = float(grid[max(k - 1, 0)]), float(grid[min(k + 1, grid.numel() - 1)])

        def slope(x: float) -> float:
            sd2 = self.sigma_data**2
            return -(x - self.mean) / self.std**2 - 1.0 / (1.0 + sd2 * math.exp(x))

        for _ in range(80):  # slope > 0 left of the peak, < 0 right of it
            m = 0.5 * (a + b)
            a, b = (m, b) if slope(m) > 0 else (a, m)
        return 0.5 * (a + b)

    def _log_weight(self, logsnr: Tensor) -> Tensor:
        w = super()._log_weight(logsnr)
        return torch.where(logsnr < self.peak_logsnr, torch.full_like(w, self._log_peak), w)


class LowBit(Weighting):
    """5-bit-like weighting w(λ) = F_N(−a(λ − c)), a = 2, c = 8.4 (VDM++ App. I, eq. 146).

    F_N is the standard normal CDF; evaluated as exp(log_ndtr(·)). Monotonic.
    """

    name = "lowbit"
    monotonic = True

    def __init__(self, center: float = 8.4, scale: float = 2.0, *, shift: float = 0.0) -> None:
        super().__init__(shift=shift)
        if not (scale > 0 and math.isfinite(float(center))):
            raise ValueError(f"LowBit needs scale > 0 and a finite center, got {scale}, {center}")
        self.center, self.scale = float(center), float(scale)

    def _log_weight(self, logsnr: Tensor) -> Tensor:
        return torch.special.log_ndtr(-self.scale * (logsnr - self.center))

    def _params(self) -> dict[str, float]:
        return {"center": self.center, "scale": self.scale}


_REGISTRY: dict[str, type[Weighting]] = {
    cls.name: cls
    for cls in (
        ELBO,
        IDDPM,
        EDM,
        VPrediction,
        FlowOT,
        InDI,
        P2,
        MinSNR,
        Sigmoid,
        EDMMonotonic,
        LowBit,
    )
}
_ALIASES = {"v": "vprediction", "fmot": "flowot", "flow": "flowot"}


def names() -> list[str]:
    """Canonical names accepted by :func:`get`."""
    return sorted(_REGISTRY)


def get(name: str, **kwargs: float) -> Weighting:
    """Build a weighting from its name (case, '-' and '_' ignored: "min-snr", "EDM_monotonic").

    Keyword arguments go to the constructor, e.g. ``get("sigmoid", bias=1.0, shift=-0.7)``.
    """
    if not isinstance(name, str):
        raise TypeError(f"weighting name must be a str, got {type(name).__name__}")
    key = name.lower().replace("-", "").replace("_", "").replace(" ", "")
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ValueError(f"unknown weighting {name!r}; choose one of {', '.join(names())}")
    try:
        return _REGISTRY[key](**kwargs)
    except TypeError as e:
        raise TypeError(f"weighting {name!r}: {e}") from None
