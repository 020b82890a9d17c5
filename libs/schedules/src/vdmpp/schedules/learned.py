"""VDM's learned monotone noise schedule (VDM App. H and I.2)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import check_logsnr_range, check_unit_interval

__all__ = ["Learned"]


class Learned(nn.Module):
    """λ_η(t) from a monotone network with pinned, learnable endpoints (VDM App. H, eq. 59).

    Defaults follow VDM: γ ∈ [−13.3, 5], i.e. λ ∈ [−5, 13.3].

    γ̃(t) = l₁(t) + l₃(sigmoid(l₂(l₁(t)))) with positive weights (|W|) is increasing in t;
    s(t) = (γ̃(t) − γ̃(0))/(γ̃(1) − γ̃(0)) ∈ [0, 1] and λ(t) = λ_max + (λ_min − λ_max)·s(t), so
    λ(0) = λ_max, λ(1) = λ_min exactly (γ = −λ in VDM's notation). dλ/dt is analytic, so
    p(λ(t)) = −1/λ'(t) is differentiable in all parameters.

    Learning (App. I.2): the endpoints are trained on the VLB like any parameter; the shape η
    is trained to minimise the variance of the loss estimate. With ``variance_grad=True`` the
    gradient reaching η through each example's (s, s') is multiplied by 2·L_i, giving
    ∇_η E[L²] = ∇_η Var[L] (eq. 60–62) in the same backward pass. Call :meth:`report_loss` with
    the per-example loss before ``backward`` (``vdmpp.losses.WeightedLoss`` does).
    """

    def __init__(
        self,
        *,
        logsnr_min: float = -5.0,
        logsnr_max: float = 13.3,
        hidden: int = 1024,
        learn_endpoints: bool = True,
        variance_grad: bool = True,
    ) -> None:
        super().__init__()
        check_logsnr_range(logsnr_min, logsnr_max)
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        ends = torch.tensor([float(logsnr_min), float(logsnr_max)])
        if learn_endpoints:
            self.ends = nn.Parameter(ends)
        else:
            self.register_buffer("ends", ends)
        # Initialised near the linear schedule: l₁ dominates, the sigmoid branch starts small.
        self.w1 = nn.Parameter(torch.tensor(1.0))
        self.b1 = nn.Parameter(torch.tensor(0.0))
        self.w2 = nn.Parameter(torch.randn(hidden) * 2.0)
        self.b2 = nn.Parameter(torch.randn(hidden))
        self.w3 = nn.Parameter(torch.full((hidden,), 1e-2 / hidden))
        self.b3 = nn.Parameter(torch.tensor(0.0))
        self.variance_grad = variance_grad
        self._pending: list[_VarianceScale] = []
        # t ∈ {0, 1} for the normalisation γ̃(0), γ̃(1), kept on the module's device (it moves
        # with .to()): no host→device copy per call, so a step is sync-free and graph-capturable.
        # Not persistent: checkpoints are unchanged.
        self.register_buffer("_t01", torch.tensor([0.0, 1.0]), persistent=False)

    @property
    def logsnr_min(self) -> Tensor:
        return self.ends[0]

    @property
    def logsnr_max(self) -> Tensor:
        return self.ends[1]

    # --- the monotone network -----------------------------------------------------------------
    def _gamma_tilde(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """γ̃(t) and dγ̃/dt for t of any shape."""
        w1, w2, w3 = self.w1.abs(), self.w2.abs(), self.w3.abs()
        h1 = w1 * t + self.b1
        a = torch.sigmoid(h1.unsqueeze(-1) * w2 + self.b2)
        g = h1 + a @ w3 + self.b3
        dg = w1 * (1.0 + (a * (1.0 - a)) @ (w2 * w3))
        return g, dg

    def _shape(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised shape s(t) ∈ [0, 1] and s'(t) > 0."""
        dtype = torch.promote_types(t.dtype, self.w1.dtype)
        ends, _ = self._gamma_tilde(self._t01.to(device=t.device, dtype=dtype))
        g, dg = self._gamma_tilde(t.to(dtype))
        span = ends[1] - ends[0]
        return (g - ends[0]) / span, dg / span

    # --- the schedule -------------------------------------------------------------------------
    def logsnr_pdf(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(λ(t), p(λ(t)) = −1/λ'(t)), differentiable in every parameter."""
        check_unit_interval(t)
        s, ds = self._shape(t)
        if self.variance_grad and torch.is_grad_enabled() and s.requires_grad:
            scale = _VarianceScale()
            s, ds = scale.attach(s), scale.attach(ds)
            self._pending.append(scale)
        lo, hi = self.ends[0], self.ends[1]
        lam = hi + (lo - hi) * s
        return lam.to(t.dtype), (1.0 / ((hi - lo) * ds)).to(t.dtype)

    def report_loss(self, loss: Tensor) -> None:
        """Give the per-example loss L_i of the last ``logsnr_pdf`` call(s) for the η gradient."""
        for scale in self._pending:
            scale.value = 2.0 * loss.detach()
        self._pending.clear()

    def logsnr(self, t: Tensor) -> Tensor:
        """λ(t) (VDM eq. 59 with γ = −λ)."""
        check_unit_interval(t)
        s, _ = self._shape(t)
        lo, hi = self.ends[0], self.ends[1]
        return (hi + (lo - hi) * s).to(t.dtype)

    @torch.no_grad()
    def t(self, logsnr: Tensor, iters: int = 60) -> Tensor:
        """Inverse by bisection on the monotone s(t) (float64, fixed iteration count, no sync)."""
        lo, hi = self.ends[0].double(), self.ends[1].double()
        target = ((hi - logsnr.double()) / (hi - lo)).clamp(0.0, 1.0)
        a, b = torch.zeros_like(target), torch.ones_like(target)
        for _ in range(iters):
            mid = 0.5 * (a + b)
            below = self._shape(mid)[0] < target
            a, b = torch.where(below, mid, a), torch.where(below, b, mid)
        return (0.5 * (a + b)).to(logsnr.dtype)

    def pdf(self, logsnr: Tensor) -> Tensor:
        """p(λ) = −1/λ'(t(λ)) on [λ_min, λ_max], else 0."""
        t = self.t(logsnr)
        _, ds = self._shape(t)
        lo, hi = self.ends[0], self.ends[1]
        p = 1.0 / ((hi - lo) * ds)
        inside = (logsnr >= lo) & (logsnr <= hi)
        return torch.where(inside, p, torch.zeros_like(p)).to(logsnr.dtype)


class _VarianceScale:
    """Multiplies the gradient through a per-example tensor by 2·L_i (VDM eq. 62)."""

    def __init__(self) -> None:
        self.value: Tensor | None = None

    def attach(self, x: Tensor) -> Tensor:
        x = x.clone()
        x.register_hook(self._hook)
        return x

    def _hook(self, grad: Tensor) -> Tensor:
        if self.value is None:
            raise RuntimeError(
                "Learned(variance_grad=True): call schedule.report_loss(per_example_loss) before "
                "backward (vdmpp.losses.WeightedLoss does this), or set variance_grad=False"
            )
        return grad * self.value.to(grad.dtype).reshape(grad.shape)
