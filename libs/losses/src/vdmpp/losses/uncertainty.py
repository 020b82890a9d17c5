"""Learned uncertainty weighting (EDM2: Karras et al. 2024, §5 "Loss weighting", eq. 21).

EDM2 divides the loss at each noise level by a learned e^{u(σ)} and adds u(σ):

    L = E_σ [ w(σ)/e^{u(σ)} · E_{x,n} ‖D(x + n; σ) − x‖² + u(σ) ]                 (EDM2 eq. 21)

For a fixed σ the term l·e^{−u} + u is minimized at u = log l, so at the optimum e^{u(σ)} is the
expected loss at σ and every noise level contributes the same (unit) weighted loss: the weighting
equalizes the loss across noise levels, which a fixed w cannot.

In vdmpp's terms (VDM++ eq. 7) the per-example loss is ℓ = ½·w(λ)/p(λ)·‖ε − ε̂‖² (the sum
over dimensions), and :func:`uncertainty_weighted` returns ℓ·e^{−u(λ)} + u(λ), so the mean over
a batch estimates

    E_{λ∼p} [ ½·w(λ)/p(λ)·e^{−u(λ)}·E‖ε − ε̂‖² + u(λ) ],

the objective of the uncertainty weighting with vdmpp's weightings and schedules. Its minimizer in
u is e^{u(λ)} = E[ℓ | λ] = ½·w(λ)/p(λ)·m(λ), with m(λ) = E[‖ε − ε̂‖² | λ]; so the gradient the
network sees is that of the weighted loss with the *effective* weighting

    w̃(λ) = w(λ)·e^{−u(λ)} = 2·p(λ)/m(λ)      (at the optimum of u).

w cancels: with a learned u the emphasis across noise levels is set by the schedule p(λ) (as in
EDM2, where p_train(σ) then decides it), and each λ's loss is normalized by its own scale m(λ).

Interaction with the adaptive schedule (``vdmpp.schedules.Adaptive``, VDM++ App. F): it bins
the loss *before* u, w(λ)·‖ε − ε̂‖² (``Adaptive.update(logsnr, unweighted)``), and sets
p(λ) ∝ w(λ)·m(λ). Then E[ℓ | λ] = ½·w·m/p is the same for every λ, so u converges to a
constant (the log of half the normalizer ∫w·m dλ) and the effective weighting is
w̃ ∝ p/m ∝ w again: p(λ) equalizes the estimator's loss across λ, which leaves u only a
global scale (invisible to Adam up to ε). What changes with both on is (1) the transient — the
schedule moves with its EMA decay, u with its optimizer — and (2) what w means: without the
adaptive schedule a learned u overrides w (w̃ = 2p/m), with it w is the weighting again. Were
the schedule fed the u-weighted loss w·e^{−u}·‖ε − ε̂‖² instead, every p would be a fixed point
(at the optimum of u that loss is 2p(λ) for any p) and p would no longer follow w; that is why
it takes the loss before u.

EDM2 adds u to every *element* (its loss is per pixel: Σ_i l_i·e^{−u} + D·u), whose minimizer
is the per-dimension mean loss, e^u = ℓ/D; here u is added once per example (ℓ summed over
dimensions), so e^u = E[ℓ | λ] and u's gradient is 1/D of EDM2's for the same ℓ. The
network's gradient is the same up to the constant D.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["LogVarianceMLP", "uncertainty_weighted"]


class LogVarianceMLP(nn.Module):
    """u(λ), EDM2's ``logvar_fourier`` → ``logvar_linear`` head (EDM2 eq. 21, eq. 75).

    Features: magnitude-preserving Fourier features √2·cos(2π f·c + φ) of
    c = c_noise = ln(σ)/4 = −λ/8 (EDM2's noise conditioning, σ = e^{−λ/2}), with ``channels``
    frequencies f ∼ N(0, bandwidth²) and phases φ ∼ U[0, 1) drawn from a generator seeded with
    ``seed`` (buffers, so they checkpoint; the global RNG is not touched). Then, as in EDM2, one
    linear layer to a single channel — or, with ``hidden > 0``, Linear → SiLU → Linear. The
    last layer (weights and bias) is zero-initialized, so u ≡ 0 at the start and the loss is
    unchanged until u learns.

    ``forward(logsnr)`` takes λ of shape [batch] (any float dtype) and returns u of shape
    [batch]; the features are computed in float32 (float64 for float64 λ), then cast to the
    layers' dtype.
    """

    freqs: Tensor
    phases: Tensor

    def __init__(
        self, channels: int = 128, *, hidden: int = 0, bandwidth: float = 1.0, seed: int = 0
    ) -> None:
        super().__init__()
        if channels < 1 or hidden < 0:
            raise ValueError(f"need channels >= 1 and hidden >= 0, got {channels}, {hidden}")
        if not (math.isfinite(bandwidth) and bandwidth > 0):
            raise ValueError(f"bandwidth must be positive, got {bandwidth!r}")
        g = torch.Generator().manual_seed(int(seed))
        freqs = 2.0 * math.pi * bandwidth * torch.randn(channels, generator=g)
        phases = 2.0 * math.pi * torch.rand(channels, generator=g)
        self.register_buffer("freqs", freqs)
        self.register_buffer("phases", phases)
        last = nn.Linear(hidden or channels, 1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(), last) if hidden else last

    def features(self, logsnr: Tensor) -> Tensor:
        """√2·cos(2π f·(−λ/8) + φ), shape [batch, channels] (EDM2 eq. 75)."""
        if logsnr.dim() != 1:
            raise ValueError(f"logsnr must have shape [batch], got {tuple(logsnr.shape)}")
        dtype = torch.float64 if logsnr.dtype == torch.float64 else torch.float32
        c = -logsnr.to(dtype) / 8.0
        arg = torch.outer(c, self.freqs.to(dtype)) + self.phases.to(dtype)
        return arg.cos() * math.sqrt(2.0)

    def forward(self, logsnr: Tensor) -> Tensor:
        """u(λ), shape [batch]."""
        w = next(self.net.parameters())
        return self.net(self.features(logsnr).to(w.dtype)).squeeze(-1)


def uncertainty_weighted(loss: Tensor, u: Tensor) -> Tensor:
    """ℓ·e^{−u} + u per example (EDM2 eq. 21 with vdmpp's ℓ = ½·w(λ)/p(λ)·‖ε − ε̂‖²).

    ``loss`` and ``u`` must have the same shape ([batch]); no broadcasting. Computed in the
    promoted dtype of the two, at least float32 (e^{−u} in bfloat16 loses ~3 digits). The
    minimizer over u of each term is u = log ℓ, with value 1 + log ℓ; see the module docstring
    for what this optimizes and how it interacts with the adaptive schedule.
    """
    if loss.shape != u.shape:
        raise ValueError(
            f"loss and u must have the same shape, got {tuple(loss.shape)} and {tuple(u.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(loss.dtype, u.dtype), torch.float32)
    u = u.to(dtype)
    return loss.to(dtype) * torch.exp(-u) + u
