"""Closed-form noise schedules of VDM++ Table 4, plus linear VP (EDM Table 1).

Each row is derived so that λ = f(t), t = f⁻¹(λ) and p(λ) = −dt/dλ agree (tests check all three
against each other by finite differences). Two rows of the printed Table 4 carry sign errors:

* Shifted cosine: λ = −2 log tan(πt/2) + 2s, so e^{−λ/2} = tan(πt/2)·e^{−s} and
  t = (2/π) arctan(e^{−λ/2 + s}) — the table prints e^{−λ/2 − s}.
* EDM training: ln σ ~ N(P_mean, P_std²) with λ = −2 ln σ gives λ ~ N(−2P_mean, (2P_std)²) =
  N(2.4, 2.4²) (App. D.1). The CDF of λ is 1 − t, so λ = F_N⁻¹(1 − t; 2.4, 2.4²) = 2.4 − 2.4 Φ⁻¹(t)
  and t = Φ((2.4 − λ)/2.4) = F_N(−λ; −2.4, 2.4²) — the table prints mean +2.4 in f and f⁻¹, which
  would put the mode at λ = −2.4 and contradict its own p(λ) = N(λ; 2.4, 2.4²).

The EDM sampling row's λ(t) is garbled in the extraction; with a = σ_min^{1/ρ}, b = σ_max^{1/ρ},
σ(t) = (a + t(b − a))^ρ (t = 0 at σ_min, i.e. λ_max), λ = −2ρ log(a + t(b − a)),
t = (e^{−λ/(2ρ)} − a)/(b − a) and p(λ) = e^{−λ/(2ρ)}/(2ρ(b − a)), which matches the printed t and p.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from .base import TruncatedSchedule

__all__ = ["Cosine", "EDMSampling", "EDMTraining", "FlowOT", "LinearLogSNR", "LinearVP"]

_SQRT2 = math.sqrt(2.0)


def _sech(x: Tensor) -> Tensor:
    """sech(x) = 2e^{−|x|}/(1 + e^{−2|x|}), overflow-free."""
    a = x.abs()
    return 2.0 * torch.exp(-a) / (1.0 + torch.exp(-2.0 * a))


class Cosine(TruncatedSchedule):
    """(Shifted) cosine schedule (VDM++ Table 4; Nichol & Dhariwal; Hoogeboom et al.).

    λ = −2 log tan(πt/2) + 2s,  t = (2/π) arctan(e^{−λ/2+s}),  p(λ) = sech(λ/2 − s)/(2π).
    λ is evaluated as 2[log sin(π(1−u)/2) − log sin(πu/2)] + 2s, accurate at both ends.
    """

    def __init__(self, shift: float = 0.0, *, logsnr_min: float = -20.0, logsnr_max: float = 20.0):
        self.shift = float(shift)
        super().__init__(logsnr_min=logsnr_min, logsnr_max=logsnr_max)

    @classmethod
    def for_resolution(cls, d: int, base: int = 64, **kwargs: float) -> Cosine:
        """Shifted cosine for resolution d: s = log(base/d) (VDM++ App. D.2.1)."""
        if d <= 0 or base <= 0:
            raise ValueError(f"resolution and base must be positive, got d={d}, base={base}")
        return cls(shift=math.log(base / d), **kwargs)

    def _logsnr(self, u: Tensor, v: Tensor) -> Tensor:
        half_pi = 0.5 * math.pi
        return 2.0 * (torch.log(torch.sin(half_pi * v)) - torch.log(torch.sin(half_pi * u))) + (
            2.0 * self.shift
        )

    def _t(self, logsnr: Tensor) -> Tensor:
        return (2.0 / math.pi) * torch.atan(torch.exp(-0.5 * logsnr + self.shift))

    def _one_minus_t(self, logsnr: Tensor) -> Tensor:
        return (2.0 / math.pi) * torch.atan(torch.exp(0.5 * logsnr - self.shift))

    def _pdf(self, logsnr: Tensor) -> Tensor:
        return _sech(0.5 * logsnr - self.shift) / (2.0 * math.pi)

    def _repr_args(self) -> dict[str, object]:
        return {"shift": self.shift}


class EDMTraining(TruncatedSchedule):
    """EDM's training noise: ln σ ~ N(P_mean, P_std²), i.e. λ ~ N(−2P_mean, (2P_std)²).

    EDM Sec. 5 / VDM++ Table 4 (sign-corrected, see module docstring):
    λ = μ − s Φ⁻¹(t),  t = Φ((μ − λ)/s),  p(λ) = N(λ; μ, s²),  μ = −2P_mean, s = 2P_std.
    """

    def __init__(
        self,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        *,
        logsnr_min: float = -20.0,
        logsnr_max: float = 20.0,
    ):
        if not p_std > 0:
            raise ValueError(f"p_std must be > 0, got {p_std}")
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.mu, self.s = -2.0 * self.p_mean, 2.0 * self.p_std
        super().__init__(logsnr_min=logsnr_min, logsnr_max=logsnr_max)

    def _logsnr(self, u: Tensor, v: Tensor) -> Tensor:
        # Φ⁻¹(u) = −Φ⁻¹(1 − u): use whichever argument is small, where ndtri is accurate.
        z = torch.where(u < 0.5, torch.special.ndtri(u), -torch.special.ndtri(v))
        return self.mu - self.s * z

    def _t(self, logsnr: Tensor) -> Tensor:
        return 0.5 * torch.special.erfc((logsnr - self.mu) / (self.s * _SQRT2))

    def _one_minus_t(self, logsnr: Tensor) -> Tensor:
        return 0.5 * torch.special.erfc((self.mu - logsnr) / (self.s * _SQRT2))

    def _pdf(self, logsnr: Tensor) -> Tensor:
        z = (logsnr - self.mu) / self.s
        return torch.exp(-0.5 * z * z) / (self.s * math.sqrt(2.0 * math.pi))

    def _repr_args(self) -> dict[str, object]:
        return {"p_mean": self.p_mean, "p_std": self.p_std}


class EDMSampling(TruncatedSchedule):
    """EDM's sampling discretisation as a schedule (EDM eq. 5, VDM++ Table 4).

    σ(t) = (a + t(b − a))^ρ with a = σ_min^{1/ρ}, b = σ_max^{1/ρ}; λ = −2ρ log(a + t(b − a)),
    t = (e^{−λ/(2ρ)} − a)/(b − a), p(λ) = e^{−λ/(2ρ)}/(2ρ(b − a)). Natural endpoints
    λ ∈ [−2 log σ_max, −2 log σ_min] are the defaults.
    """

    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        *,
        logsnr_min: float | None = None,
        logsnr_max: float | None = None,
    ):
        if not (0 < sigma_min < sigma_max) or not rho > 0:
            raise ValueError(
                f"need 0 < sigma_min < sigma_max and rho > 0, got {sigma_min}, {sigma_max}, {rho}"
            )
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self._a = self.sigma_min ** (1.0 / self.rho)
        self._b = self.sigma_max ** (1.0 / self.rho)
        super().__init__(
            logsnr_min=-2.0 * math.log(sigma_max) if logsnr_min is None else logsnr_min,
            logsnr_max=-2.0 * math.log(sigma_min) if logsnr_max is None else logsnr_max,
        )

    def _logsnr(self, u: Tensor, v: Tensor) -> Tensor:
        return -2.0 * self.rho * torch.log(self._a + u * (self._b - self._a))

    def _t(self, logsnr: Tensor) -> Tensor:
        return (torch.exp(-logsnr / (2.0 * self.rho)) - self._a) / (self._b - self._a)

    def _pdf(self, logsnr: Tensor) -> Tensor:
        return torch.exp(-logsnr / (2.0 * self.rho)) / (2.0 * self.rho * (self._b - self._a))

    def _repr_args(self) -> dict[str, object]:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "rho": self.rho}


class FlowOT(TruncatedSchedule):
    """Rectified flow / flow matching with OT paths, z_t = (1 − t)x + tε (VDM++ App. D.3).

    α = 1 − t, σ = t: λ = 2 log((1 − t)/t), t = sigmoid(−λ/2), p(λ) = sech²(λ/4)/8.
    """

    def __init__(self, *, logsnr_min: float = -20.0, logsnr_max: float = 20.0):
        super().__init__(logsnr_min=logsnr_min, logsnr_max=logsnr_max)

    def _logsnr(self, u: Tensor, v: Tensor) -> Tensor:
        return 2.0 * (torch.log(v) - torch.log(u))

    def _t(self, logsnr: Tensor) -> Tensor:
        return torch.sigmoid(-0.5 * logsnr)

    def _one_minus_t(self, logsnr: Tensor) -> Tensor:
        return torch.sigmoid(0.5 * logsnr)

    def _pdf(self, logsnr: Tensor) -> Tensor:
        # sech²(λ/4)/8 = sigmoid(λ/2)·sigmoid(−λ/2)/2, computed in log space.
        return 0.5 * torch.exp(F.logsigmoid(0.5 * logsnr) + F.logsigmoid(-0.5 * logsnr))


class LinearVP(TruncatedSchedule):
    """DDPM's linear-β VP schedule in continuous time (EDM Table 1, "VP").

    σ_EDM(t)² = e^{½β_d t² + β_min t} − 1 and λ = −2 log σ_EDM:
    λ = −log expm1(½β_d t² + β_min t);  with q = softplus(−λ) = ½β_d t² + β_min t,
    t = 2q/(β_min + √(β_min² + 2β_d q));  p(λ) = −dt/dλ = sigmoid(−λ)/√(β_min² + 2β_d q).
    Natural endpoints t ∈ [ε_t, 1] with ε_t = 10⁻³ (EDM Table 1) are the defaults.
    """

    def __init__(
        self,
        beta_min: float = 0.1,
        beta_d: float = 19.9,
        *,
        logsnr_min: float | None = None,
        logsnr_max: float | None = None,
        eps_t: float = 1e-3,
    ):
        if not (beta_min >= 0 and beta_d > 0):
            raise ValueError(f"need beta_min >= 0 and beta_d > 0, got {beta_min}, {beta_d}")
        self.beta_min, self.beta_d = float(beta_min), float(beta_d)

        def lam(t: float) -> float:
            return -math.log(math.expm1(0.5 * self.beta_d * t * t + self.beta_min * t))

        super().__init__(
            logsnr_min=lam(1.0) if logsnr_min is None else logsnr_min,
            logsnr_max=lam(eps_t) if logsnr_max is None else logsnr_max,
        )

    def _logsnr(self, u: Tensor, v: Tensor) -> Tensor:
        return -torch.log(torch.expm1(0.5 * self.beta_d * u * u + self.beta_min * u))

    def _t(self, logsnr: Tensor) -> Tensor:
        q = F.softplus(-logsnr)
        return 2.0 * q / (self.beta_min + torch.sqrt(self.beta_min**2 + 2.0 * self.beta_d * q))

    def _pdf(self, logsnr: Tensor) -> Tensor:
        q = F.softplus(-logsnr)
        return torch.sigmoid(-logsnr) / torch.sqrt(self.beta_min**2 + 2.0 * self.beta_d * q)

    def _repr_args(self) -> dict[str, object]:
        return {"beta_min": self.beta_min, "beta_d": self.beta_d}


class LinearLogSNR(TruncatedSchedule):
    """λ linear in t: λ = λ_max − t(λ_max − λ_min), p(λ) = 1/(λ_max − λ_min) (uniform in λ).

    Untruncated f(u) = −u, so eq. 127–131 give exactly this. A flat importance distribution for
    evaluating ½∫‖ε − ε̂‖²dλ (the VLB's diffusion term), with no vanishing p(λ) at the ends.
    """

    def __init__(self, *, logsnr_min: float = -20.0, logsnr_max: float = 20.0):
        super().__init__(logsnr_min=logsnr_min, logsnr_max=logsnr_max)

    def _logsnr(self, u: Tensor, v: Tensor) -> Tensor:
        return -u

    def _t(self, logsnr: Tensor) -> Tensor:
        return -logsnr

    def _pdf(self, logsnr: Tensor) -> Tensor:
        return torch.ones_like(logsnr)
