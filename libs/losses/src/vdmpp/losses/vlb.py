"""VDM's variational bound in bits per dimension (VDM App. E, J; VDM Sec. 2.5–4).

−log p(x) ≤ VLB(x) = D_KL(q(z₁|x) ‖ p(z₁))  [prior, at λ_min]
                   + E_{q(z₀|x)}[−log p(x|z₀)]  [reconstruction, at λ_max]
                   + L_T(x)                      [diffusion loss]

All terms are per example, in nats, with ‖·‖² summed over dimensions; :func:`bits_per_dim`
divides by D·ln 2. The data are n-bit values on the grid v_k = −1 + 2k/(2ⁿ − 1), k = 0 … 2ⁿ − 1
(8-bit images mapped by x = u/127.5 − 1).

* Continuous time (T → ∞, VDM eq. 53–54): L_∞ = ½∫_{λ_min}^{λ_max} E_ε‖ε − ε̂‖² dλ, the
  weighted loss with w = 1, estimated with the schedule as importance distribution.
* Discrete time with T steps (VDM eq. 48–51): with s = (i − 1)/T, t = i/T,
  L_T = ½ Σ_i (SNR(s) − SNR(t))‖x − x̂(z_t)‖² = ½ Σ_i expm1(λ_s − λ_t)‖ε − ε̂(z_t)‖² (since
  ‖x − x̂‖² = e^{−λ_t}‖ε − ε̂‖²), estimated as T/2·expm1(λ_s − λ_t)‖ε − ε̂‖² at one random i.
  For a model whose error decreases with λ it is an upper Riemann sum of L_∞, so L_T ≥ L_∞ and
  L_{2T} ≤ L_T (VDM Sec. 3, VDM App. F).
* A timestep-conditioned model on a DDPM table ᾱ_0 … ᾱ_{T−1} (:func:`bits_per_dim_discrete`): the
  same bound with the table's own T latents, λ_i = log(ᾱ_i/(1 − ᾱ_i)): prior at λ_{T−1},
  reconstruction at λ_0 and the T − 1 transitions between consecutive entries (VDM eq. 48–51).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.nn import functional as F

from vdmpp.schedules import low_discrepancy, sigma_from_logsnr, vp

from . import parameterizations as P
from .weighted import Model, WeightedLoss
from .weightings import ELBO

__all__ = [
    "DiscreteTimeModel",
    "TimestepModel",
    "VLBTerms",
    "bits_per_dim",
    "bits_per_dim_discrete",
    "diffusion_loss",
    "diffusion_loss_discrete",
    "diffusion_loss_timesteps",
    "discrete_logsnr",
    "grid_index",
    "prior_kl",
    "reconstruction_loss",
]


class VLBTerms(NamedTuple):
    """Per-example terms of the bound, each of shape [batch] (nats or bits/dim, as returned)."""

    prior: Tensor
    reconstruction: Tensor
    diffusion: Tensor
    total: Tensor


def _lam_like(logsnr: Tensor | float, x: Tensor) -> Tensor:
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if isinstance(logsnr, Tensor):
        return logsnr.to(device=x.device, dtype=dtype)
    return torch.tensor(float(logsnr), device=x.device, dtype=dtype)


def _noise_for(
    x: Tensor, noise: Tensor | None, generator: torch.Generator | None, dtype: torch.dtype
) -> Tensor:
    """ε for x: the given one (checked against x's shape) or a draw from ``generator``."""
    if noise is None:
        gen_device = generator.device if generator is not None else x.device
        noise = torch.randn(x.shape, generator=generator, device=gen_device, dtype=dtype)
    elif noise.shape != x.shape:
        raise ValueError(f"noise must have x's shape {tuple(x.shape)}, got {tuple(noise.shape)}")
    return noise.to(device=x.device, dtype=dtype)


def _sum_dims(v: Tensor) -> Tensor:
    return v.reshape(v.shape[0], -1).sum(dim=1)


def prior_kl(x: Tensor, logsnr_min: Tensor | float, *, process: str = "vp") -> Tensor:
    """D_KL(q(z₁|x) ‖ p(z₁)) per example (nats).

    VP: p(z₁) = N(0, I), q = N(α₁x, σ₁²I): ½Σ(α₁²x² + σ₁² − 1 − log σ₁²) = ½Σ(α₁²(x² − 1) +
    softplus(λ_min)), using 1 − σ² = α² and −log σ² = softplus(λ) (no cancellation).
    VE: p(z₁) = N(0, e^{−λ_min}I) (VDM++ eq. 107), q = N(x, e^{−λ_min}I): ½e^{λ_min}Σx².
    """
    P.check_process(process)
    lam = _lam_like(logsnr_min, x)
    xf = x.to(lam.dtype)
    if process == "ve":
        return 0.5 * torch.exp(lam) * _sum_dims(xf.square())
    alpha2 = torch.sigmoid(lam)
    return 0.5 * _sum_dims(alpha2 * (xf.square() - 1.0) + F.softplus(lam))


def _check_bits(bits: int) -> int:
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an int in [1, 16], got {bits!r}")
    return bits


def grid_index(x: Tensor, bits: int = 8) -> Tensor:
    """Index k of each value on the n-bit grid v_k = −1 + 2k/(2ⁿ − 1); error if x is off-grid."""
    k_max = 2 ** _check_bits(bits) - 1
    u = (x.double() + 1.0) * (0.5 * k_max)
    k = torch.round(u)
    bad = ((u - k).abs() > 1e-3) | (k < 0) | (k > k_max)
    if bool(bad.any()):
        raise ValueError(
            f"x must hold {bits}-bit values on the grid -1 + 2k/{k_max} (e.g. u/127.5 - 1 for "
            f"8 bits); got values such as {x[bad][:3].tolist()}"
        )
    return k.long()


def reconstruction_loss(
    x: Tensor,
    logsnr_max: Tensor | float,
    *,
    bits: int = 8,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """E_{q(z₀|x)}[−log p(x|z₀)] per example (nats), one draw of z₀ (VDM Sec. 2.3).

    The decoder factorises over dimensions and inverts q with a uniform prior over the 2ⁿ values
    (VDM's discretized Gaussian): p(x_i|z₀) = N(z̃_i; v_{x_i}, s²)/Σ_k N(z̃_i; v_k, s²), where
    z̃ = z₀/α₀ = x + sε and s = e^{−λ_max/2} (the same for VP and VE). The sum over k is exact:
    only grid points within 8s (plus one) of z̃ are summed, the rest add < e^{−32} relative.
    """
    k_max = 2 ** _check_bits(bits) - 1
    idx = grid_index(x, bits)
    lam = _lam_like(logsnr_max, x)
    dtype = lam.dtype
    noise = _noise_for(x, noise, generator, dtype)
    s = sigma_from_logsnr(lam)
    delta = 2.0 / k_max
    xf = -1.0 + delta * idx.to(dtype)
    zt = xf + s * noise
    width = math.ceil(8.0 * float(s.detach()) / delta) + 1
    if 2 * width + 1 >= k_max + 1:
        ks = torch.arange(k_max + 1, device=x.device).expand(*x.shape, k_max + 1)
    else:
        center = torch.round((zt + 1.0) / delta).clamp(0, k_max).long()
        ks = center.unsqueeze(-1) + torch.arange(-width, width + 1, device=x.device)
    valid = (ks >= 0) & (ks <= k_max)
    vk = -1.0 + delta * ks.to(dtype)
    logits = -0.5 * ((zt.unsqueeze(-1) - vk) / s).square()
    logits = torch.where(valid, logits, torch.full_like(logits, -math.inf))
    log_norm = torch.logsumexp(logits, dim=-1)
    log_p = -0.5 * (noise.square()) - log_norm  # (z̃ − x)/s = ε exactly
    return -_sum_dims(log_p)


def diffusion_loss(
    model: Model,
    x: Tensor,
    schedule: Any,
    *,
    parameterization: str = "eps",
    process: str = "vp",
    class_labels: Tensor | None = None,
    sigma_data: float = 0.5,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Continuous-time diffusion loss L_∞ per example (nats): ½·‖ε − ε̂‖²/p(λ) at one t.

    The weighted loss with w = 1 (VDM eq. 53–54, VDM++ eq. 4); unbiased for
    ½∫_{λ_min}^{λ_max}E‖ε − ε̂‖²dλ whatever the schedule's shape (only its endpoints matter).
    """
    loss = WeightedLoss(schedule, ELBO(), parameterization, process, sigma_data=sigma_data)
    return loss(model, x, class_labels, t=t, noise=noise, generator=generator).loss


def diffusion_loss_discrete(
    model: Model,
    x: Tensor,
    schedule: Any,
    steps: int,
    *,
    parameterization: str = "eps",
    process: str = "vp",
    class_labels: Tensor | None = None,
    sigma_data: float = 0.5,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Discrete-time diffusion loss L_T per example (nats), T = ``steps`` (VDM eq. 51).

    i = ⌊tT⌋ + 1 for t ∼ U[0, 1) (low-discrepancy across the batch unless ``t`` is given),
    s = (i − 1)/T, t_i = i/T and the estimate T/2·expm1(λ_s − λ_t)·‖ε − ε̂(z_{t_i}; λ_t)‖².
    Passing t = (k + ½)/T for k = 0 … T − 1 over a repeated batch gives the exact sum.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    n = x.shape[0]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if t is None:
        gen_device = generator.device if generator is not None else x.device
        t = low_discrepancy(n, generator=generator, device=gen_device, dtype=torch.float64)
    elif t.shape != (n,):
        raise ValueError(f"t must have shape [{n}], got {tuple(t.shape)}")
    i = torch.clamp(torch.floor(t.double() * steps) + 1.0, 1.0, float(steps)).to(x.device)
    t_i = (i / steps).to(dtype)
    s_i = ((i - 1.0) / steps).to(dtype)
    lam_t = schedule.logsnr(t_i)
    lam_s = schedule.logsnr(s_i)
    inner = WeightedLoss(
        _FixedLogSNR(schedule), ELBO(), parameterization, process, sigma_data=sigma_data
    )
    out = inner(model, x, class_labels, t=lam_t, noise=noise, generator=generator)
    return 0.5 * steps * torch.expm1(lam_s - lam_t) * out.unweighted


class _FixedLogSNR:
    """Adapter passing λ through WeightedLoss unchanged (t := λ, p := 1)."""

    def __init__(self, schedule: Any) -> None:
        self.logsnr_min = schedule.logsnr_min
        self.logsnr_max = schedule.logsnr_max

    def logsnr_pdf(self, lam: Tensor) -> tuple[Tensor, Tensor]:
        return lam, torch.ones_like(lam)

    def logsnr(self, lam: Tensor) -> Tensor:
        return lam


# --- models on a discrete DDPM table ------------------------------------------------------------


@runtime_checkable
class DiscreteTimeModel(Protocol):
    """A network on a DDPM table: ``alphas_cumprod`` (ᾱ_t, t = 0 … T − 1) and ε̂ at integer t.

    ``predict_eps(z, t, **kwargs)``: z = √ᾱ_t·x + √(1 − ᾱ_t)·ε (VP units), t int64 of shape [B].
    ``vdmpp.samplers.from_discrete(model, alphas_cumprod, ...)`` returns such an object (this
    package does not import vdmpp.samplers: the protocol is the boundary); :class:`TimestepModel`
    builds one from a plain ``model(z, t)``.
    """

    alphas_cumprod: Tensor

    def predict_eps(self, z: Tensor, t: Tensor, **kwargs: Any) -> Tensor: ...


def _check_table(alphas_cumprod: Tensor | Sequence[float]) -> Tensor:
    a = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
    if a.ndim != 1 or a.numel() < 2:
        raise ValueError(f"alphas_cumprod must be 1-D with >= 2 entries, got {tuple(a.shape)}")
    if not bool(((a > 0) & (a < 1)).all()) or not bool((a[1:] < a[:-1]).all()):
        raise ValueError("alphas_cumprod must lie in (0, 1) and decrease strictly with t")
    return a


def discrete_logsnr(alphas_cumprod: Tensor | Sequence[float]) -> Tensor:
    """λ_t = log(ᾱ_t/(1 − ᾱ_t)) of each table entry (float64, CPU; decreasing in t)."""
    a = _check_table(alphas_cumprod)
    return torch.log(a) - torch.log1p(-a)


class TimestepModel:
    """:class:`DiscreteTimeModel` from ``model(z, t, **kwargs)`` and its ``alphas_cumprod``.

    The output, in ``parameterization`` (``eps``, ``v``, ``x``, …; VP process), becomes ε̂ by
    :func:`vdmpp.losses.parameterizations.to_eps` at λ_t.
    """

    def __init__(
        self,
        model: Callable[..., Tensor],
        alphas_cumprod: Tensor | Sequence[float],
        parameterization: str = "eps",
    ) -> None:
        self.model = model
        self.alphas_cumprod = _check_table(alphas_cumprod)
        self.parameterization = P.check_name(parameterization)
        self._logsnr = discrete_logsnr(self.alphas_cumprod)

    def predict_eps(self, z: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        out = self.model(z, t, **kwargs)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"the model returned {type(out).__name__}, not a tensor; wrap it "
                "(e.g. lambda z, t: net(z, t).sample) or use vdmpp.samplers.from_discrete"
            )
        lam = self._logsnr.to(device=z.device)[t.long()].to(out.dtype)
        return P.to_eps(out, self.parameterization, z, lam, process="vp")


def _as_discrete(
    model: Any, alphas_cumprod: Tensor | Sequence[float] | None, parameterization: str
) -> DiscreteTimeModel:
    if alphas_cumprod is None:
        if isinstance(model, DiscreteTimeModel):
            return model
        raise TypeError(
            "a discrete-time bound needs the model's alphas_cumprod: pass alphas_cumprod=..., or "
            "a model with .alphas_cumprod and .predict_eps (vdmpp.samplers.from_discrete)"
        )
    return TimestepModel(model, alphas_cumprod, parameterization)


def diffusion_loss_timesteps(
    model: DiscreteTimeModel | Callable[..., Tensor],
    x: Tensor,
    alphas_cumprod: Tensor | Sequence[float] | None = None,
    *,
    parameterization: str = "eps",
    model_kwargs: Mapping[str, Any] | None = None,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """VDM's discrete-time diffusion loss on a DDPM table, per example (nats).

    With λ_i of :func:`discrete_logsnr` (i = 0 … T − 1) the table's latents are a chain of T
    variables, and the bound's diffusion term has K = T − 1 transitions z_i → z_{i−1}
    (VDM eq. 48–50): L = ½ Σ_{i=1}^{K} (SNR_{i−1} − SNR_i)‖x − x̂(z_i; i)‖². Since
    x − x̂ = (σ_i/α_i)(ε̂ − ε) and σ_i²/α_i² = e^{−λ_i}, each term is
    ½ expm1(λ_{i−1} − λ_i)‖ε − ε̂(z_i; i)‖² (no cancellation for small steps). The estimator draws
    one i ∈ {1 … K} per example (VDM eq. 51): i = 1 + ⌊tK⌋ with t ∼ U[0, 1) (low-discrepancy
    across the batch unless ``t`` is given), z_i = α_i x + σ_i ε and returns
    K/2·expm1(λ_{i−1} − λ_i)‖ε − ε̂‖². ``model``: a :class:`DiscreteTimeModel` (then
    ``alphas_cumprod`` is None), or ``model(z, t, **model_kwargs)`` in ``parameterization`` with
    its ``alphas_cumprod``.
    """
    m = _as_discrete(model, alphas_cumprod, parameterization)
    lam_tab = discrete_logsnr(m.alphas_cumprod)
    k = int(lam_tab.numel()) - 1
    n = x.shape[0]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if t is None:  # on the CPU unless the generator lives elsewhere: i indexes a CPU table
        gen_device = generator.device if generator is not None else torch.device("cpu")
        t = low_discrepancy(n, generator=generator, device=gen_device, dtype=torch.float64)
    elif t.shape != (n,):
        raise ValueError(f"t must have shape [{n}], got {tuple(t.shape)}")
    i = torch.clamp(torch.floor(t.detach().double().cpu() * k) + 1, 1, k).long()
    lam_t, lam_s = lam_tab[i], lam_tab[i - 1]
    noise = _noise_for(x, noise, generator, dtype)
    shape = (n,) + (1,) * (x.ndim - 1)
    alpha, sigma = vp(lam_t.to(device=x.device, dtype=dtype).reshape(shape))
    z = (alpha * x.to(dtype) + sigma * noise).to(x.dtype)
    eps_hat = m.predict_eps(z, i.to(x.device), **dict(model_kwargs or {}))
    err = _sum_dims((noise - eps_hat.to(dtype)).square())
    coef = torch.expm1(lam_s - lam_t).to(device=x.device, dtype=dtype)
    return 0.5 * k * coef * err


def bits_per_dim_discrete(
    model: DiscreteTimeModel | Callable[..., Tensor],
    x: Tensor,
    alphas_cumprod: Tensor | Sequence[float] | None = None,
    *,
    parameterization: str = "eps",
    bits: int = 8,
    model_kwargs: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
) -> VLBTerms:
    """VDM's discrete-time bound in bits/dim for a model on a DDPM table, T from the table.

    prior = D_KL(q(z_{T−1}|x) ‖ N(0, I)) at λ_{T−1}; reconstruction = VDM's discretized-Gaussian
    decoder −log p(x|z_0) at λ_0 (model-free, :func:`reconstruction_loss`); diffusion =
    :func:`diffusion_loss_timesteps` over the T − 1 transitions. One draw of i and ε per example.
    This is VDM's bound for the network's reverse process with the posterior variances of
    q(z_s|z_t, x) (VDM eq. 28; DDPM's σ² = β̃ choice); DDPM's own L_0 decodes x from z_0 with the
    network instead, so its reported numbers differ by the reconstruction term.
    """
    m = _as_discrete(model, alphas_cumprod, parameterization)
    lam_tab = discrete_logsnr(m.alphas_cumprod)
    n = x.shape[0]
    dims = x[0].numel()
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    prior = prior_kl(x, float(lam_tab[-1]))
    gen_device = generator.device if generator is not None else x.device
    eps0 = torch.randn(x.shape, generator=generator, device=gen_device, dtype=dtype)
    recon = reconstruction_loss(x, float(lam_tab[0]), bits=bits, noise=eps0.to(x.device))
    diff = diffusion_loss_timesteps(m, x, model_kwargs=model_kwargs, generator=generator)
    scale = 1.0 / (dims * math.log(2.0))
    prior, recon, diff = prior * scale, recon * scale, diff.to(prior.dtype) * scale
    if diff.shape != (n,):
        raise RuntimeError(f"internal: diffusion term has shape {tuple(diff.shape)}")
    return VLBTerms(prior, recon, diff, prior + recon + diff)


def bits_per_dim(
    model: Model,
    x: Tensor,
    schedule: Any = None,
    *,
    steps: int | None = None,
    parameterization: str = "eps",
    process: str = "vp",
    class_labels: Tensor | None = None,
    bits: int = 8,
    sigma_data: float = 0.5,
    generator: torch.Generator | None = None,
) -> VLBTerms:
    """VDM's bound on −log₂ P(x)/D for n-bit data x in [−1, 1], per example (bits/dim).

    ``schedule`` gives λ_min = λ(1) (prior), λ_max = λ(0) (reconstruction) and the importance
    distribution (continuous time, ``steps=None``) or the grid λ(i/T) (``steps=T``). One draw of
    t and ε per example (t low-discrepancy over the batch), so ``total.mean()`` estimates the
    bound and ``total.std()/√batch`` its standard error; repeat over batches for more draws.
    ``model(z, logsnr, class_labels)`` outputs ``parameterization`` for ``process``. Gradients
    flow (VDM trains on this bound); wrap in ``torch.no_grad()`` to evaluate.

    A :class:`DiscreteTimeModel` (e.g. ``vdmpp.samplers.from_discrete(net, alphas_cumprod)``)
    with ``schedule=None`` gets the discrete-time bound of its own table
    (:func:`bits_per_dim_discrete`, T from the table; ``class_labels`` passed through).
    """
    if schedule is None:
        if not isinstance(model, DiscreteTimeModel):
            raise TypeError(
                "bits_per_dim needs a schedule, unless the model is a discrete-time model with "
                ".alphas_cumprod and .predict_eps (vdmpp.samplers.from_discrete)"
            )
        kw = {} if class_labels is None else {"class_labels": class_labels}
        return bits_per_dim_discrete(model, x, bits=bits, model_kwargs=kw, generator=generator)
    n = x.shape[0]
    dims = x[0].numel()
    lam_min, lam_max = schedule.logsnr_min, schedule.logsnr_max
    prior = prior_kl(x, lam_min, process=process)
    gen_device = generator.device if generator is not None else x.device
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    eps0 = torch.randn(x.shape, generator=generator, device=gen_device, dtype=dtype)
    recon = reconstruction_loss(x, lam_max, bits=bits, noise=eps0.to(x.device))
    kw: dict[str, Any] = {
        "parameterization": parameterization,
        "process": process,
        "class_labels": class_labels,
        "sigma_data": sigma_data,
        "generator": generator,
    }
    if steps is None:
        diff = diffusion_loss(model, x, schedule, **kw)
    else:
        diff = diffusion_loss_discrete(model, x, schedule, steps, **kw)
    scale = 1.0 / (dims * math.log(2.0))
    prior, recon, diff = prior * scale, recon * scale, diff.to(prior.dtype) * scale
    if diff.shape != (n,):
        raise RuntimeError(f"internal: diffusion term has shape {tuple(diff.shape)}")
    return VLBTerms(prior, recon, diff, prior + recon + diff)
