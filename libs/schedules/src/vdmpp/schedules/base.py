"""The NoiseSchedule protocol and truncation of closed-form schedules (VDM++ App. E.3)."""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["NoiseSchedule", "TruncatedSchedule", "check_logsnr_range", "check_unit_interval"]


@runtime_checkable
class NoiseSchedule(Protocol):
    """A noise schedule t ∈ [0, 1] → λ, decreasing, with λ(0) = logsnr_max, λ(1) = logsnr_min.

    ``pdf`` is the density of λ when t ~ U[0, 1]: p(λ) = −dt/dλ on [logsnr_min, logsnr_max],
    0 outside (VDM++ App. E.3).
    """

    logsnr_min: float
    logsnr_max: float

    def logsnr(self, t: Tensor) -> Tensor: ...

    def t(self, logsnr: Tensor) -> Tensor: ...

    def pdf(self, logsnr: Tensor) -> Tensor: ...


def check_logsnr_range(logsnr_min: float, logsnr_max: float) -> None:
    """Raise a clear error unless −inf < logsnr_min < logsnr_max < inf."""
    lo, hi = float(logsnr_min), float(logsnr_max)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"logsnr_min/logsnr_max must be finite, got [{lo}, {hi}]")
    if lo >= hi:
        raise ValueError(f"logsnr_min must be < logsnr_max, got logsnr_min={lo}, logsnr_max={hi}")


def check_unit_interval(t: Tensor, name: str = "t") -> None:
    """Reject t outside [0, 1] (or NaN) where that is free: CPU tensors, outside torch.compile.

    On accelerators the check would be a host sync, so it is skipped there.
    """
    if t.device.type != "cpu" or torch.compiler.is_compiling() or t.numel() == 0:
        return
    bad = ~((t >= 0) & (t <= 1))
    if bool(bad.any()):
        raise ValueError(f"{name} must lie in [0, 1]; got values such as {t[bad][:3].tolist()}")


def _float(t: Tensor) -> Tensor:
    if not t.is_floating_point():
        return t.to(torch.get_default_dtype())
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class TruncatedSchedule:
    """A closed-form schedule f_λ, truncated to [logsnr_min, logsnr_max] (VDM++ eq. 127–132).

    Subclasses give the untruncated maps on u ∈ (0, 1): ``_logsnr(u, v)`` (with v = 1 − u passed
    separately so both ends stay accurate), ``_t(λ)`` and ``_pdf(λ)`` = −d_t/dλ. Truncation:
    t₀ = f⁻¹(λ_max), t₁ = f⁻¹(λ_min), f̃(t) = f(t₀ + (t₁ − t₀)t), f̃⁻¹(λ) = (f⁻¹(λ) − t₀)/(t₁ − t₀),
    p̃(λ) = p(λ)/(t₁ − t₀) on the range, 0 outside. Half-precision inputs are computed in float32.
    """

    logsnr_min: float
    logsnr_max: float

    def __init__(self, *, logsnr_min: float, logsnr_max: float) -> None:
        check_logsnr_range(logsnr_min, logsnr_max)
        self.logsnr_min = float(logsnr_min)
        self.logsnr_max = float(logsnr_max)
        ends = torch.tensor([self.logsnr_max, self.logsnr_min], dtype=torch.float64)
        self._t0, self._t1 = self._t(ends).tolist()
        self._v0, self._v1 = self._one_minus_t(ends).tolist()  # 1 − t₀, 1 − t₁ without cancellation
        if not self._t1 > self._t0:
            raise ValueError(
                f"{type(self).__name__}: degenerate truncation t0={self._t0}, t1={self._t1}"
            )

    # --- untruncated maps, to be provided by subclasses ---------------------------------------
    def _logsnr(self, u: Tensor, v: Tensor) -> Tensor:
        raise NotImplementedError

    def _t(self, logsnr: Tensor) -> Tensor:
        raise NotImplementedError

    def _pdf(self, logsnr: Tensor) -> Tensor:
        raise NotImplementedError

    def _one_minus_t(self, logsnr: Tensor) -> Tensor:
        """1 − f⁻¹(λ); overridden where a cancellation-free form exists."""
        return 1.0 - self._t(logsnr)

    # --- the truncated schedule ---------------------------------------------------------------
    def logsnr(self, t: Tensor) -> Tensor:
        """λ = f̃_λ(t) (VDM++ eq. 127), clamped to the exact endpoints."""
        check_unit_interval(t)
        tf = _float(t)
        u = self._t0 + (self._t1 - self._t0) * tf
        v = self._v1 + (self._v0 - self._v1) * (1.0 - tf)  # 1 − t is exact near t = 1
        lam = self._logsnr(u, v).clamp(self.logsnr_min, self.logsnr_max)
        return lam.to(t.dtype) if t.is_floating_point() else lam

    def t(self, logsnr: Tensor) -> Tensor:
        """t = f̃_λ⁻¹(λ) (VDM++ eq. 130); λ outside the range maps to the nearest end."""
        lam = _float(logsnr)
        t = (self._t(lam) - self._t0) / (self._t1 - self._t0)
        return t.clamp(0.0, 1.0).to(logsnr.dtype)

    def pdf(self, logsnr: Tensor) -> Tensor:
        """p̃(λ) = p(λ)/(t₁ − t₀) on [λ_min, λ_max], else 0 (VDM++ eq. 131–132)."""
        lam = _float(logsnr)
        inside = (lam >= self.logsnr_min) & (lam <= self.logsnr_max)
        p = self._pdf(lam) / (self._t1 - self._t0)
        return torch.where(inside, p, torch.zeros_like(p)).to(logsnr.dtype)

    def logsnr_pdf(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(λ(t), p(λ(t))) in one call, as the weighted loss needs them."""
        lam = self.logsnr(t)
        return lam, self.pdf(lam)

    def __repr__(self) -> str:
        extra = ", ".join(f"{k}={v!r}" for k, v in self._repr_args().items())
        ends = f"logsnr_min={self.logsnr_min:g}, logsnr_max={self.logsnr_max:g}"
        return f"{type(self).__name__}({extra + ', ' if extra else ''}{ends})"

    def _repr_args(self) -> dict[str, object]:
        return {}
