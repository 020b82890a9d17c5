"""Typed wrappers of the ``vdmpp`` custom ops, and their fake (meta) implementations."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "adaptive_apply_stats",
    "adaptive_bin_stats",
    "adaptive_ema_update",
    "churn",
    "heun_step",
]


def heun_step(
    x_hat: Tensor, denoised: Tensor, denoised_next: Tensor | None, t_hat: float, t_next: float
) -> Tensor:
    """Euler step (``denoised_next is None``) or Heun correction from t̂ to t_next (EDM Alg. 1/2).

    d = (x̂ − D₁)/t̂; Euler: x̂ + (t_next − t̂)·d. Correction: x_e = x̂ + (t_next − t̂)·d,
    d′ = (x_e − D₂)/t_next, x̂ + (t_next − t̂)·(½d + ½d′). float32 math; operands float32 or
    bf16 (they may mix, as in the reference); the result has ``x_hat``'s dtype.
    """
    return torch.ops.vdmpp.heun_step.default(
        x_hat, denoised, denoised_next, float(t_hat), float(t_next)
    )


def churn(x: Tensor, noise: Tensor, t: float, t_hat: float, s_noise: float) -> Tensor:
    """x̂ = x + √(t̂² − t²)·S_noise·ε (EDM Alg. 2 lines 5–6)."""
    return torch.ops.vdmpp.churn.default(x, noise, float(t), float(t_hat), float(s_noise))


def adaptive_ema_update(
    ema: Tensor,
    cdf: Tensor,
    logsnr: Tensor,
    value: Tensor,
    decay: float,
    logsnr_min: float,
    logsnr_max: float,
) -> None:
    """In place: bin λ, per-bin mean of ``value`` (= w(λ)·loss), EMA on hit bins, refresh cdf.

    ``ema`` [bins] and ``cdf`` [bins + 1] are float32 buffers; non-finite values are ignored; NaN
    λ is a ValueError on CPU and ignored on CUDA (no host sync there).
    """
    torch.ops.vdmpp.adaptive_ema_update.default(
        ema, cdf, logsnr, value, float(decay), float(logsnr_min), float(logsnr_max)
    )


def adaptive_bin_stats(
    stats: Tensor, logsnr: Tensor, value: Tensor, logsnr_min: float, logsnr_max: float
) -> None:
    """In place: ``stats[0, k] += Σ value``, ``stats[1, k] += count`` over this batch's λ in bin k.

    ``stats`` is a float32 [2, bins] accumulator (sum-reducible across ranks and micro-batches);
    non-finite pairs are skipped; NaN λ is a ValueError on CPU and skipped on CUDA. The first
    half of the data-parallel update of VDM++ App. H: all-reduce ``stats``, then
    :func:`adaptive_apply_stats`.
    """
    torch.ops.vdmpp.adaptive_bin_stats.default(
        stats, logsnr, value, float(logsnr_min), float(logsnr_max)
    )


def adaptive_apply_stats(ema: Tensor, cdf: Tensor, stats: Tensor, decay: float) -> None:
    """In place: EMA of the bins hit in ``stats`` (mean = sum / max(count, 1)), refresh ``cdf``."""
    torch.ops.vdmpp.adaptive_apply_stats.default(ema, cdf, stats, float(decay))


def _same(op: str, ref: Tensor, ref_name: str, t: Tensor, name: str) -> None:
    _float(op, t, name)  # float32/bf16 may mix: computed in float32, result in ref's dtype
    torch._check(t.device == ref.device, lambda: f"{op}: {name} and {ref_name} devices differ")
    torch._check(t.shape == ref.shape, lambda: f"{op}: {name} and {ref_name} shapes differ")


def _float(op: str, t: Tensor, name: str) -> None:
    torch._check(
        t.dtype in (torch.float32, torch.bfloat16),
        lambda: f"{op}: {name} must be float32 or bfloat16, got {t.dtype}",
    )


if hasattr(torch.ops.vdmpp, "heun_step"):  # only when the compiled library is loaded

    @torch.library.register_fake("vdmpp::heun_step")
    def _heun_step_fake(x_hat, denoised, denoised_next, t_hat, t_next):
        _float("vdmpp::heun_step", x_hat, "x_hat")
        _same("vdmpp::heun_step", x_hat, "x_hat", denoised, "denoised")
        if denoised_next is not None:
            _same("vdmpp::heun_step", x_hat, "x_hat", denoised_next, "denoised_next")
        return torch.empty_like(x_hat)

    @torch.library.register_fake("vdmpp::churn")
    def _churn_fake(x, noise, t, t_hat, s_noise):
        _float("vdmpp::churn", x, "x")
        _same("vdmpp::churn", x, "x", noise, "noise")
        return torch.empty_like(x)

    def _adaptive_inputs(op, buf, logsnr, value, name):
        torch._check(buf.dtype == torch.float32, lambda: f"{op}: {name} must be float32")
        for t, n in ((logsnr, "logsnr"), (value, "value")):
            _float(op, t, n)
            torch._check(
                t.device == buf.device, lambda n=n: f"{op}: {n} is not on {name}'s device"
            )
        torch._check(logsnr.dim() == 1, lambda: f"{op}: logsnr must be 1-D")
        torch._check(logsnr.shape == value.shape, lambda: f"{op}: logsnr/value shapes differ")

    def _adaptive_buffers(op, ema, cdf):
        torch._check(ema.dim() == 1, lambda: f"{op}: ema must be 1-D")
        torch._check(cdf.shape == (ema.shape[0] + 1,), lambda: f"{op}: cdf must be [bins + 1]")
        torch._check(
            ema.dtype == torch.float32 and cdf.dtype == torch.float32,
            lambda: f"{op}: ema and cdf must be float32 buffers",
        )
        torch._check(cdf.device == ema.device, lambda: f"{op}: cdf is not on ema's device")

    @torch.library.register_fake("vdmpp::adaptive_ema_update")
    def _adaptive_ema_update_fake(ema, cdf, logsnr, value, decay, logsnr_min, logsnr_max):
        op = "vdmpp::adaptive_ema_update"
        _adaptive_buffers(op, ema, cdf)
        _adaptive_inputs(op, ema, logsnr, value, "ema")
        return None

    @torch.library.register_fake("vdmpp::adaptive_bin_stats")
    def _adaptive_bin_stats_fake(stats, logsnr, value, logsnr_min, logsnr_max):
        op = "vdmpp::adaptive_bin_stats"
        torch._check(stats.dim() == 2 and stats.shape[0] == 2, lambda: f"{op}: stats [2, bins]")
        _adaptive_inputs(op, stats, logsnr, value, "stats")
        return None

    @torch.library.register_fake("vdmpp::adaptive_apply_stats")
    def _adaptive_apply_stats_fake(ema, cdf, stats, decay):
        op = "vdmpp::adaptive_apply_stats"
        _adaptive_buffers(op, ema, cdf)
        torch._check(stats.shape == (2, ema.shape[0]), lambda: f"{op}: stats must be [2, bins]")
        torch._check(stats.dtype == torch.float32, lambda: f"{op}: stats must be float32")
        torch._check(stats.device == ema.device, lambda: f"{op}: stats is not on ema's device")
        return None
