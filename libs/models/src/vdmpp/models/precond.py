"""EDM preconditioning (Karras et al. 2022, EDM Table 1 and eq. 7) and plain eps/v/x heads.

Units. `z` is a sample of the process the model was built for:

* VP (default): z = α x + σ ε with α² = sigmoid(λ), σ² = sigmoid(−λ);
* VE: z = x + σ ε with σ = e^{−λ/2} (this is EDM's x at noise level σ).

EDM works in VE units: x_edm = z/α, σ_edm = e^{−λ/2} (EDM eq. 4 with s = α; VDM++
App. E.2/E.4). Its denoiser is D(x_edm; σ) = c_skip(σ)·x_edm + c_out(σ)·F(c_in(σ)·x_edm; c_noise(σ))
with (EDM Table 1, σ_d = sigma_data)

    c_skip = σ_d² / (σ² + σ_d²)        c_out = σ·σ_d / √(σ² + σ_d²)
    c_in   = 1 / √(σ² + σ_d²)          c_noise = ¼ ln σ = −λ/8.

In λ (σ² = e^{−λ}): c_skip = sigmoid(λ + ln σ_d²), c_in = (e^{−λ} + σ_d²)^{−1/2}. Feeding the
network c_in·x_edm = c_in·z/α and simplifying with α² e^{−λ} = σ_vp² gives, for any process,

    network input = z / √(σ_p² + α_p² σ_d²)          (σ_p, α_p: the process's σ, α)

which is finite in float32 for λ ∈ [−30, 30] (no division by a vanishing α). The eps/v/x heads
use the same input scaling with σ_d = 1, which for VP is the identity (σ² + α² = 1) and for VE
turns z into the VP sample with the same λ. Every network receives λ itself; its embedding
applies c_noise(λ) = −λ/8 (`vdmpp.models.embeddings`), so c_noise is the same for all heads.

Output. `Preconditioned.forward` returns the prediction named by `parameterization`, in the
units the losses library expects:

* "edm": F̂, the raw network output of eq. 7, whose regression target is
  (x − c_skip·x_edm)/c_out (EDM eq. 8, VDM++ eq. 119–120 with x_edm = z/α);
* "eps": ε̂;   "x": x̂;   "v": v̂ with v = α ε − σ x (the process's α, σ; VDM++ App. D.2).

`Preconditioned.denoise` returns x̂ (data units, = EDM's D(x_edm; σ)) for every parameterization.

Note on VDM++ eq. 119: the text writes the skip term as c_skip·α·z; with z = α x + σ ε the
consistent form is c_skip·z/α (= c_skip·x_edm, EDM eq. 4), used here and checked by tests.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vdmpp.schedules import NETWORK_HEADS, PROCESSES, edm_coefficients_logsnr, ve, vp

__all__ = [
    "PARAMETERIZATIONS",
    "PROCESSES",
    "Preconditioned",
    "edm_coefficients",
    "edm_coefficients_logsnr",
]

PARAMETERIZATIONS = NETWORK_HEADS  # vdmpp.schedules: the one list every package reads


def _upcast(x: Tensor) -> Tensor:
    """Compute in at least float32 (float64 stays float64; bf16/fp16 are upcast)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def edm_coefficients(
    sigma: Tensor, sigma_data: float = 0.5
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) of EDM Table 1 at EDM noise level σ, as written there."""
    s2, d2 = sigma**2, sigma_data**2
    c_skip = d2 / (s2 + d2)
    c_out = sigma * sigma_data / torch.sqrt(s2 + d2)
    c_in = 1.0 / torch.sqrt(s2 + d2)
    c_noise = 0.25 * torch.log(sigma)
    return c_skip, c_out, c_in, c_noise


def _process_alpha_sigma(logsnr: Tensor, process: str) -> tuple[Tensor, Tensor]:
    """(α, σ) of the process at λ, in at least float32 (vdmpp.schedules' ``vp``/``ve``)."""
    return (vp if process == "vp" else ve)(_upcast(logsnr))


def _bcast(c: Tensor, like: Tensor) -> Tensor:
    return c.reshape(-1, *([1] * (like.ndim - 1)))


class Preconditioned(nn.Module):
    """Wrap a λ-conditioned network with EDM preconditioning or a plain eps/v/x head.

    Called as `model(z, logsnr, class_labels=None)` with z in `process` units ("vp" or "ve");
    returns the prediction named by `parameterization` (see the module docstring for units).
    `denoise(z, logsnr, class_labels=None)` returns x̂ in data units for every parameterization.
    """

    def __init__(
        self,
        net: nn.Module,
        parameterization: str,
        sigma_data: float = 0.5,
        process: str = "vp",
    ) -> None:
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"unknown parameterization {parameterization!r}; "
                f"expected one of {PARAMETERIZATIONS}"
            )
        if process not in PROCESSES:
            raise ValueError(f"unknown process {process!r}; expected one of {PROCESSES}")
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        self.net = net
        self.parameterization = parameterization
        self.sigma_data = float(sigma_data)
        self.process = process

    def extra_repr(self) -> str:
        return (
            f"parameterization={self.parameterization!r}, sigma_data={self.sigma_data}, "
            f"process={self.process!r}"
        )

    def _logsnr(self, z: Tensor, logsnr: Tensor) -> Tensor:
        if logsnr.ndim == 0:
            logsnr = logsnr.expand(z.shape[0])
        if logsnr.shape != (z.shape[0],):
            raise ValueError(
                f"logsnr must have shape [batch] = [{z.shape[0]}], got {tuple(logsnr.shape)}"
            )
        return logsnr

    def input_scale(self, logsnr: Tensor) -> Tensor:
        """Factor the network input z is multiplied by: 1/√(σ_p² + α_p²·σ_d²) (= c_in/α_p)."""
        alpha, sigma = _process_alpha_sigma(logsnr, self.process)
        d = self.sigma_data if self.parameterization == "edm" else 1.0
        return torch.rsqrt(sigma**2 + (alpha * d) ** 2)

    def forward(self, z: Tensor, logsnr: Tensor, class_labels: Tensor | None = None) -> Tensor:
        logsnr = self._logsnr(z, logsnr)
        z_in = (_upcast(z) * _bcast(self.input_scale(logsnr), z)).to(z.dtype)
        return self.net(z_in, logsnr, class_labels).to(z.dtype)

    def denoise(self, z: Tensor, logsnr: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """x̂ in data units (EDM's D(x_edm; σ) with x_edm = z/α), from any parameterization."""
        logsnr = self._logsnr(z, logsnr)
        out = _upcast(self(z, logsnr, class_labels))
        alpha, sigma = (_bcast(c, z) for c in _process_alpha_sigma(logsnr, self.process))
        zf = _upcast(z)
        if self.parameterization == "edm":
            c_skip, c_out, _, _ = edm_coefficients_logsnr(logsnr, self.sigma_data)
            x_hat = _bcast(c_skip, z) * zf / alpha + _bcast(c_out, z) * out
        elif self.parameterization == "eps":
            x_hat = (zf - sigma * out) / alpha
        elif self.parameterization == "x":
            x_hat = out
        else:  # v = α ε − σ x  ⇒  α z − σ v = (α² + σ²) x
            x_hat = (alpha * zf - sigma * out) / (alpha**2 + sigma**2)
        return x_hat.to(z.dtype)
