"""The log-likelihood of the probability-flow ODE in EDM's units (Song et al. 2021, §4.3, App. D.2).

The PF-ODE of a denoiser D is dx/dσ = (x − D(x; σ))/σ (EDM eq. 3 with σ(t) = t, s(t) = 1). By the
instantaneous change of variables (Song et al. 2021, App. D.2, eq. 39; Chen et al. 2018),
along its solution

    log p_{σ_min}(x(σ_min)) = log p_{σ_max}(x(σ_max)) + ∫_{σ_min}^{σ_max} ∇·f(x(σ), σ) dσ,

f = (x − D)/σ, so ∇·f = (d − tr ∂D/∂x)/σ for d = dim x. The integral runs in t = log σ, where the
field is x − D and the divergence d − tr ∂D/∂x (the same integral; the step sizes behave better
over EDM's four decades of σ). The prior p_{σ_max} is taken to be N(0, σ_max² I), exact only in
the limit σ_max ≫ the data's scale (the data convolved with N(0, σ_max²) is N(0, σ_max²) only
then), as in Song et al.

What this is the likelihood *of*: the continuous density of x under the model's distribution at
noise level σ_min, i.e. (for an exact denoiser) the data distribution convolved with
N(0, σ_min² I) — not of the data itself. For discrete data (8-bit images), see
:meth:`LogLikelihood.bits_per_dim` and the dequantization note there.

The solver is torchdiffeq's adaptive ``odeint(method="dopri5")`` (Dormand–Prince 5(4)), the
optional ``[likelihood]`` extra: ``pip install 'vdmpp-samplers[likelihood]'``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .denoiser import Denoiser, _counted
from .generators import PerSampleGenerator, randn_like

__all__ = ["DIVERGENCES", "PROBES", "LogLikelihood", "log_likelihood"]

DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")


@dataclass(frozen=True)
class LogLikelihood:
    """What :func:`log_likelihood` returns (all tensors ``[B]`` except ``latent``).

    ``nats``: log p_{σ_min}(x) per example, = ``prior + delta``. ``prior``: log N(x(σ_max); 0,
    σ_max² I). ``delta``: the integrated divergence ∫ ∇·f dσ (Hutchinson: its estimate for the
    drawn probe). ``latent``: x(σ_max), the ODE's end point, shaped like x. ``nfe``: denoiser
    evaluations made (a :func:`~vdmpp.samplers.guided` denoiser counts its own; the exact
    divergence adds d backward passes per evaluation, Hutchinson one). ``dims``: d = x[0].numel().
    """

    nats: Tensor
    prior: Tensor
    delta: Tensor
    latent: Tensor
    nfe: int
    dims: int

    def bits_per_dim(self, bin_width: float | None = None) -> Tensor:
        """−log₂ of the density per dimension, with the quantization bins of discrete data.

        ``bin_width=None``: −nats/(d ln 2), the continuous density's bits/dim. For n-bit data
        dequantized uniformly into bins of width Δ in the model's units, the probability of a
        bin is P(k) = Δ^d·E_u[p(k + u)] ≥ Δ^d·exp(E_u[log p(k + u)]) (Jensen; Theis et al. 2016),
        so bits/dim = −(nats + d·log Δ)/(d ln 2) = −nats/(d ln 2) + log₂(1/Δ), with ``nats`` of
        the dequantized k + u, is in expectation over u an upper bound on −log₂ P(k)/d.

        Conventions: vdmpp's 8-bit data x = k/127.5 − 1 (VDM's discretized decoder,
        ``vdmpp.losses.bits_per_dim``) has Δ = 2/255 (adds log₂ 127.5 ≈ 6.994 bits);
        score-SDE's x = 2(k + u)/256 − 1 has Δ = 2/256 (adds 7 bits). Drawing u (uniform
        dequantization) or a learned q(u|x) (variational dequantization, Song et al. 2021
        App. D.2; Kingma et al. 2021) is the caller's job (``vdmpp-eval bpd --method ode``), as
        is averaging over examples.
        """
        bpd = -self.nats / (self.dims * math.log(2.0))
        if bin_width is None:
            return bpd
        if not (isinstance(bin_width, (int, float)) and 0 < bin_width < math.inf):
            raise ValueError(f"bin_width must be a positive number, got {bin_width!r}")
        return bpd - math.log2(bin_width)


def _odeint() -> Any:
    try:
        from torchdiffeq import odeint
    except ImportError as e:
        raise ImportError(
            "log_likelihood needs torchdiffeq, the optional [likelihood] extra of vdmpp-samplers: "
            "pip install 'vdmpp-samplers[likelihood]' (or: pip install torchdiffeq)"
        ) from e
    return odeint


def _positive(name: str, v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {v!r}") from None
    if not (0 < f < math.inf):
        raise ValueError(f"{name} must be positive and finite, got {v!r}")
    return f


def _trace(d: Tensor, x: Tensor, probe: Tensor | None) -> Tensor:
    """tr ∂D/∂x per example: exactly (one backward pass per dimension), or Hutchinson's
    εᵀ(∂D/∂x)ε (one vector-Jacobian product). Assumes example b of D depends on x_b only."""
    if not d.requires_grad:
        raise RuntimeError(
            "log_likelihood needs the gradient of the denoiser's output with respect to x, but "
            "the output does not require grad (does the denoiser run under torch.no_grad() or "
            "detach its output?)"
        )
    b = x.shape[0]
    if probe is not None:
        (g,) = torch.autograd.grad(d, x, grad_outputs=probe, allow_unused=True)
        return (
            torch.zeros(b, dtype=d.dtype, device=d.device)
            if g is None
            else (g * probe).reshape(b, -1).sum(1)
        )
    flat = d.reshape(b, -1)
    n = flat.shape[1]
    tr = torch.zeros(b, dtype=d.dtype, device=d.device)
    for j in range(n):
        (g,) = torch.autograd.grad(flat[:, j].sum(), x, retain_graph=j < n - 1, allow_unused=True)
        if g is not None:
            tr = tr + g.reshape(b, -1)[:, j]
    return tr


def log_likelihood(
    denoiser: Denoiser,
    x: Tensor,
    *,
    sigma_min: float,
    sigma_max: float,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    divergence: str = "exact",
    probe: str = "rademacher",
    generator: torch.Generator | PerSampleGenerator | None = None,
    extra_args: Mapping[str, Any] | None = None,
) -> LogLikelihood:
    """log p_{σ_min}(x) in nats per example by the probability-flow ODE (see the module).

    Integrates dx/dlog σ = x − D(x; σ) from x at ``sigma_min`` to ``sigma_max`` with torchdiffeq's
    dopri5 (``rtol``, ``atol``: its tolerances, on x and on the accumulated divergence; one step
    size for the whole batch), accumulating d − tr ∂D/∂x, and adds the prior
    log N(x(σ_max); 0, σ_max² I). The result is the log-density of x under the model's
    distribution at noise level σ_min (the data convolved with N(0, σ_min² I) for an exact
    denoiser), not of x itself; see :meth:`LogLikelihood.bits_per_dim` for discrete data.

    ``divergence="exact"``: tr ∂D/∂x by d backward passes per evaluation (small d);
    ``"hutchinson"``: εᵀ(∂D/∂x)ε with one probe ε per example, ``probe="rademacher"`` (±1) or
    ``"gaussian"``, drawn once from ``generator`` (a ``torch.Generator``, a
    :class:`PerSampleGenerator` or None for torch's RNG) and fixed for the whole integration,
    so the field is a smooth function the adaptive solver can follow; the estimate is unbiased
    and its mean over repeats converges to the exact value. ``extra_args``: keyword arguments
    for every denoiser call (``{"class_labels": y}``). The denoiser is called with σ as a ``[B]``
    tensor in float32 (float64 for float64 x) and must be differentiable in x and act on each
    example independently. Each evaluation reads the solver's time on the host (the adaptive
    solver synchronizes on every step anyway).

    Returns a :class:`LogLikelihood` (``.nats``, ``.nfe``, ``.prior``, ``.delta``, ``.latent``).
    Raises ValueError for σ_min ≥ σ_max, non-positive σ's or tolerances, an unknown
    ``divergence`` or ``probe``; ImportError naming the ``[likelihood]`` extra without torchdiffeq.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"x must have a non-empty leading batch dimension, got {tuple(x.shape)}")
    s_min, s_max = _positive("sigma_min", sigma_min), _positive("sigma_max", sigma_max)
    if not s_min < s_max:
        raise ValueError(
            f"need sigma_min < sigma_max, got sigma_min={s_min:g}, sigma_max={s_max:g}"
        )
    rtol, atol = _positive("rtol", rtol), _positive("atol", atol)
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; expected one of {PROBES}")
    odeint = _odeint()

    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    b, dims = x.shape[0], x[0].numel()
    x0 = x.detach().to(ct)
    kwargs = dict(extra_args or {})
    eps = None
    if divergence == "hutchinson":
        eps = randn_like(x0, generator)
        if probe == "rademacher":
            eps = torch.where(eps >= 0, 1.0, -1.0).to(ct)
    nfe = 0

    def field(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        nonlocal nfe
        sv = math.exp(float(t))
        sigma = torch.full((b,), sv, dtype=ct, device=x0.device)
        with torch.enable_grad():
            xi = state[0].detach().requires_grad_(True)
            d, n = _counted(denoiser, xi, sigma, kwargs, sv)
            nfe += n
            if not isinstance(d, Tensor) or d.shape != xi.shape:
                got = tuple(d.shape) if isinstance(d, Tensor) else type(d).__name__
                raise ValueError(f"denoiser returned {got} for an input of shape {tuple(xi.shape)}")
            d = d.to(ct)
            tr = _trace(d, xi, eps)
        return state[0] - d.detach(), dims - tr.detach()

    t = torch.tensor([math.log(s_min), math.log(s_max)], dtype=ct, device=x0.device)
    state0 = (x0, torch.zeros(b, dtype=ct, device=x0.device))
    with torch.no_grad():
        xs, deltas = odeint(field, state0, t, rtol=rtol, atol=atol, method="dopri5")
    latent, delta = xs[-1], deltas[-1]
    flat = latent.reshape(b, -1)
    prior = -0.5 * dims * math.log(2 * math.pi * s_max**2) - (flat * flat).sum(1) / (2 * s_max**2)
    nats = prior + delta
    if not bool(torch.isfinite(nats).all()):
        raise FloatingPointError(
            "log_likelihood: the ODE solution became NaN/inf (non-finite denoiser outputs?)"
        )
    return LogLikelihood(nats=nats, prior=prior, delta=delta, latent=latent, nfe=nfe, dims=dims)
