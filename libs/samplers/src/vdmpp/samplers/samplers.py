"""Samplers on an EDM denoiser D(x; σ), one signature for all (EDM §3, VDM A.3).

``sampler(denoiser, noise, sigmas, *, generator=None, callback=None, ...) -> x0``

* ``noise``: unit Gaussian ``[B, ...]``; sampling starts at ``x = noise * sigmas[0]`` and runs in
  ``noise.dtype`` (float64 for reference runs, float32/bf16 for speed).
* ``sigmas``: a strictly decreasing grid σ₀ > … > σ_N ≥ 0 (``karras_sigmas``,
  ``sigmas_from_schedule``), validated once on the CPU before the loop and read as Python floats,
  so the loop never waits on the device.
* ``generator``: ``torch.Generator`` or :class:`~vdmpp.samplers.PerSampleGenerator` for the noise
  the stochastic samplers add (None: torch's global RNG). When noise is drawn — the order a
  seed replays — is stated in each sampler's docstring.
* ``callback(info)`` after every step with a dict: ``i``, ``x`` (the new iterate), ``denoised``
  (D at the step's first evaluation), ``sigma``, ``sigma_hat``, ``sigma_next``, ``nfe`` so far.
* ``extra_args``: keyword arguments for every denoiser call (e.g. ``{"class_labels": y}``).
* ``return_info=True`` returns ``(x0, SampleInfo)``; ``SampleInfo.nfe`` is the number of
  denoiser evaluations (Heun: 2N − 1 on a grid ending at 0); a ``guided`` denoiser reports
  what each call cost (2 where it guides, 1 outside its interval or for w = 0, 1).
* ``progress=True``: a tqdm bar over the steps (with the NFE so far) when tqdm is installed;
  silent otherwise (tqdm is optional, never a dependency).
* ``check_finite=True``: a NaN/inf from the denoiser is an error. On the CPU every denoiser output
  is checked (the error names the step and evaluation) — in the EDM samplers through the result
  of the step that consumed it, which NaN/inf always reaches: one reduction per step; on
  accelerators the result is checked once at the end (one host sync per sampling call, none
  inside the loop). Shape mismatches between the denoiser
  output and ``x`` are always errors (no sync needed).

All samplers run under ``torch.no_grad()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vdmpp.schedules import logsnr_from_sigma, vp, vp_transition

from ._progress import steps as _progress
from ._step import _compute_dtype, _kernels_enabled, _ops, all_finite
from .denoiser import Denoiser, _counted
from .generators import PerSampleGenerator, randn_like

__all__ = ["SampleInfo", "ddim", "ddpm", "edm_stochastic", "euler", "heun"]

Generator = torch.Generator | PerSampleGenerator | None
Callback = Callable[[dict[str, Any]], None] | None


@dataclass(frozen=True)
class SampleInfo:
    """What a sampling call cost: denoiser evaluations, steps, and whether kernels ran."""

    nfe: int
    steps: int
    kernels: bool = False


def _grid(sigmas: Tensor | Sequence[float]) -> list[float]:
    """Validate a σ grid once (on the CPU) and return it as Python floats."""
    if isinstance(sigmas, Tensor):
        s = sigmas.detach().to("cpu", torch.float64)  # the one device→host copy, before the loop
    else:
        s = torch.tensor(sigmas, dtype=torch.float64)
    if s.ndim != 1 or s.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D grid with at least 2 entries, got {tuple(s.shape)}")
    ts = s.tolist()
    for i, t in enumerate(ts):
        if not math.isfinite(t):
            raise ValueError(f"sigmas must be finite; sigmas[{i}] = {t}")
        if t < 0:
            raise ValueError(f"sigmas must be >= 0; sigmas[{i}] = {t}")
    for i in range(1, len(ts)):
        if not ts[i] < ts[i - 1]:
            raise ValueError(
                "sigmas must be strictly decreasing (sampling runs from noise to data); "
                f"sigmas[{i}] = {ts[i]} >= sigmas[{i - 1}] = {ts[i - 1]}"
            )
    return ts


def _check_noise(noise: Tensor) -> None:
    if not isinstance(noise, Tensor) or not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point tensor, got {type(noise).__name__}")
    if noise.ndim < 1:
        raise ValueError("noise must have a leading batch dimension")


def _checks_on(x: Tensor, check_finite: bool) -> bool:
    return check_finite and x.device.type == "cpu" and not torch.compiler.is_compiling()


class _Evaluator:
    """Calls the denoiser with σ as a [B] tensor, counts NFE, checks shape (and NaN on CPU).

    NFE counts real denoiser evaluations: a denoiser with ``call_counted`` (``Guided``) is
    given the step's σ as a Python float too and reports how many evaluations it made."""

    def __init__(
        self, denoiser: Denoiser, x: Tensor, extra_args: Mapping[str, Any] | None, check: bool
    ):
        self.denoiser = denoiser
        self.kwargs = dict(extra_args or {})
        self.check_nan = _checks_on(x, check)
        self.sigma_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        self.nfe = 0
        # deferred=True (the EDM loop, via _step._Stepper): the outputs a step consumed are
        # checked through that step's result, one reduction per step instead of one per NFE
        self.deferred = False
        self.pending: list[tuple[Tensor, int, float, int]] = []

    def __call__(self, x: Tensor, sigma: float, i: int) -> Tensor:
        s = torch.full((x.shape[0],), sigma, device=x.device, dtype=self.sigma_dtype)
        d, n = _counted(self.denoiser, x, s, self.kwargs, sigma)  # a Guided call may cost 2
        self.nfe += n
        if not isinstance(d, Tensor) or d.shape != x.shape:
            got = tuple(d.shape) if isinstance(d, Tensor) else type(d).__name__
            raise ValueError(
                f"denoiser returned {got} for an input of shape {tuple(x.shape)} "
                f"(step {i}, sigma={sigma:g}); it must return a tensor shaped like x"
            )
        if self.check_nan:
            if self.deferred:
                self.pending.append((d, i, sigma, self.nfe))
            elif not all_finite(d):  # one reduction, one scalar read
                self._raise(i, sigma, self.nfe)
        return d

    @staticmethod
    def _raise(i: int, sigma: float, nfe: int) -> None:
        raise FloatingPointError(
            f"denoiser returned NaN/inf at step {i} (sigma={sigma:g}, evaluation {nfe})"
        )

    def check_step(self, out: Tensor, i: int | None = None) -> None:
        """Deferred check: ``out`` was computed from every pending output, and NaN/inf in any of
        them reaches it (the step only adds, subtracts, scales by non-zero σ's), so one finite
        ``out`` clears them all; otherwise name the first non-finite one, as the eager check."""
        pending, self.pending = self.pending, []
        if not self.check_nan or all_finite(out):
            return
        i = i if i is not None else (pending[-1][1] if pending else -1)
        for d, j, sigma, nfe in pending:
            if not all_finite(d):
                self._raise(j, sigma, nfe)
        raise FloatingPointError(
            f"the sample became NaN/inf at step {i} although the denoiser's outputs were finite "
            "(overflow in the step)"
        )


def _start(noise: Tensor, sigmas: Any, check_finite: bool) -> tuple[list[float], Tensor]:
    _check_noise(noise)
    ts = _grid(sigmas)
    if _checks_on(noise, check_finite) and not all_finite(noise):
        raise FloatingPointError("noise contains NaN/inf")
    return ts, noise * ts[0]


def _finish(x: Tensor, ev: _Evaluator, steps: int, kernels: bool, return_info: bool, check: bool):
    if ev.pending:  # deferred outputs no step result has covered (none in the EDM loop)
        ev.check_step(x, steps - 1)
    final_check = check and not ev.check_nan and not torch.compiler.is_compiling()
    if final_check and not all_finite(x):  # the one host sync, after the loop
        raise FloatingPointError(
            "the sample contains NaN/inf: the denoiser returned non-finite values at some step"
        )
    return (x, SampleInfo(nfe=ev.nfe, steps=steps, kernels=kernels)) if return_info else x


def _affine(x: Tensor, a: float, d: Tensor, b: float, eps: Tensor | None, c: float) -> Tensor:
    """a·x + b·d (+ c·eps), in float32 for half inputs (the policy of ``_step``)."""
    ct = _compute_dtype(x.dtype)
    out = a * x.to(ct) + b * d.to(ct)
    if eps is not None:
        out = out + c * eps.to(ct)
    return out.to(x.dtype)


def _edm(
    denoiser: Denoiser,
    noise: Tensor,
    sigmas: Any,
    *,
    churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
    second_order: bool,
    generator: Generator,
    callback: Callback,
    extra_args: Mapping[str, Any] | None,
    use_kernels: bool | None,
    return_info: bool,
    check_finite: bool,
    progress: bool = False,
):
    ts, x = _start(noise, sigmas, check_finite)
    if churn < 0 or s_noise < 0:
        raise ValueError(f"churn and s_noise must be >= 0, got {churn}, {s_noise}")
    n = len(ts) - 1
    ev = _Evaluator(denoiser, x, extra_args, check_finite)
    enabled = _kernels_enabled(x, use_kernels)
    churn_op, step_op = _ops(enabled, ev if ev.check_nan else None, second_order)
    gamma_max = min(churn / n, math.sqrt(2.0) - 1.0)
    for i in _progress(range(n), progress, "sampling", n, ev):
        t_cur, t_next = ts[i], ts[i + 1]
        gamma = gamma_max if s_tmin <= t_cur <= s_tmax else 0.0
        t_hat = t_cur + gamma * t_cur
        x_hat = churn_op(x, randn_like(x, generator), t_cur, t_hat, s_noise) if gamma > 0 else x
        denoised = ev(x_hat, t_hat, i)
        x_next = step_op(x_hat, denoised, None, t_hat, t_next)
        if second_order and t_next > 0:
            x_next = step_op(x_hat, denoised, ev(x_next, t_next, i), t_hat, t_next)
        x = x_next
        if callback is not None:
            callback(
                {"i": i, "x": x, "denoised": denoised, "sigma": t_cur, "sigma_hat": t_hat,
                 "sigma_next": t_next, "nfe": ev.nfe}
            )  # fmt: skip
    return _finish(x, ev, n, enabled, return_info, check_finite)


@torch.no_grad()
def euler(
    denoiser: Denoiser,
    noise: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    generator: Generator = None,
    callback: Callback = None,
    extra_args: Mapping[str, Any] | None = None,
    use_kernels: bool | None = None,
    return_info: bool = False,
    check_finite: bool = True,
    progress: bool = False,
):
    """Euler's method on the PF-ODE dx/dσ = (x − D(x;σ))/σ (EDM Alg. 1 without lines 6–8).

    NFE = N. Deterministic: ``generator`` is accepted for the common signature and unused.
    """
    return _edm(
        denoiser, noise, sigmas, churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0,
        second_order=False, generator=generator, callback=callback, extra_args=extra_args,
        use_kernels=use_kernels, return_info=return_info, check_finite=check_finite,
        progress=progress,
    )  # fmt: skip


@torch.no_grad()
def heun(
    denoiser: Denoiser,
    noise: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    generator: Generator = None,
    callback: Callback = None,
    extra_args: Mapping[str, Any] | None = None,
    use_kernels: bool | None = None,
    return_info: bool = False,
    check_finite: bool = True,
    progress: bool = False,
):
    """EDM's deterministic Heun sampler (EDM Alg. 1, σ(t) = t, s(t) = 1).

    A 2nd-order correction on every step except one that lands on σ = 0, which is Euler:
    NFE = 2N − 1 on a grid ending at 0 (2N otherwise). Draws no noise.
    ``use_kernels``: None (auto / ``VDMPP_KERNELS``), True or False; see ``_step``.
    """
    return _edm(
        denoiser, noise, sigmas, churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0,
        second_order=True, generator=generator, callback=callback, extra_args=extra_args,
        use_kernels=use_kernels, return_info=return_info, check_finite=check_finite,
        progress=progress,
    )  # fmt: skip


@torch.no_grad()
def edm_stochastic(
    denoiser: Denoiser,
    noise: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    generator: Generator = None,
    callback: Callback = None,
    extra_args: Mapping[str, Any] | None = None,
    use_kernels: bool | None = None,
    return_info: bool = False,
    check_finite: bool = True,
    progress: bool = False,
):
    """EDM's stochastic sampler (EDM Alg. 2).

    γ_i = min(S_churn/N, √2 − 1) if S_tmin ≤ t_i ≤ S_tmax else 0 (N = len(sigmas) − 1);
    t̂ = t_i + γ_i t_i; x̂ = x_i + √(t̂² − t_i²)·S_noise·ε; then the Heun step from t̂ to t_{i+1}
    (Euler when t_{i+1} = 0). Noise: one ``randn_like(x)`` from ``generator`` on exactly the steps
    with γ_i > 0, before that step's denoiser call; none otherwise (churn=0 is ``heun``).
    NFE = 2N − 1 on a grid ending at 0.
    """
    return _edm(
        denoiser, noise, sigmas, churn=float(churn), s_tmin=float(s_tmin), s_tmax=float(s_tmax),
        s_noise=float(s_noise), second_order=True, generator=generator, callback=callback,
        extra_args=extra_args, use_kernels=use_kernels, return_info=return_info,
        check_finite=check_finite, progress=progress,
    )  # fmt: skip


def _ancestral_coefficients(ts: list[float]) -> list[tuple[float, float]]:
    """Per step (keep, r) of the ancestral step in EDM units, from vdmpp.schedules in float64.

    VDM eq. 28 in VP units, for s < t (σ_{i+1} = EDM σ of s, σ_i of t):
    z_s = α_{t|s}σ_s²/σ_t²·z_t + α_s σ²_{t|s}/σ_t²·x̂ + √(σ²_{t|s}σ_s²/σ_t²)·ε.
    Dividing by α_s (x = z/α) gives x_s = keep·x_t + r·x̂ + √r·σ_{i+1}·ε with
    keep = (α_{t|s}σ_s/σ_t)² = σ_{i+1}²/σ_i² and r = σ²_{t|s}/σ_t² = 1 − keep, where σ²_{t|s}
    is the stable −expm1(softplus(−λ_s) − softplus(−λ_t)) of App. J (``vp_transition``).
    """
    lam = logsnr_from_sigma(torch.tensor(ts, dtype=torch.float64))
    lam_t, lam_s = lam[:-1], lam[1:]
    alpha_ts, sigma2_ts = vp_transition(lam_s, lam_t)
    _, sig = vp(lam)
    sig_t, sig_s = sig[:-1], sig[1:]
    r = sigma2_ts / sig_t**2
    keep = (alpha_ts * sig_s / sig_t) ** 2
    return list(zip(keep.tolist(), r.tolist()))


@torch.no_grad()
def ddpm(
    denoiser: Denoiser,
    noise: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    generator: Generator = None,
    callback: Callback = None,
    extra_args: Mapping[str, Any] | None = None,
    return_info: bool = False,
    check_finite: bool = True,
    progress: bool = False,
):
    """DDPM ancestral sampling: x_{i+1} ~ p(z_s | z_t) of VDM eq. 28, in EDM units.

    See ``_ancestral_coefficients`` for the derivation. NFE = N. Noise: one ``randn_like(x)``
    from ``generator`` after the denoiser call of every step with σ_{i+1} > 0 (every step but
    the last on a grid ending at 0, where the step returns x̂).
    """
    ts, x = _start(noise, sigmas, check_finite)
    coeffs = _ancestral_coefficients(ts)
    ev = _Evaluator(denoiser, x, extra_args, check_finite)
    for i, (keep, r) in enumerate(_progress(coeffs, progress, "ddpm", len(coeffs), ev)):
        t_cur, t_next = ts[i], ts[i + 1]
        denoised = ev(x, t_cur, i)
        eps = randn_like(x, generator) if t_next > 0 else None
        x = _affine(x, keep, denoised, r, eps, math.sqrt(r) * t_next)
        if callback is not None:
            callback(
                {"i": i, "x": x, "denoised": denoised, "sigma": t_cur, "sigma_hat": t_cur,
                 "sigma_next": t_next, "nfe": ev.nfe}
            )  # fmt: skip
    return _finish(x, ev, len(coeffs), False, return_info, check_finite)


@torch.no_grad()
def ddim(
    denoiser: Denoiser,
    noise: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    eta: float = 0.0,
    generator: Generator = None,
    callback: Callback = None,
    extra_args: Mapping[str, Any] | None = None,
    return_info: bool = False,
    check_finite: bool = True,
    progress: bool = False,
):
    """DDIM (Song et al. 2021) in EDM units: x_{i+1} = x̂ + c·(x_i − x̂) + σ_η·ε.

    σ_η = η·√r·σ_{i+1} (r as in ``ddpm``) and c = √(σ_{i+1}² − σ_η²)/σ_i. η = 0 (default) is
    deterministic, c = σ_{i+1}/σ_i, which is algebraically Euler's step (EDM App. C);
    η = 1 is ``ddpm``. NFE = N. Noise: one ``randn_like(x)`` after the denoiser call of every
    step with σ_η > 0 (never for η = 0).
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    ts, x = _start(noise, sigmas, check_finite)
    coeffs = _ancestral_coefficients(ts) if eta > 0 else [(0.0, 0.0)] * (len(ts) - 1)
    ev = _Evaluator(denoiser, x, extra_args, check_finite)
    for i, (_, r) in enumerate(_progress(coeffs, progress, "ddim", len(coeffs), ev)):
        t_cur, t_next = ts[i], ts[i + 1]
        denoised = ev(x, t_cur, i)
        s_eta = eta * math.sqrt(r) * t_next
        c = math.sqrt(max(t_next * t_next - s_eta * s_eta, 0.0)) / t_cur
        eps = randn_like(x, generator) if s_eta > 0 else None
        x = _affine(x, c, denoised, 1.0 - c, eps, s_eta)
        if callback is not None:
            callback(
                {"i": i, "x": x, "denoised": denoised, "sigma": t_cur, "sigma_hat": t_cur,
                 "sigma_next": t_next, "nfe": ev.nfe}
            )  # fmt: skip
    return _finish(x, ev, len(coeffs), False, return_info, check_finite)
