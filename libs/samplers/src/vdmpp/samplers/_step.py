"""The elementwise part of EDM's samplers (seed 003, Algorithms 1 and 2), and the kernel hook.

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

__all__ = ["churn", "heun_step"]

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


# --- the kernel hook ---------------------------------------------------------------------------

# One shared, cached import of the optional extension (vdmpp.schedules._kernels).
_load_kernels = load_kernels
_reset_kernels_cache = reset_kernels_cache


def _kernels_enabled(x: Tensor, use_kernels: bool | None) -> bool:
    """Should the fused ``vdmpp.kernels`` ops serve this tensor?

    ``use_kernels``: ``False`` → reference; ``True`` → kernels, error if they cannot serve ``x``;
    ``None`` → the environment variable ``VDMPP_KERNELS`` ("0" reference, "1" kernels) if set,
    else automatic: kernels when importable and ``K.can_use("heun_step", x)`` says yes.
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


def _ops(enabled: bool):
    """(churn, heun_step): the fused kernels when enabled, else the references above."""
    if enabled:
        K = _load_kernels()
        return K.churn, K.heun_step  # type: ignore[union-attr]
    return churn, heun_step
