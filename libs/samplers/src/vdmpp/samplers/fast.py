"""k-diffusion's fast samplers on an EDM denoiser: ancestral, DPM-Solver-2, LMS, DPM-Solver++.

Each is one function with the common signature of ``samplers.py``
(``(denoiser, noise, sigmas, *, generator=None, callback=None, extra_args=None,
return_info=False, check_finite=True, progress=False, **own) -> x0``), and each transcribes the
step of the k-diffusion function of the same name (``k_diffusion.sampling.sample_<name>``,
k-diffusion 0.1.1) in EDM's units x = data + σ·n (Karras et al. 2022, §2).

Time variable: DPM-Solver (Lu et al. 2022a) and DPM-Solver++ (Lu et al. 2022b) step in
t = λ = −log σ (half the log-SNR); h = λ_{i+1} − λ_i > 0. The data-prediction update of
DPM-Solver++ eq. 9, divided by α (x = z/α), is x_{i+1} = (σ_{i+1}/σ_i)·x_i − expm1(−h)·D̂.

Conventions (as in ``samplers.py``): sampling starts at ``noise * sigmas[0]``; the grid is
validated once on the CPU and read as Python floats, so every coefficient is a Python float and
the loop never syncs with an accelerator; the denoiser sees σ as a ``[B]`` tensor; float16/bf16
step arithmetic runs in float32 and each step's result is rounded to ``noise.dtype``; the
callback gets ``i, x, denoised, sigma, sigma_hat, sigma_next, nfe`` after every step.

Noise (so the same stream of tensors gives k-diffusion's samples): every noise injection is one
``randn_like(x, generator)``, drawn in the order k-diffusion calls its ``noise_sampler``, and only
when the injection's scale σ_up is non-zero (k-diffusion also calls it when η = 0 and multiplies
by 0: same samples, but it advances the stream). ``dpmpp_sde``, ``dpmpp_2m_sde`` and
``dpmpp_3m_sde`` default in k-diffusion to a ``BrownianTreeNoiseSampler`` (torchsde); vdmpp has no
such dependency and draws the Brownian increments directly — see ``dpmpp_sde``.

The step that lands on σ = 0 is k-diffusion's: Euler (= D̂) for the ancestral, DPM-2, LMS and
2S/SDE samplers, x = D̂ for the multistep DPM-Solver++ ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._progress import steps as _progress
from ._step import _compute_dtype
from .denoiser import Denoiser
from .generators import randn_like
from .samplers import Callback, Generator, _Evaluator, _finish, _start

__all__ = [
    "dpm_2",
    "dpm_2_ancestral",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_2s_ancestral",
    "dpmpp_3m_sde",
    "dpmpp_sde",
    "euler_ancestral",
    "lms",
]


# --- shared helpers -----------------------------------------------------------------------------


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(σ_down, σ_up) of an ancestral step from σ_from to σ_to (k-diffusion ``get_ancestral_step``).

    σ_up = min(σ_to, η·√(σ_to²(σ_from² − σ_to²)/σ_from²)), σ_down = √(σ_to² − σ_up²): a
    deterministic step to σ_down, then fresh noise of std σ_up brings the level back to σ_to.
    η = 1 is the DDPM posterior q(x_to | x_from, x̂) in EDM units (VDM eq. 28), so
    ``euler_ancestral`` with η = 1 is ``ddpm``; η = 0 is (σ_to, 0), a deterministic step.
    """
    if not eta:
        return sigma_to, 0.0
    up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - up**2), up


def _check_noise_args(eta: float, s_noise: float) -> None:
    if not (eta >= 0 and math.isfinite(eta)) or not (s_noise >= 0 and math.isfinite(s_noise)):
        raise ValueError(f"eta and s_noise must be finite and >= 0, got {eta}, {s_noise}")


class _Run:
    """One sampling call: grid, start, evaluator (NFE, checks) and the compute dtype.

    ``D(x, sigma, i)`` returns the denoiser output in the compute dtype (float32 for half
    inputs); ``out(t)`` rounds a step result to the sampling dtype.
    """

    def __init__(self, denoiser, noise, sigmas, extra_args, check_finite, callback):
        self.ts, x = _start(noise, sigmas, check_finite)
        self.x = x
        self.dtype = x.dtype
        self.ct = _compute_dtype(x.dtype)
        self.ev = _Evaluator(denoiser, x, extra_args, check_finite)
        self.callback = callback
        self.check_finite = check_finite

    def D(self, x: Tensor, sigma: float, i: int) -> Tensor:
        return self.ev(x.to(self.dtype), sigma, i).to(self.ct)

    def up(self, x: Tensor) -> Tensor:
        return x.to(self.ct)

    def out(self, x: Tensor) -> Tensor:
        return x.to(self.dtype)

    def steps(self, progress: bool, desc: str):
        n = len(self.ts) - 1
        return _progress(range(n), progress, desc, n, self.ev)

    def emit(self, i: int, x: Tensor, denoised: Tensor, sigma_hat: float | None = None) -> None:
        if self.callback is not None:
            s = self.ts[i]
            self.callback(
                {"i": i, "x": x, "denoised": denoised, "sigma": s,
                 "sigma_hat": s if sigma_hat is None else sigma_hat,
                 "sigma_next": self.ts[i + 1], "nfe": self.ev.nfe}
            )  # fmt: skip

    def finish(self, x: Tensor, return_info: bool):
        return _finish(x, self.ev, len(self.ts) - 1, False, return_info, self.check_finite)


def _to_d(x: Tensor, sigma: float, denoised: Tensor) -> Tensor:
    """The PF-ODE derivative dx/dσ = (x − D)/σ (EDM eq. 3; k-diffusion ``to_d``)."""
    return (x - denoised) / sigma


# --- ancestral and DPM-Solver-2 -----------------------------------------------------------------


@torch.no_grad()
def euler_ancestral(
    denoiser: Denoiser,
    noise: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    generator: Generator = None,
    callback: Callback = None,
    extra_args: Mapping[str, Any] | None = None,
    return_info: bool = False,
    check_finite: bool = True,
    progress: bool = False,
):
    """Ancestral sampling with Euler steps (k-diffusion ``sample_euler_ancestral``).

    Per step: D̂ = D(x; σ_i), an Euler step to σ_down, then + s_noise·σ_up·ε (``ancestral_step``).
    η = 1 is DDPM ancestral sampling (VDM eq. 28; equals ``ddpm``), η = 0 is ``euler``.
    NFE = N. Noise: one ``randn_like(x)`` after the denoiser call of every step with σ_up > 0
    (σ_{i+1} > 0 and η > 0).
    """
    _check_noise_args(eta, s_noise)
    run = _Run(denoiser, noise, sigmas, extra_args, check_finite, callback)
    ts, x = run.ts, run.x
    for i in run.steps(progress, "euler_ancestral"):
        s, s_next = ts[i], ts[i + 1]
        denoised = run.D(x, s, i)
        s_down, s_up = ancestral_step(s, s_next, eta)
        xc = run.up(x)
        xc = xc + _to_d(xc, s, denoised) * (s_down - s)
        if s_next > 0 and s_up > 0:
            xc = xc + run.up(randn_like(x, generator)) * s_noise * s_up
        x = run.out(xc)
        run.emit(i, x, denoised)
    return run.finish(x, return_info)


def _dpm2_substep(run: _Run, x: Tensor, d: Tensor, s: float, s_to: float, i: int) -> Tensor:
    """DPM-Solver-2 in σ (k-diffusion ``sample_dpm_2``): Euler to σ_mid = √(σ·σ_to) (the midpoint
    in log σ), then x + (σ_to − σ)·d(x_mid; σ_mid) — DPM-Solver-2 (Lu et al. 2022a, Alg. 1 with
    r₁ = ½) for the ε-model (x − D)/σ, up to the exponential-integrator weights."""
    s_mid = math.exp(math.log(s) + 0.5 * (math.log(s_to) - math.log(s)))
    x_2 = x + d * (s_mid - s)
    d_2 = _to_d(x_2, s_mid, run.D(x_2, s_mid, i))
    return x + d_2 * (s_to - s)


@torch.no_grad()
def dpm_2(
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
    """DPM-Solver-2-inspired midpoint sampler of k-diffusion (``sample_dpm_2``, s_churn = 0).

    Second order: Euler to σ_mid = √(σ_i σ_{i+1}), the derivative there carries the full step;
    the step to σ = 0 is Euler. NFE = 2N − 1 on a grid ending at 0. Deterministic (k-diffusion's
    churn arguments are not offered: ``edm_stochastic`` is EDM Alg. 2).
    """
    run = _Run(denoiser, noise, sigmas, extra_args, check_finite, callback)
    ts, x = run.ts, run.x
    for i in run.steps(progress, "dpm_2"):
        s, s_next = ts[i], ts[i + 1]
        denoised = run.D(x, s, i)
        xc = run.up(x)
        d = _to_d(xc, s, denoised)
        if s_next == 0:
            xc = xc + d * (s_next - s)
        else:
            xc = _dpm2_substep(run, xc, d, s, s_next, i)
        x = run.out(xc)
        run.emit(i, x, denoised)
    return run.finish(x, return_info)


@torch.no_grad()
def dpm_2_ancestral(
    denoiser: Denoiser,
    noise: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    generator: Generator = None,
    callback: Callback = None,
    extra_args: Mapping[str, Any] | None = None,
    return_info: bool = False,
    check_finite: bool = True,
    progress: bool = False,
):
    """Ancestral sampling with DPM-Solver-2 steps (k-diffusion ``sample_dpm_2_ancestral``).

    The ``dpm_2`` step to σ_down (Euler when σ_down = 0), then + s_noise·σ_up·ε.
    NFE = 2N − 1 on a grid ending at 0 (for η ≤ 1, σ_down = 0 only on the last step).
    Noise: one ``randn_like(x)`` after the step's denoiser calls when σ_up > 0.
    Deliberate difference: k-diffusion adds no noise on a step whose σ_down is 0 although
    σ_up > 0 (possible only for η > 1, where σ_up is clipped to σ_{i+1}), which leaves that step
    at noise level 0 instead of σ_{i+1}; vdmpp adds it. For η ≤ 1 the two are the same.
    """
    _check_noise_args(eta, s_noise)
    run = _Run(denoiser, noise, sigmas, extra_args, check_finite, callback)
    ts, x = run.ts, run.x
    for i in run.steps(progress, "dpm_2_ancestral"):
        s, s_next = ts[i], ts[i + 1]
        denoised = run.D(x, s, i)
        s_down, s_up = ancestral_step(s, s_next, eta)
        xc = run.up(x)
        d = _to_d(xc, s, denoised)
        if s_down == 0:
            xc = xc + d * (s_down - s)
        else:
            xc = _dpm2_substep(run, xc, d, s, s_down, i)
        if s_next > 0 and s_up > 0:
            xc = xc + run.up(randn_like(x, generator)) * s_noise * s_up
        x = run.out(xc)
        run.emit(i, x, denoised)
    return run.finish(x, return_info)


# --- linear multistep ---------------------------------------------------------------------------

# 4-point Gauss–Legendre on [0, 1]: exact for polynomials of degree <= 7 (LMS order <= 8).
_GL_X = (
    0.5 - 0.8611363115940526 / 2,
    0.5 - 0.3399810435848563 / 2,
    0.5 + 0.3399810435848563 / 2,
    0.5 + 0.8611363115940526 / 2,
)
_GL_W = (0.3478548451374538 / 2, 0.6521451548625461 / 2, 0.6521451548625461 / 2,
         0.3478548451374538 / 2)  # fmt: skip


def lms_coefficients(ts: Sequence[float], i: int, order: int) -> list[float]:
    """Adams–Bashforth weights in σ for step i: ∫_{σ_i}^{σ_{i+1}} ℓ_j(τ) dτ, j = 0 … order−1.

    ℓ_j is the Lagrange basis on the nodes σ_i, σ_{i−1}, …, σ_{i−order+1} (k-diffusion
    ``linear_multistep_coeff``, which integrates it with ``scipy.integrate.quad``); here the
    degree-(order−1) polynomial is integrated exactly by Gauss–Legendre in Python floats.
    """
    if order - 1 > i:
        raise ValueError(f"LMS order {order} too high for step {i}")
    a, b = ts[i], ts[i + 1]
    nodes = [ts[i - k] for k in range(order)]
    out = []
    for j in range(order):
        acc = 0.0
        for u, w in zip(_GL_X, _GL_W):
            tau = a + u * (b - a)
            prod = 1.0
            for k in range(order):
                if k != j:
                    prod *= (tau - nodes[k]) / (nodes[j] - nodes[k])
            acc += w * prod
        out.append(acc * (b - a))
    return out


@torch.no_grad()
def lms(
    denoiser: Denoiser,
    noise: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    order: int = 4,
    generator: Generator = None,
    callback: Callback = None,
    extra_args: Mapping[str, Any] | None = None,
    return_info: bool = False,
    check_finite: bool = True,
    progress: bool = False,
):
    """Linear multistep (Adams–Bashforth) on dx/dσ = (x − D)/σ (k-diffusion ``sample_lms``).

    x_{i+1} = x_i + Σ_j c_j d_{i−j} with the ``lms_coefficients`` of order min(i + 1, order)
    (lower orders while the history fills). NFE = N. Deterministic. Note it extrapolates in σ,
    not λ: on EDM's grid the large early σ-steps make it less accurate than its order suggests.
    """
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 8:
        raise ValueError(f"lms order must be an integer in 1 … 8, got {order!r}")
    run = _Run(denoiser, noise, sigmas, extra_args, check_finite, callback)
    ts, x = run.ts, run.x
    ds: list[Tensor] = []
    for i in run.steps(progress, "lms"):
        s = ts[i]
        denoised = run.D(x, s, i)
        xc = run.up(x)
        ds.append(_to_d(xc, s, denoised))
        if len(ds) > order:
            ds.pop(0)
        coeffs = lms_coefficients(ts, i, min(i + 1, order))
        xc = xc + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        x = run.out(xc)
        run.emit(i, x, denoised)
    return run.finish(x, return_info)


# --- DPM-Solver++ -------------------------------------------------------------------------------


@torch.no_grad()
def dpmpp_2s_ancestral(
    denoiser: Denoiser,
    noise: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    generator: Generator = None,
    callback: Callback = None,
    extra_args: Mapping[str, Any] | None = None,
    return_info: bool = False,
    check_finite: bool = True,
    progress: bool = False,
):
    """Ancestral sampling with DPM-Solver++(2S) steps (Lu et al. 2022b, Alg. 1 with r = ½;
    k-diffusion ``sample_dpmpp_2s_ancestral``).

    From λ = −log σ_i to λ_down = −log σ_down (h = λ_down − λ, s = λ + h/2):
    u = (σ_s/σ_i)·x − expm1(−h/2)·D̂, x ← (σ_down/σ_i)·x − expm1(−h)·D(u; σ_s), then
    + s_noise·σ_up·ε. Euler when σ_down = 0. η = 0 is the deterministic DPM-Solver++(2S).
    NFE = 2N − 1 on a grid ending at 0. Noise: one ``randn_like(x)`` per step with σ_up > 0, after
    the step's denoiser calls.
    """
    _check_noise_args(eta, s_noise)
    run = _Run(denoiser, noise, sigmas, extra_args, check_finite, callback)
    ts, x = run.ts, run.x
    for i in run.steps(progress, "dpmpp_2s_ancestral"):
        s, s_next = ts[i], ts[i + 1]
        denoised = run.D(x, s, i)
        s_down, s_up = ancestral_step(s, s_next, eta)
        xc = run.up(x)
        if s_down == 0:
            xc = xc + _to_d(xc, s, denoised) * (s_down - s)
        else:
            lam, lam_next = -math.log(s), -math.log(s_down)
            h = lam_next - lam
            s_mid = math.exp(-(lam + 0.5 * h))
            x_2 = (s_mid / s) * xc - math.expm1(-0.5 * h) * denoised
            denoised_2 = run.D(x_2, s_mid, i)
            xc = (math.exp(-lam_next) / s) * xc - math.expm1(-h) * denoised_2
        if s_next > 0 and s_up > 0:
            xc = xc + run.up(randn_like(x, generator)) * s_noise * s_up
        x = run.out(xc)
        run.emit(i, x, denoised)
    return run.finish(x, return_info)


@torch.no_grad()
def dpmpp_sde(
    denoiser: Denoiser,
    noise: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
    generator: Generator = None,
    callback: Callback = None,
    extra_args: Mapping[str, Any] | None = None,
    return_info: bool = False,
    check_finite: bool = True,
    progress: bool = False,
):
    """DPM-Solver++ (stochastic, 2 stages) of k-diffusion (``sample_dpmpp_sde``).

    Step from λ = −log σ_i to λ_{i+1}, h = λ_{i+1} − λ, s = λ + r·h, stage point σ_s = e^{−s}:
    stage 1, an ancestral DPM-Solver++(1) step to σ_s (``ancestral_step(σ_i, σ_s, η)``) plus
    noise z₁; stage 2, from x_i to σ_{i+1} with D̂_d = (1 − 1/2r)·D̂ + 1/2r·D(x₂; σ_s) (the
    DPM-Solver++(2S) combination, Lu et al. 2022b eq. 10 form), plus noise z₂. Euler on the step
    to σ = 0. η = 0 is deterministic (second order). NFE = 2N − 1 on a grid ending at 0.

    Noise. k-diffusion's default noise is a Brownian tree W(σ) (torchsde) read as
    z₁ = (W(σ_s) − W(σ_i))/√(σ_i − σ_s) and z₂ = (W(σ_{i+1}) − W(σ_i))/√(σ_i − σ_{i+1}): the
    two overlap, Corr(z₁, z₂) = √((σ_i − σ_s)/(σ_i − σ_{i+1})). vdmpp draws the two independent
    increments instead of a tree: e₁ = ``randn_like(x)`` before the stage-2 denoiser call,
    z₁ = e₁, and e₂ = ``randn_like(x)`` after it, z₂ = (√(σ_i − σ_s)·e₁ + √(σ_s − σ_{i+1})·e₂)
    /√(σ_i − σ_{i+1}) — the same joint law as k-diffusion's default, so the same sampler in
    distribution; the tree's other property (one seed gives similar images at different step
    counts) is not reproduced. Bitwise parity holds with a k-diffusion ``noise_sampler`` that
    returns these z₁, z₂. Draws happen only when η > 0.
    """
    _check_noise_args(eta, s_noise)
    if not 0 < r <= 1:
        raise ValueError(f"dpmpp_sde r must be in (0, 1], got {r}")
    run = _Run(denoiser, noise, sigmas, extra_args, check_finite, callback)
    ts, x = run.ts, run.x
    fac = 1.0 / (2.0 * r)
    for i in run.steps(progress, "dpmpp_sde"):
        s, s_next = ts[i], ts[i + 1]
        denoised = run.D(x, s, i)
        xc = run.up(x)
        if s_next == 0:
            xc = xc + _to_d(xc, s, denoised) * (s_next - s)
        else:
            lam, lam_next = -math.log(s), -math.log(s_next)
            h = lam_next - lam
            s_mid = math.exp(-(lam + h * r))
            # stage 1
            sd, su = ancestral_step(s, s_mid, eta)
            lam_ = -math.log(sd)
            x_2 = (math.exp(-lam_) / s) * xc - math.expm1(lam - lam_) * denoised
            e1 = None
            if su > 0:
                e1 = run.up(randn_like(x, generator))
                x_2 = x_2 + e1 * s_noise * su
            denoised_2 = run.D(x_2, s_mid, i)
            # stage 2
            sd, su = ancestral_step(s, s_next, eta)
            lam_ = -math.log(sd)
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            xc = (math.exp(-lam_) / s) * xc - math.expm1(lam - lam_) * denoised_d
            if su > 0:
                e2 = run.up(randn_like(x, generator))
                a, b = math.sqrt(s - s_mid), math.sqrt(s_mid - s_next)
                z2 = (a * e1 + b * e2) / math.sqrt(s - s_next) if e1 is not None else e2
                xc = xc + z2 * s_noise * su
        x = run.out(xc)
        run.emit(i, x, denoised)
    return run.finish(x, return_info)


@torch.no_grad()
def dpmpp_2m(
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
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2; k-diffusion ``sample_dpmpp_2m``).

    x_{i+1} = (σ_{i+1}/σ_i)·x_i − expm1(−h)·D̂_d, h = λ_{i+1} − λ_i, with
    D̂_d = (1 + 1/2r)·D̂_i − 1/2r·D̂_{i−1}, r = h_{i−1}/h; the first step, and the step to σ = 0
    (whose limit is x = D̂_i), are first order (DDIM). Second order; NFE = N. Deterministic.
    """
    run = _Run(denoiser, noise, sigmas, extra_args, check_finite, callback)
    ts, x = run.ts, run.x
    old = None
    for i in run.steps(progress, "dpmpp_2m"):
        s, s_next = ts[i], ts[i + 1]
        denoised = run.D(x, s, i)
        if s_next == 0:
            xc = denoised
        else:
            h = math.log(s) - math.log(s_next)
            d = denoised
            if old is not None:
                r = (math.log(ts[i - 1]) - math.log(s)) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            xc = (s_next / s) * run.up(x) - math.expm1(-h) * d
        old = denoised
        x = run.out(xc)
        run.emit(i, x, denoised)
    return run.finish(x, return_info)


@torch.no_grad()
def dpmpp_2m_sde(
    denoiser: Denoiser,
    noise: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
    generator: Generator = None,
    callback: Callback = None,
    extra_args: Mapping[str, Any] | None = None,
    return_info: bool = False,
    check_finite: bool = True,
    progress: bool = False,
):
    """DPM-Solver++(2M) SDE (Lu et al. 2022b §5 and App. for the SDE solver; k-diffusion
    ``sample_dpmpp_2m_sde``).

    With h = λ_{i+1} − λ_i and ηh: x ← (σ_{i+1}/σ_i)e^{−ηh}·x + (1 − e^{−h−ηh})·D̂_i, plus the
    second-order term in (D̂_i − D̂_{i−1})/r, r = h_{i−1}/h: ``"midpoint"``
    ½(1 − e^{−h−ηh}), ``"heun"`` ((1 − e^{−h−ηh})/(−h−ηh) + 1); then
    + s_noise·σ_{i+1}·√(1 − e^{−2ηh})·ε. The step to σ = 0 is x = D̂. η = 0 with ``"midpoint"`` is
    ``dpmpp_2m``. NFE = N. Noise: one ``randn_like(x)`` after the denoiser call of every step with
    σ_{i+1} > 0 when η > 0 (independent steps: the same law as k-diffusion's Brownian tree, whose
    increments over these disjoint intervals are independent; see ``dpmpp_sde``).
    """
    _check_noise_args(eta, s_noise)
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    run = _Run(denoiser, noise, sigmas, extra_args, check_finite, callback)
    ts, x = run.ts, run.x
    old, h_last = None, None
    for i in run.steps(progress, "dpmpp_2m_sde"):
        s, s_next = ts[i], ts[i + 1]
        denoised = run.D(x, s, i)
        if s_next == 0:
            xc = denoised
        else:
            h = math.log(s) - math.log(s_next)
            eta_h = eta * h
            one_m = -math.expm1(-h - eta_h)
            xc = (s_next / s * math.exp(-eta_h)) * run.up(x) + one_m * denoised
            if old is not None:
                r = h_last / h
                if solver_type == "heun":
                    xc = xc + ((one_m / (-h - eta_h) + 1) * (1 / r)) * (denoised - old)
                else:
                    xc = xc + (0.5 * one_m * (1 / r)) * (denoised - old)
            if eta:
                scale = s_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
                xc = xc + run.up(randn_like(x, generator)) * scale
            h_last = h
        old = denoised
        x = run.out(xc)
        run.emit(i, x, denoised)
    return run.finish(x, return_info)


@torch.no_grad()
def dpmpp_3m_sde(
    denoiser: Denoiser,
    noise: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    generator: Generator = None,
    callback: Callback = None,
    extra_args: Mapping[str, Any] | None = None,
    return_info: bool = False,
    check_finite: bool = True,
    progress: bool = False,
):
    """DPM-Solver++(3M) SDE (k-diffusion ``sample_dpmpp_3m_sde``; η = 0 is the third-order
    multistep DPM-Solver++(3M), Lu et al. 2022b App. B).

    With h_η = (1 + η)h: x ← e^{−h_η}·x + (1 − e^{−h_η})·D̂_i + φ₂·D₁ − φ₃·D₂, where
    φ₂ = expm1(−h_η)/h_η + 1, φ₃ = φ₂/h_η − ½ and D₁, D₂ are the first and second divided
    differences of D̂ over the last three λ's (second order on step 2, first on step 1); then
    + s_noise·σ_{i+1}·√(1 − e^{−2ηh})·ε. The step to σ = 0 is x = D̂. NFE = N. Noise as
    ``dpmpp_2m_sde``.
    """
    _check_noise_args(eta, s_noise)
    run = _Run(denoiser, noise, sigmas, extra_args, check_finite, callback)
    ts, x = run.ts, run.x
    den_1 = den_2 = None
    h_1 = h_2 = None
    for i in run.steps(progress, "dpmpp_3m_sde"):
        s, s_next = ts[i], ts[i + 1]
        denoised = run.D(x, s, i)
        if s_next == 0:
            xc = denoised
        else:
            h = math.log(s) - math.log(s_next)
            h_eta = h * (eta + 1)
            xc = math.exp(-h_eta) * run.up(x) + (-math.expm1(-h_eta)) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - den_1) / r0
                d1_1 = (den_1 - den_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                xc = xc + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                xc = xc + phi_2 * ((denoised - den_1) / (h_1 / h))
            if eta:
                scale = s_next * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
                xc = xc + run.up(randn_like(x, generator)) * scale
            h_1, h_2 = h, h_1
        den_1, den_2 = denoised, den_1
        x = run.out(xc)
        run.emit(i, x, denoised)
    return run.finish(x, return_info)
