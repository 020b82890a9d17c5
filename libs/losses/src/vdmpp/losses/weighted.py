"""The weighted loss: VDM++'s Monte-Carlo estimator of eq. 7 (VDM++ Sec. 3.1–3.2)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from vdmpp.schedules import low_discrepancy, uniform

from . import parameterizations as P
from . import weightings as W

__all__ = ["LossOutput", "WeightedLoss"]

Model = Callable[..., Tensor]
TimeSampler = Callable[..., Tensor]
_SAMPLERS: dict[str, TimeSampler] = {"low_discrepancy": low_discrepancy, "uniform": uniform}


class LossOutput(NamedTuple):
    """Per-example outputs of :class:`WeightedLoss`, each of shape [batch].

    ``loss``: ½·w(λ)/p(λ)·‖ε − ε̂‖² (the estimator; average it for the minibatch loss);
    ``logsnr``: λ; ``unweighted``: ‖ε − ε̂‖² (what ``Adaptive.update(logsnr, unweighted)`` takes);
    ``t``: the diffusion times drawn.
    """

    loss: Tensor
    logsnr: Tensor
    unweighted: Tensor
    t: Tensor


def _scalar(v: Tensor | float) -> float:
    return float(v.detach()) if isinstance(v, Tensor) else float(v)


def _compute_dtype(x: Tensor) -> torch.dtype:
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class WeightedLoss:
    """L_w(x) = ½ E_{t∼U, ε}[w(λ)/p(λ)·‖ε − ε̂(z_λ; λ)‖²] with λ = f_λ(t) (VDM++ eq. 7).

    ``schedule``: any ``vdmpp.schedules`` schedule (the importance distribution p(λ); only
    its endpoints change the expected loss, Sec. 3.2). ``weighting``: a
    :class:`~vdmpp.losses.weightings.Weighting`, a name for ``weightings.get``, or any callable
    λ ↦ w(λ). ``parameterization``: what the model outputs (``eps``, ``x``, ``v``, ``score``,
    ``edm``, ``flow``; see :mod:`~vdmpp.losses.parameterizations`). ``process``: "vp" (z = αx + σε,
    α² = sigmoid(λ)) or "ve" (z = x + e^{−λ/2}ε).

    The model is called as ``model(z, logsnr, class_labels)`` with z of x's shape and λ of shape
    [batch]. ‖·‖² is the **sum** over all non-batch dimensions, as in the paper (and as the VLB
    needs); divide by the number of dimensions yourself for a per-dimension loss. The ε-error is
    computed from the error in the model's own parameterization, ε − ε̂ = c(λ)(y − ŷ), without
    forming ε̂ (no cancellation at high λ for x-prediction).

    p(λ) comes from ``schedule.logsnr_pdf(t)`` when the schedule has it (one search for
    ``Adaptive``; differentiable for ``Learned``), else ``schedule.pdf(schedule.logsnr(t))``.
    If the schedule has ``report_loss`` (``Learned`` in variance mode) it is called with the
    per-example loss before returning, so the schedule's variance gradient is ready for backward.
    """

    def __init__(
        self,
        schedule: Any,
        weighting: W.Weighting | str | Callable[[Tensor], Tensor],
        parameterization: str = "eps",
        process: str = "vp",
        *,
        sigma_data: float = 0.5,
        time_sampler: str | TimeSampler = "low_discrepancy",
    ) -> None:
        if not (hasattr(schedule, "logsnr_pdf") or hasattr(schedule, "pdf")) or not hasattr(
            schedule, "logsnr"
        ):
            raise TypeError(
                f"schedule must provide logsnr(t) and pdf(λ) or logsnr_pdf(t), "
                f"got {type(schedule).__name__}"
            )
        if isinstance(weighting, str):
            weighting = W.get(weighting)
        if not callable(weighting):
            raise TypeError(f"weighting must be a callable λ → w(λ) or a name, got {weighting!r}")
        self.schedule = schedule
        self.weighting = weighting
        self.parameterization = P.check_name(parameterization)
        self.process = P.check_process(process)
        if parameterization == "edm":
            P.coefficients("edm", torch.zeros(()), sigma_data=sigma_data)  # validates sigma_data
        self.sigma_data = float(sigma_data)
        if isinstance(time_sampler, str):
            if time_sampler not in _SAMPLERS:
                raise ValueError(
                    f"unknown time_sampler {time_sampler!r}; choose one of {', '.join(_SAMPLERS)} "
                    "or pass a callable (n, *, generator, device, dtype) -> t"
                )
            time_sampler = _SAMPLERS[time_sampler]
        self.time_sampler = time_sampler
        self._check_range()
        adaptive_w = getattr(schedule, "weighting", None)
        if adaptive_w is not None and hasattr(schedule, "update") and adaptive_w != weighting:
            warnings.warn(
                f"the adaptive schedule tracks weighting {adaptive_w!r} but the loss uses "
                f"{weighting!r}; p(λ) will not follow this loss (VDM++ eq. 136)",
                stacklevel=2,
            )

    def _check_range(self) -> None:
        lo, hi = _scalar(self.schedule.logsnr_min), _scalar(self.schedule.logsnr_max)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"schedule has an invalid λ range [{lo}, {hi}]")
        supported = getattr(self.weighting, "logsnr_range", None)
        if supported is not None:
            wlo, whi = supported
            if lo < wlo or hi > whi:
                raise ValueError(
                    f"schedule λ range [{lo:g}, {hi:g}] lies outside the range "
                    f"[{wlo:g}, {whi:g}] where {self.weighting!r} is finite in float32; "
                    "narrow the schedule (logsnr_min/logsnr_max) or change the weighting's shift"
                )

    def logsnr_pdf(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(λ(t), p(λ(t))) from the schedule."""
        if hasattr(self.schedule, "logsnr_pdf"):
            return self.schedule.logsnr_pdf(t)
        lam = self.schedule.logsnr(t)
        return lam, self.schedule.pdf(lam)

    def __call__(
        self,
        model: Model,
        x: Tensor,
        class_labels: Tensor | None = None,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        """Per-example loss for data x of shape [batch, ...] (t and ε drawn unless given)."""
        dtype = _compute_dtype(x)
        if x.dim() < 1 or x.shape[0] == 0:
            raise ValueError(f"x must have shape [batch, ...], batch >= 1, got {tuple(x.shape)}")
        n = x.shape[0]
        if class_labels is not None and (class_labels.dim() == 0 or class_labels.shape[0] != n):
            raise ValueError(
                f"class_labels must have batch size {n}, got shape {tuple(class_labels.shape)}"
            )
        gen_device = generator.device if generator is not None else x.device
        if t is None:
            t = self.time_sampler(n, generator=generator, device=gen_device, dtype=dtype)
            t = t.to(x.device)
        elif t.shape != (n,):
            raise ValueError(f"t must have shape [{n}], got {tuple(t.shape)}")
        else:
            t = t.to(device=x.device, dtype=dtype)
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=gen_device, dtype=dtype)
            noise = noise.to(x.device)
        elif noise.shape != x.shape:
            raise ValueError(f"noise must have shape {tuple(x.shape)}, got {tuple(noise.shape)}")
        else:
            noise = noise.to(dtype)
        xc = x.to(dtype)

        logsnr, pdf = self.logsnr_pdf(t)
        lam = logsnr.reshape((n,) + (1,) * (x.dim() - 1))
        alpha, sigma = P.alpha_sigma(lam, self.process)
        z = alpha * xc + sigma * noise
        out = model(z, logsnr, class_labels)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            raise ValueError(
                f"model output must have x's shape {tuple(x.shape)}, got "
                f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}"
            )
        kw = {"process": self.process, "sigma_data": self.sigma_data}
        y = P.target(self.parameterization, xc, noise, logsnr, **kw)
        scale = P.eps_scale(self.parameterization, logsnr, **kw)
        sq = (out.to(dtype) - y).square().reshape(n, -1).sum(dim=1)
        unweighted = scale.square() * sq
        loss = 0.5 * (self.weighting(logsnr) / pdf) * unweighted
        report = getattr(self.schedule, "report_loss", None)
        if report is not None:
            report(loss)
        return LossOutput(loss, logsnr, unweighted, t)

    def __repr__(self) -> str:
        return (
            f"WeightedLoss(schedule={self.schedule!r}, weighting={self.weighting!r}, "
            f"parameterization={self.parameterization!r}, process={self.process!r})"
        )
