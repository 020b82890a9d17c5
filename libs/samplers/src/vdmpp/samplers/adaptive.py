"""Adaptive-step DPM-Solver-12 / 23 (Lu et al. 2022a, §4.2 and Alg. 4–5; k-diffusion
``sample_dpm_adaptive``), on an EDM denoiser.

The solver works in t = λ = −log σ with the noise prediction ε̂ = (x − D(x; σ))/σ, for which the
PF-ODE is dx/dλ = −σ·ε̂ (DPM-Solver eq. 3.4 in EDM units: α = 1). A step of order k from s to t
(h = t − s) is DPM-Solver-k (eq. 3.7–3.9, Alg. 1 with r₁ = ½ or ⅓, ⅔); each attempt computes a
lower- and a higher-order solution sharing their evaluations (12: DPM-Solver-1 and -2, 2 NFE;
23: DPM-Solver-2 with r₁ = ⅓ and -3, 3 NFE), the error E = ‖(x_low − x_high)/δ‖/√numel with
δ = max(atol, rtol·max(|x_low|, |x_prev|)), and k-diffusion's PID controller proposes the next h.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._progress import _tqdm
from ._step import _compute_dtype
from .denoiser import Denoiser
from .fast import ancestral_step
from .generators import randn_like
from .samplers import Callback, Generator, SampleInfo, _Evaluator, _finish, _grid, _start

__all__ = ["AdaptiveInfo", "dpm_adaptive"]


@dataclass(frozen=True)
class AdaptiveInfo(SampleInfo):
    """``SampleInfo`` of ``dpm_adaptive``: ``steps`` counts attempts, of which ``accepted``
    advanced the solution and ``rejected`` were retried with a smaller step."""

    accepted: int = 0
    rejected: int = 0


class _PID:
    """k-diffusion's ``PIDStepSizeController`` (Söderlind's digital filters): the step factor is
    1 + atan(ε₀^{b1} ε₁^{b2} ε₂^{b3} − 1) of the inverse errors; a step is accepted when the
    factor is ≥ ``accept_safety``; h is scaled by the factor either way."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order, accept_safety, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs: list[float] = []

    def propose_step(self, error: float) -> bool:
        inv = 1 / (error + self.eps)
        if not self.errs:
            self.errs = [inv, inv, inv]
        self.errs[0] = inv
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2] = self.errs[1]
            self.errs[1] = self.errs[0]
        self.h *= factor
        return accept


def _bounds(sigmas, sigma_min, sigma_max) -> tuple[float, float]:
    if sigmas is not None:
        if sigma_min is not None or sigma_max is not None:
            raise ValueError("dpm_adaptive takes either sigmas or sigma_min/sigma_max, not both")
        ts = [t for t in _grid(sigmas) if t > 0]
        sigma_min, sigma_max = min(ts), max(ts)
    if sigma_min is None or sigma_max is None:
        raise ValueError("dpm_adaptive needs sigma_min and sigma_max (or a sigmas grid)")
    lo, hi = float(sigma_min), float(sigma_max)
    if not (0 < lo < hi and math.isfinite(hi)):
        raise ValueError(f"dpm_adaptive needs 0 < sigma_min < sigma_max, got {lo}, {hi}")
    return lo, hi


@torch.no_grad()
def dpm_adaptive(
    denoiser: Denoiser,
    noise: Tensor,
    sigmas: Tensor | Sequence[float] | None = None,
    *,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    order: int = 3,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.05,
    pcoeff: float = 0.0,
    icoeff: float = 1.0,
    dcoeff: float = 0.0,
    accept_safety: float = 0.81,
    eta: float = 0.0,
    s_noise: float = 1.0,
    denoise_to_zero: bool = False,
    generator: Generator = None,
    callback: Callback = None,
    extra_args: Mapping[str, Any] | None = None,
    return_info: bool = False,
    check_finite: bool = True,
    progress: bool = False,
):
    """DPM-Solver-12 (``order=2``) or -23 (``order=3``) with adaptive steps from σ_max to σ_min.

    Takes ``sigma_min``/``sigma_max`` — or a grid ``sigmas``, whose largest and smallest positive
    entries are used (so every sampler can be called as ``fn(D, noise, sigmas)``). Starts at
    ``noise * sigma_max`` and returns the solution at σ_min, as k-diffusion does;
    ``denoise_to_zero=True`` returns D(x; σ_min) instead (one more NFE). ``rtol``, ``atol``,
    ``h_init`` (in λ) and the PID coefficients are k-diffusion's, with its defaults. η > 0 adds
    ancestral noise after every accepted step (the controller then uses order 1.5).

    NFE is counted by the evaluator (``return_info=True`` → :class:`AdaptiveInfo`): ``order`` per
    accepted attempt and ``order − 1`` per rejected one — a deliberate difference from
    k-diffusion, which re-evaluates the unchanged D(x; σ_s) after a rejection (same samples, one
    NFE more per rejection, and its ``info["nfe"]`` counts ``order`` per attempt).

    Unlike the fixed-grid samplers: the controller reads the error on the host, one sync per
    attempt (inherent to step-size control); the error norm runs over the whole batch, as in
    k-diffusion, so the steps — and each sample — depend on the batch, not on one seed alone.
    Noise: one ``randn_like(x)`` per accepted attempt when η > 0.
    """
    if isinstance(order, bool) or order not in (2, 3):
        raise ValueError(f"dpm_adaptive order must be 2 or 3, got {order!r}")
    if eta < 0 or s_noise < 0:
        raise ValueError(f"eta and s_noise must be >= 0, got {eta}, {s_noise}")
    if not (rtol >= 0 and atol >= 0 and rtol + atol > 0):
        raise ValueError(f"need rtol, atol >= 0 and not both 0, got {rtol}, {atol}")
    if not h_init > 0:
        raise ValueError(f"h_init must be > 0, got {h_init}")
    lo, hi = _bounds(sigmas, sigma_min, sigma_max)
    _, x = _start(noise, [hi, lo], check_finite)
    dtype, ct = x.dtype, _compute_dtype(x.dtype)
    ev = _Evaluator(denoiser, x, extra_args, check_finite)

    def sig(t: float) -> float:
        return math.exp(-t)

    cache: dict[str, Tensor] = {}

    def eps(key: str, xk: Tensor, t: float, step: int) -> Tensor:
        if key in cache:
            return cache[key]
        e = (xk - ev(xk.to(dtype), sig(t), step).to(ct)) / sig(t)
        cache[key] = e
        return e

    def dpm1(xc: Tensor, s: float, t: float, step: int) -> Tensor:
        return xc - sig(t) * math.expm1(t - s) * eps("eps", xc, s, step)

    def dpm2(xc: Tensor, s: float, t: float, r1: float, step: int) -> Tensor:
        h = t - s
        e = eps("eps", xc, s, step)
        s1 = s + r1 * h
        u1 = xc - sig(s1) * math.expm1(r1 * h) * e
        e1 = eps("eps_r1", u1, s1, step)
        em = math.expm1(h)
        return xc - sig(t) * em * e - sig(t) / (2 * r1) * em * (e1 - e)

    def dpm3(xc: Tensor, s: float, t: float, step: int, r1=1 / 3, r2=2 / 3) -> Tensor:
        h = t - s
        e = eps("eps", xc, s, step)
        s1, s2 = s + r1 * h, s + r2 * h
        u1 = xc - sig(s1) * math.expm1(r1 * h) * e
        e1 = eps("eps_r1", u1, s1, step)
        em2 = math.expm1(r2 * h)
        u2 = xc - sig(s2) * em2 * e - sig(s2) * (r2 / r1) * (em2 / (r2 * h) - 1) * (e1 - e)
        e2 = eps("eps_r2", u2, s2, step)
        em = math.expm1(h)
        return xc - sig(t) * em * e - sig(t) / r2 * (em / h - 1) * (e2 - e)

    t_start, t_end = -math.log(hi), -math.log(lo)
    s = t_start
    xc = x.to(ct)
    x_prev = xc
    pid = _PID(h_init, pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    attempts = accepted = rejected = 0
    tqdm = _tqdm() if progress else None
    bar = tqdm(total=None, desc="dpm_adaptive", unit="step", leave=False) if tqdm else None
    try:
        while s < t_end - 1e-5:
            t = min(t_end, s + pid.h)
            if eta:
                sd, su = ancestral_step(sig(s), sig(t), eta)
                t_ = min(t_end, -math.log(sd))
                su = math.sqrt(sig(t) ** 2 - sig(t_) ** 2)
            else:
                t_, su = t, 0.0
            e0 = eps("eps", xc, s, attempts)
            denoised = xc - sig(s) * e0
            if order == 2:
                x_low = dpm1(xc, s, t_, attempts)
                x_high = dpm2(xc, s, t_, 0.5, attempts)
            else:
                x_low = dpm2(xc, s, t_, 1 / 3, attempts)
                x_high = dpm3(xc, s, t_, attempts)
            delta = torch.clamp(rtol * torch.maximum(x_low.abs(), x_prev.abs()), min=atol)
            err_t = torch.linalg.vector_norm((x_low - x_high) / delta) / math.sqrt(x.numel())
            error = float(err_t)  # the one host sync per attempt: the controller needs it
            if not math.isfinite(error):
                raise FloatingPointError(
                    f"dpm_adaptive: non-finite error estimate at attempt {attempts} "
                    f"(sigma={sig(s):g}); the denoiser returned NaN/inf or the step overflowed"
                )
            accept = pid.propose_step(error)
            cache = {k: v for k, v in cache.items() if not accept and k == "eps"}
            if accept:
                x_prev = x_low
                xc = x_high
                if su > 0:
                    xc = xc + su * s_noise * randn_like(x, generator).to(ct)
                xc = xc.to(dtype).to(ct)
                s = t
                accepted += 1
            else:
                rejected += 1
            attempts += 1
            if bar is not None:
                bar.set_postfix(nfe=ev.nfe, sigma=f"{sig(s):.3g}", refresh=False)
                bar.update(1)
            if callback is not None:
                callback(
                    {"i": attempts - 1, "x": xc.to(dtype), "denoised": denoised.to(dtype),
                     "sigma": sig(s), "sigma_hat": sig(s), "sigma_next": sig(t),
                     "nfe": ev.nfe, "error": error, "h": pid.h, "accepted": accept}
                )  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    if denoise_to_zero:
        xc = ev(xc.to(dtype), lo, attempts).to(ct)
    out = _finish(xc.to(dtype), ev, attempts, False, True, check_finite)[0]
    info = AdaptiveInfo(nfe=ev.nfe, steps=attempts, accepted=accepted, rejected=rejected)
    return (out, info) if return_info else out
