"""The elementwise part of EDM's samplers (EDM, Algorithms 1 and 2), and the kernel hook.

``churn`` and ``heun_step`` are the pure-PyTorch references of the fused ops in
``vdmpp.kernels`` (``vdmpp::heun_step``): same names, same argument order, same semantics. They
are the test oracle for the kernels, and what runs whenever the kernels are absent.

Precision: bf16/fp16 inputs are computed in float32 and the result is cast back to the dtype of
``x`` / ``x_hat``; float32 and float64 inputs are computed in their own dtype (float64 is the
reference-run precision). The σ values are Python floats, so no step reads a device tensor on
the host.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from vdmpp.schedules._kernels import kernels_error, load_kernels, reset_kernels_cache

__all__ = ["all_finite", "churn", "heun_step"]

_HALF = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype


def churn(x: Tensor, noise: Tensor, t: float, t_hat: float, s_noise: float) -> Tensor:
    """Alg. 2 lines 5–6: x̂ = x + √(t̂² − t²)·S_noise·ε, raising the noise level from t to t̂."""
    ct = _compute_dtype(x.dtype)
    scale = math.sqrt(t_hat * t_hat - t * t) * s_noise
    return (x.to(ct) + scale * noise.to(ct)).to(x.dtype)


def heun_step(
    x_hat: Tensor, denoised: Tensor, denoised_next: Tensor | None, t_hat: float, t_next: float
) -> Tensor:
    """One step of Alg. 1/2 from t̂ to t_next given D₁ = D(x̂; t̂) and, optionally, D₂.

    ``denoised_next is None``: the Euler step (line 7 of Alg. 2),
    x_next = x̂ + (t_next − t̂)·d with d = (x̂ − D₁)/t̂.
    Otherwise the 2nd-order correction (line 10), where D₂ = D(x_e; t_next) was evaluated at the
    Euler point x_e: d′ = (x_e − D₂)/t_next and x_next = x̂ + (t_next − t̂)·(½d + ½d′). x_e is
    recomputed here from x̂ and D₁ (bit-identical to the Euler call), so a fused kernel reads
    x̂, D₁, D₂ once and never needs x_e stored.
    """
    ct = _compute_dtype(x_hat.dtype)
    x, d1 = x_hat.to(ct), denoised.to(ct)
    h = t_next - t_hat
    d_cur = (x - d1) / t_hat
    if denoised_next is None:
        out = x + h * d_cur
    else:
        x_e = x + h * d_cur
        d_prime = (x_e - denoised_next.to(ct)) / t_next
        out = x + h * (0.5 * d_cur + 0.5 * d_prime)
    return out.to(x_hat.dtype)


def _euler_parts(
    x_hat: Tensor, denoised: Tensor, t_hat: float, t_next: float
) -> tuple[Tensor, Tensor]:
    """(d, x_e) of the Euler step in the compute dtype: d = (x̂ − D₁)/t̂, x_e = x̂ + h·d."""
    ct = _compute_dtype(x_hat.dtype)
    x = x_hat.to(ct)
    d_cur = (x - denoised.to(ct)) / t_hat
    return d_cur, x + (t_next - t_hat) * d_cur


def _correct_from(
    x_hat: Tensor, d_cur: Tensor, x_e: Tensor, denoised_next: Tensor, t_hat: float, t_next: float
) -> Tensor:
    """The 2nd-order correction from the Euler step's own d and x_e (as NVlabs/edm does).

    Same values as :func:`heun_step` bit for bit (d and x_e are the ones it would recompute;
    scaling by ½ is exact), in 6 in-place passes over one buffer instead of 11 allocating ones.
    """
    ct = d_cur.dtype
    out = x_e.sub(denoised_next.to(ct)).div_(t_next)  # d′ = (x_e − D₂)/t_next
    out.mul_(0.5).add_(d_cur, alpha=0.5)  # ½d′ + ½d  (= ½d + ½d′: both halvings exact)
    out.mul_(t_next - t_hat).add_(x_hat.to(ct))  # x̂ + h·(…)
    return out.to(x_hat.dtype)


def all_finite(t: Tensor) -> bool:
    """Whether every element of ``t`` is finite, with one reduction and one scalar read.

    A sum propagates NaN and ±inf (inf − inf is NaN), so a finite sum proves a finite tensor;
    a non-finite sum is confirmed elementwise (a sum of finite values can overflow), so the
    answer is exactly ``bool(torch.isfinite(t).all())`` at the cost of one vectorised read
    (float16, whose sums overflow at 65504, uses one min/max reduction instead).
    """
    if t.numel() == 0 or not t.is_floating_point():
        return True
    if t.dtype == torch.float16:
        lo, hi = torch.aminmax(t)
        s = lo * 0.0 + hi * 0.0  # 0 iff both are finite, else NaN
    else:
        s = t.sum()
    if math.isfinite(float(s)):
        return True
    return bool(torch.isfinite(t).all())


# --- the kernel hook ---------------------------------------------------------------------------

# One shared, cached import of the optional extension (vdmpp.schedules._kernels).
_load_kernels = load_kernels
_reset_kernels_cache = reset_kernels_cache


def _kernels_enabled(x: Tensor, use_kernels: bool | None) -> bool:
    """Should the fused ``vdmpp.kernels`` ops serve this tensor?

    ``use_kernels``: ``False`` → reference; ``True`` → kernels, error if they cannot serve ``x``;
    ``None`` → the environment variable ``VDMPP_KERNELS`` ("0" reference, "1" kernels) if set,
    else automatic: kernels when importable and ``K.can_use("heun_step", x)`` says yes. This is
    decided once per sampling call from the sample ``x``; each step then still checks its own
    operands (:class:`_Stepper`) and takes the reference for any the kernels cannot serve.
    """
    if use_kernels is None:
        env = os.environ.get("VDMPP_KERNELS", "").strip()
        if env in ("0", "1"):
            use_kernels = env == "1"
    if use_kernels is False:
        return False
    K = _load_kernels()
    ok = K is not None and bool(K.can_use("heun_step", x))
    if use_kernels and not ok:
        why = (
            f"vdmpp.kernels is not importable ({kernels_error()!r})"
            if K is None
            else f"vdmpp.kernels cannot serve a {x.dtype} tensor on {x.device}"
        )
        raise RuntimeError(f"use_kernels=True (or VDMPP_KERNELS=1) but {why}")
    return ok


class _Stepper:
    """The step ops of one sampling call, dispatched per call on *these* tensors.

    With the kernels enabled, every ``churn`` / ``heun_step`` call asks ``K.can_use`` (attribute
    reads, no host sync) whether the fused op serves its operands — same device, float32/bf16,
    one dense layout — and otherwise runs the PyTorch reference for that call, so a denoiser that
    returns a channels_last, float16, float64 or non-contiguous tensor is served, not rejected.
    On CPU both paths give the same bits, so mixing them changes nothing.

    The reference Euler step keeps its d and x_e; the correction that follows with the same x̂,
    D₁ and σ's reuses them (:func:`_correct_from`) instead of re-deriving them.
    """

    __slots__ = ("K", "_euler", "ev", "fused", "second_order")

    def __init__(self, K, ev=None, second_order: bool = True) -> None:
        self.K = K
        self.fused = 0  # calls the fused kernels served
        self._euler: tuple | None = None
        # ev (the sampler's _Evaluator, CPU check_finite): its NaN/inf check of the denoiser
        # outputs is deferred to the result of the step that consumed them (one reduction per
        # step, not per evaluation): the correction, or an Euler step no correction follows.
        self.ev = ev
        self.second_order = second_order
        if ev is not None:
            ev.deferred = True

    def churn(self, x: Tensor, noise: Tensor, t: float, t_hat: float, s_noise: float) -> Tensor:
        K = self.K
        if K is not None and K.can_use("churn", x, noise):
            self.fused += 1
            return K.churn(x, noise, t, t_hat, s_noise)
        return churn(x, noise, t, t_hat, s_noise)

    def heun_step(
        self,
        x_hat: Tensor,
        denoised: Tensor,
        denoised_next: Tensor | None,
        t_hat: float,
        t_next: float,
    ) -> Tensor:
        out = self._step(x_hat, denoised, denoised_next, t_hat, t_next)
        ev = self.ev
        if ev is not None and (
            denoised_next is not None or not self.second_order or t_next == 0
        ):
            ev.check_step(out)  # this step's result covers every output it consumed
        return out

    def _step(self, x_hat, denoised, denoised_next, t_hat, t_next) -> Tensor:
        euler, self._euler = self._euler, None
        K = self.K
        if K is not None and K.can_use("heun_step", x_hat, denoised, denoised_next):
            self.fused += 1
            return K.heun_step(x_hat, denoised, denoised_next, t_hat, t_next)
        if denoised_next is None:
            d_cur, x_e = _euler_parts(x_hat, denoised, t_hat, t_next)
            self._euler = (x_hat, denoised, t_hat, t_next, d_cur, x_e, x_e._version)
            return x_e.to(x_hat.dtype)
        if (
            euler is not None
            and euler[0] is x_hat
            and euler[1] is denoised
            and euler[2] == t_hat
            and euler[3] == t_next
            and euler[5]._version == euler[6]  # nobody wrote into x_e in between
            and t_next != 0
        ):
            return _correct_from(x_hat, euler[4], euler[5], denoised_next, t_hat, t_next)
        return heun_step(x_hat, denoised, denoised_next, t_hat, t_next)


def _ops(enabled: bool, ev=None, second_order: bool = True):
    """(churn, heun_step) for one sampling call: per-call kernel dispatch when ``enabled``
    (see :class:`_Stepper`), else the references (still reusing the Euler intermediate); with
    ``ev`` the denoiser-output checks run once per step on its result."""
    stepper = _Stepper(_load_kernels() if enabled else None, ev, second_order)
    return stepper.churn, stepper.heun_step
