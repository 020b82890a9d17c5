"""Forward-process conversions between log-SNR λ, (α, σ) and EDM's σ.

This module is the one home of every λ ↔ σ ↔ α formula in vdmpp (DESIGN.md, "One coordinate").

* VP (variance preserving, VDM++ eq. 1–2, VDM App. J): α² = sigmoid(λ), σ² = sigmoid(−λ),
  so α² + σ² = 1 and λ = log(α²/σ²).
* VE (variance exploding, EDM's units, EDM eq. 1 with s(t) = 1): α = 1, σ = e^{−λ/2}.

All functions are written with log-sigmoid / softplus / expm1 so that they stay finite and
accurate in float32 and bfloat16 over λ ∈ [−30, 30] (and beyond); half-precision inputs are
computed in float32 and cast back.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = [
    "NETWORK_HEADS",
    "PARAMETERIZATIONS",
    "PROCESSES",
    "edm_coefficients_logsnr",
    "logsnr_from_alpha_sigma",
    "logsnr_from_sigma",
    "sigma_from_logsnr",
    "ve",
    "vp",
    "vp_transition",
]

# The one list of each family of names that every vdmpp package reads (DESIGN.md "One coordinate").
PROCESSES = ("vp", "ve")
"""Forward processes: variance preserving (VDM++ eq. 1–2) and variance exploding (EDM eq. 1)."""
PARAMETERIZATIONS = ("eps", "x", "v", "score", "edm", "flow")
"""What a network output can stand for (VDM++ App. E.2, D.2, D.3; EDM's F is ``edm``)."""
NETWORK_HEADS = ("edm", "eps", "v", "x")
"""The parameterizations a network is trained as (a ``score`` head is ``eps`` up to −1/σ, a
``flow`` head is ``v`` up to a λ-dependent scale)."""


def _upcast(x: Tensor) -> Tensor:
    """Compute in at least float32 (bf16/fp16 have too few mantissa bits for exp/log chains)."""
    if not x.is_floating_point():
        return x.to(torch.get_default_dtype())
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def vp(logsnr: Tensor) -> tuple[Tensor, Tensor]:
    """VP process: (α, σ) = (√sigmoid(λ), √sigmoid(−λ)) via log-sigmoid (VDM App. J)."""
    lam = _upcast(logsnr)
    alpha = torch.exp(0.5 * F.logsigmoid(lam))
    sigma = torch.exp(0.5 * F.logsigmoid(-lam))
    return alpha.to(logsnr.dtype), sigma.to(logsnr.dtype)


def ve(logsnr: Tensor) -> tuple[Tensor, Tensor]:
    """VE process in EDM units: (α, σ) = (1, e^{−λ/2}) (EDM Table 1, "VE")."""
    sigma = sigma_from_logsnr(logsnr)
    return torch.ones_like(sigma), sigma


def sigma_from_logsnr(logsnr: Tensor) -> Tensor:
    """EDM's noise level σ = e^{−λ/2} (λ = −2 log σ, x = data + σ·n)."""
    return torch.exp(-0.5 * _upcast(logsnr)).to(logsnr.dtype)


def logsnr_from_sigma(sigma: Tensor) -> Tensor:
    """λ = −2 log σ for EDM's σ (inverse of :func:`sigma_from_logsnr`; σ = 0 gives +inf)."""
    return (-2.0 * torch.log(_upcast(sigma))).to(sigma.dtype)


def logsnr_from_alpha_sigma(alpha: Tensor, sigma: Tensor) -> Tensor:
    """λ = log(α²/σ²) for any process (VDM++ eq. 2)."""
    return (2.0 * (torch.log(_upcast(alpha)) - torch.log(_upcast(sigma)))).to(alpha.dtype)


def vp_transition(logsnr_s: Tensor, logsnr_t: Tensor) -> tuple[Tensor, Tensor]:
    """q(z_t | z_s) of the VP process for λ_t < λ_s: returns (α_{t|s}, σ²_{t|s}).

    α_{t|s} = α_t/α_s and σ²_{t|s} = σ²_t − α²_{t|s}σ²_s. With γ = −λ (VDM App. J, eq. 63):
    σ²_{t|s} = −expm1(softplus(γ_s) − softplus(γ_t)), which avoids the cancellation 1 − (≈1).
    """
    ls, lt = _upcast(logsnr_s), _upcast(logsnr_t)
    log_alpha_ts = 0.5 * (F.logsigmoid(lt) - F.logsigmoid(ls))
    sigma2_ts = -torch.expm1(F.softplus(-ls) - F.softplus(-lt))
    return torch.exp(log_alpha_ts).to(logsnr_t.dtype), sigma2_ts.to(logsnr_t.dtype)


def edm_coefficients_logsnr(
    logsnr: Tensor, sigma_data: float = 0.5
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM's (c_skip, c_out, c_in, c_noise) (EDM Table 1) at σ = e^{−λ/2}, in λ.

    c_skip = σ_d²/(σ² + σ_d²) = sigmoid(λ + log σ_d²), c_in = (e^{−λ} + σ_d²)^{−1/2},
    c_out = σσ_d·c_in, c_noise = ¼ ln σ = −λ/8; log-space, finite in float32 for |λ| ≤ 30
    (half precision is computed in float32).
    """
    lam = _upcast(logsnr)
    log_d2 = 2.0 * math.log(sigma_data)
    c_skip = torch.sigmoid(lam + log_d2)
    log_s2_plus_d2 = torch.logaddexp(-lam, torch.full_like(lam, log_d2))
    c_in = torch.exp(-0.5 * log_s2_plus_d2)
    c_out = torch.exp(-0.5 * lam + math.log(sigma_data) - 0.5 * log_s2_plus_d2)
    c_noise = -0.125 * lam
    return c_skip, c_out, c_in, c_noise
