"""VDM++'s adaptive noise schedule (VDM++ App. F, eq. 136; App. H)."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor, nn

from ._kernels import disabled_by_env, load_kernels
from .base import check_logsnr_range, check_unit_interval

__all__ = ["Adaptive"]

class Adaptive(nn.Module):
    """p(λ) ∝ E[w(λ)‖ε − ε̂‖²], estimated by a per-bin EMA (VDM++ eq. 136, App. H).

    [λ_min, λ_max] is cut into ``bins`` equal bins; each holds an EMA of w(λ)·‖ε − ε̂‖²
    (initialised to 1, decay 0.999). The density is piecewise constant, p(λ) = m_k/(Δ·Σm) in
    bin k, so the CDF and f_λ(t) are piecewise linear. t = 1 − CDF(λ): t = 0 ↦ λ_max.

    ``update(logsnr, loss)`` takes the *unweighted* per-example ‖ε − ε̂‖² and applies the
    weighting. Each hit bin moves towards the mean of this step's values in it; bins not hit keep
    their value. λ outside the range is clipped into the end bins; examples with a non-finite loss
    (or, on accelerators, λ) are ignored; NaN λ on CPU is an error (free to check there).
    No host sync, no Python loop over the batch. For data parallelism use
    ``add_stats`` (or ``bin_stats``) → all-reduce (sum) → ``apply_stats`` so every rank holds the
    same schedule; with ``vdmpp.kernels`` installed these run the fused
    ``vdmpp::adaptive_bin_stats`` / ``vdmpp::adaptive_apply_stats`` (bit-equal on CPU).

    Density floor: a bin whose EMA is 0 (or rounds its share of the CDF to 0) keeps the
    smallest normal float32 as its mass, so Σm > 0 always (an all-zero EMA is the uniform
    schedule), and ``logsnr_pdf`` maps every t to a λ inside a bin of positive mass — the
    quantile at t = 0 is the upper end of the support, not a flat tail — so p(λ(t)) > 0 for
    every t ∈ [0, 1] and w(λ)/p(λ) stays finite.
    """

    ema: Tensor
    cdf: Tensor

    def __init__(
        self,
        weighting: Callable[[Tensor], Tensor],
        bins: int = 100,
        decay: float = 0.999,
        *,
        logsnr_min: float = -20.0,
        logsnr_max: float = 20.0,
    ) -> None:
        super().__init__()
        check_logsnr_range(logsnr_min, logsnr_max)
        if not isinstance(bins, int) or bins < 1:
            raise ValueError(f"bins must be an int >= 1, got {bins!r}")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie in (0, 1), got {decay!r}")
        if not callable(weighting):
            raise TypeError(
                f"weighting must be a callable λ → w(λ), got {type(weighting).__name__}"
            )
        self.weighting = weighting
        self.bins, self.decay = bins, float(decay)
        self.logsnr_min, self.logsnr_max = float(logsnr_min), float(logsnr_max)
        self.width = (self.logsnr_max - self.logsnr_min) / bins
        self.register_buffer("ema", torch.ones(bins))
        self.register_buffer("cdf", torch.linspace(0.0, 1.0, bins + 1))
        self.force_reference = False  # set True to bypass the fused kernel (debugging)

    # --- state --------------------------------------------------------------------------------
    @staticmethod
    def cdf_from_ema(ema: Tensor) -> Tensor:
        """Normalised cumulative mass [0, m₀, m₀+m₁, …, 1] of the bins (last entry exactly 1).

        m_k = max(ema_k, tiny) with tiny the smallest normal float: Σm > 0, so an EMA decayed to
        0 in every bin gives the uniform schedule instead of 0/0.
        """
        c = torch.cumsum(ema.clamp_min(torch.finfo(ema.dtype).tiny), 0)
        c = torch.cat([c.new_zeros(1), c / c[-1:]])
        return torch.cat([c[:-1], c.new_ones(1)])

    def bin_index(self, logsnr: Tensor) -> Tensor:
        """Bin of each λ (clipped to [0, bins − 1]); non-finite λ gives bin 0 (mask it)."""
        lam = torch.nan_to_num(logsnr.to(self.ema.dtype), nan=self.logsnr_min)
        k = torch.floor((lam - self.logsnr_min) / self.width)
        return k.clamp(0, self.bins - 1).long()

    def bin_stats(self, logsnr: Tensor, loss: Tensor) -> Tensor:
        """Per-bin [sum of w(λ)·loss, count] for this step, shape [2, bins] (sum-reducible)."""
        if logsnr.shape != loss.shape or logsnr.dim() != 1:
            raise ValueError(
                f"logsnr and loss must be 1-D of equal shape, got {tuple(logsnr.shape)} "
                f"and {tuple(loss.shape)}"
            )
        lam = logsnr.detach().to(self.ema.dtype)
        on_cpu = lam.device.type == "cpu" and not torch.compiler.is_compiling()
        if on_cpu and bool(torch.isnan(lam).any()):  # free on CPU; masked on accelerators
            raise ValueError("Adaptive.update: logsnr contains NaN")
        value = self.weighting(lam) * loss.detach().to(self.ema.dtype)
        ok = torch.isfinite(lam) & torch.isfinite(value)
        k = self.bin_index(lam)
        stats = self.ema.new_zeros(2, self.bins)
        stats[0].index_add_(0, k, torch.where(ok, value, torch.zeros_like(value)))
        stats[1].index_add_(0, k, ok.to(stats.dtype))
        return stats

    def new_stats(self) -> Tensor:
        """A zero [2, bins] accumulator for :meth:`add_stats` (on the buffers' device)."""
        return self.ema.new_zeros(2, self.bins)

    @torch.no_grad()
    def add_stats(self, stats: Tensor, logsnr: Tensor, loss: Tensor) -> Tensor:
        """``stats += bin_stats(logsnr, loss)`` in place (one micro-batch); returns ``stats``.

        Runs the fused ``vdmpp::adaptive_bin_stats`` (one launch, no host sync, same result
        bit for bit on CPU) when ``vdmpp.kernels`` can serve these tensors.
        """
        K = self._kernel()
        if K is not None and logsnr.dim() == 1 and logsnr.shape == loss.shape:
            lam = logsnr.detach().to(self.ema.dtype)
            if K.can_use("adaptive_bin_stats", stats, lam):
                value = self.weighting(lam) * loss.detach().to(self.ema.dtype)
                if value.shape == lam.shape and K.can_use("adaptive_bin_stats", stats, lam, value):
                    K.adaptive_bin_stats(stats, lam, value, self.logsnr_min, self.logsnr_max)
                    return stats
        stats += self.bin_stats(logsnr, loss)
        return stats

    @torch.no_grad()
    def apply_stats(self, stats: Tensor) -> None:
        """EMA step on the bins hit in ``stats`` (from :meth:`bin_stats`), then refresh the CDF.

        Runs the fused ``vdmpp::adaptive_apply_stats`` when ``vdmpp.kernels`` can serve it.
        """
        K = self._kernel()
        if K is not None and K.can_use("adaptive_apply_stats", self.ema, self.cdf, stats):
            K.adaptive_apply_stats(self.ema, self.cdf, stats, self.decay)
            return
        sums, counts = stats[0], stats[1]
        hit = counts > 0
        mean = sums / counts.clamp_min(1)
        self.ema.copy_(torch.where(hit, self.decay * self.ema + (1 - self.decay) * mean, self.ema))
        self.cdf.copy_(self.cdf_from_ema(self.ema))

    def _kernel(self) -> ModuleType | None:
        """The fused-kernel module unless disabled (``force_reference``, ``VDMPP_KERNELS=0``)."""
        if self.force_reference or disabled_by_env():
            return None
        return load_kernels()

    @torch.no_grad()
    def update(self, logsnr: Tensor, loss: Tensor) -> None:
        """One EMA update from λ and the unweighted per-example ‖ε − ε̂‖² (VDM++ App. H).

        Runs the fused ``vdmpp::adaptive_ema_update`` (same result) when ``vdmpp.kernels`` can
        serve these tensors, else :meth:`bin_stats` → :meth:`apply_stats`.
        """
        K = self._kernel()
        if K is not None and logsnr.dim() == 1 and logsnr.shape == loss.shape:
            lam = logsnr.detach().to(self.ema.dtype)
            if K.can_use("adaptive_ema_update", self.ema, lam):
                value = self.weighting(lam) * loss.detach().to(self.ema.dtype)
                if value.shape == lam.shape and K.can_use(
                    "adaptive_ema_update", self.ema, lam, value
                ):
                    K.adaptive_ema_update(
                        self.ema, self.cdf, lam, value, self.decay, self.logsnr_min,
                        self.logsnr_max,
                    )  # fmt: skip
                    return
        self.apply_stats(self.bin_stats(logsnr, loss))

    # --- the schedule -------------------------------------------------------------------------
    def _mass(self) -> Tensor:
        return self.cdf[1:] - self.cdf[:-1]

    def logsnr(self, t: Tensor) -> Tensor:
        """Piecewise-linear f_λ(t): the λ at which the CDF equals 1 − t."""
        return self.logsnr_pdf(t)[0]

    def logsnr_pdf(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(λ(t), p(λ(t))) with one bin search."""
        check_unit_interval(t)
        u = (1.0 - t.to(self.cdf.dtype)).clamp(0.0, 1.0)
        # The bin with cdf[k] <= u < cdf[k+1] has positive mass; u = 1 (t = 0) has no such bin,
        # so take the first bin whose upper edge reaches 1 (the top of the support), never a
        # zero-mass tail bin above it.
        k_in = torch.searchsorted(self.cdf, u, right=True) - 1
        k_top = torch.searchsorted(self.cdf, u, right=False) - 1
        k = torch.where(u >= 1.0, k_top, k_in).clamp(0, self.bins - 1)
        mass = self._mass()[k]
        frac = ((u - self.cdf[k]) / mass.clamp_min(torch.finfo(mass.dtype).tiny)).clamp(0.0, 1.0)
        lam = self.logsnr_min + self.width * (k.to(u.dtype) + frac)
        return lam.to(t.dtype), (mass / self.width).to(t.dtype)

    def t(self, logsnr: Tensor) -> Tensor:
        """t = 1 − CDF(λ); λ outside the range maps to the nearest end."""
        lam = logsnr.to(self.cdf.dtype).clamp(self.logsnr_min, self.logsnr_max)
        k = self.bin_index(lam)
        frac = (lam - self.logsnr_min) / self.width - k.to(lam.dtype)
        cdf = self.cdf[k] + frac * self._mass()[k]
        return (1.0 - cdf).clamp(0.0, 1.0).to(logsnr.dtype)

    def pdf(self, logsnr: Tensor) -> Tensor:
        """Piecewise-constant p(λ) = m_k/Δ in bin k, 0 outside [λ_min, λ_max]."""
        lam = logsnr.to(self.cdf.dtype)
        inside = (lam >= self.logsnr_min) & (lam <= self.logsnr_max)
        p = self._mass()[self.bin_index(lam)] / self.width
        return torch.where(inside, p, torch.zeros_like(p)).to(logsnr.dtype)

    def edges(self) -> Tensor:
        """Bin edges in λ, shape [bins + 1]."""
        return torch.linspace(
            self.logsnr_min, self.logsnr_max, self.bins + 1, device=self.ema.device
        )

    def extra_repr(self) -> str:
        return (
            f"bins={self.bins}, decay={self.decay}, "
            f"logsnr_min={self.logsnr_min:g}, logsnr_max={self.logsnr_max:g}"
        )
