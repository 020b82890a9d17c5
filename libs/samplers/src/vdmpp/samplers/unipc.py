"""UniPC (Zhao et al. 2023): the multistep unified predictor–corrector, data prediction, B(h).

A transcription of the reference implementation's ``multistep_uni_pc_bh_update`` and its
``sample(method="multistep", lower_order_final=True)`` loop (wl-zhao/UniPC, ``uni_pc.py``) in
EDM's units. With λ = log(α/σ_VP) = −log σ (σ in EDM units) and z = α·x, the VP-unit update
z_t = (σ_VP,t/σ_VP,s)·z_s − α_t·hφ₁·m₀ − α_t·B(h)·Σρ_k D_k divided by α_t is

    x_t = (σ_t/σ_s)·x_s − expm1(−h)·m₀ − B(h)·Σ_k ρ_k·D_k,   h = λ_t − λ_s,

where m_k are the data predictions D̂ at the previous points, D_k = (m_k − m₀)/r_k their
differences with r_k = (λ_k − λ_s)/h (UniPC eq. 8 / Alg. 1–2), B(h) = −h (``bh1``) or
expm1(−h) (``bh2``), and ρ solves R·ρ = b with R_{ij} = r_j^{i−1}, b_i = i!·hφ_{i+1}(−h)/B(h)
(UniPC Thm. 3.1's order conditions). UniP (predictor) of order p uses the p − 1 previous
differences; UniC (corrector) adds D_t = m_t − m₀ from the model evaluated at the predicted
point, which is then reused as the next step's m₀ — so the corrector costs no extra NFE.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .denoiser import Denoiser
from .fast import _Run
from .samplers import Callback, Generator

__all__ = ["unipc", "unipc_coefficients"]


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting for the ≤ 3×3 systems of UniPC (Python floats,
    so the sampler's step loop never runs a device op for its coefficients)."""
    n = len(b)
    m = [[*row, b[i]] for i, row in enumerate(a)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        m[c], m[p] = m[p], m[c]
        for r in range(c + 1, n):
            f = m[r][c] / m[c][c]
            for k in range(c, n + 1):
                m[r][k] -= f * m[c][k]
    x = [0.0] * n
    for r in reversed(range(n)):
        x[r] = (m[r][n] - sum(m[r][k] * x[k] for k in range(r + 1, n))) / m[r][r]
    return x


def unipc_coefficients(
    h: float, rks: Sequence[float], variant: str
) -> tuple[float, float, list[float], list[float]]:
    """(hφ₁, B(h), ρ_predictor, ρ_corrector) of one UniPC-bh step of order p = len(rks) + 1.

    ``rks``: r_k = (λ_k − λ_s)/h of the p − 1 previous points (negative). As in the reference,
    order 2's predictor uses ρ = ½ and order 1's corrector ρ = ½ (their simplified forms).
    """
    hh = -h  # data prediction
    h_phi_1 = math.expm1(hh)
    if variant == "bh1":
        b_h = hh
    elif variant == "bh2":
        b_h = math.expm1(hh)
    else:
        raise ValueError(f"unipc variant must be 'bh1' or 'bh2', got {variant!r}")
    r_all = [*rks, 1.0]
    p = len(r_all)
    h_phi_k = h_phi_1 / hh - 1
    fact = 1
    rows, b = [], []
    for i in range(1, p + 1):
        rows.append([r ** (i - 1) for r in r_all])
        b.append(h_phi_k * fact / b_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    if p == 1:
        rho_p: list[float] = []
    elif p == 2:
        rho_p = [0.5]
    else:
        rho_p = _solve([row[:-1] for row in rows[:-1]], b[:-1])
    rho_c = [0.5] if p == 1 else _solve(rows, b)
    return h_phi_1, b_h, rho_p, rho_c


@torch.no_grad()
def unipc(
    denoiser: Denoiser,
    noise: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    order: int = 2,
    variant: str = "bh1",
    generator: Generator = None,
    callback: Callback = None,
    extra_args: Mapping[str, Any] | None = None,
    return_info: bool = False,
    check_finite: bool = True,
    progress: bool = False,
):
    """UniPC-p (Zhao et al. 2023, Alg. 2 multistep, data prediction, B(h) variants; UniC on
    every step but the last), on any σ grid.

    Step i → i+1 (s = i + 1 of the reference) has order min(order, i + 1, N − i): the first
    steps warm up, and ``lower_order_final`` (the reference default) lowers the last ones, the
    final step being first order without corrector. A grid ending at σ = 0 ends with that step's
    limit σ_N → 0, x = m₀ (the last model evaluation) — where the reference instead stops at
    σ_min (or calls the model once more with ``denoise_to_zero``). NFE = N. Deterministic.
    ``order=1`` is DDIM with UniC.
    """
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"unipc order must be 1, 2 or 3, got {order!r}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unipc variant must be 'bh1' or 'bh2', got {variant!r}")
    run = _Run(denoiser, noise, sigmas, extra_args, check_finite, callback)
    ts, x = run.ts, run.x
    n = len(ts) - 1
    ms: list[Tensor] = []  # data predictions at the previous points, most recent last
    lams: list[float] = []
    m_next = None
    for i in run.steps(progress, "unipc"):
        s, s_next = ts[i], ts[i + 1]
        m0 = run.D(x, s, i) if m_next is None else m_next
        ms.append(m0)
        lams.append(-math.log(s))
        del ms[:-order], lams[:-order]
        if s_next == 0:
            xc, m_next = m0, None
        else:
            p = min(order, i + 1, n - i)
            lam_s, lam_t = lams[-1], -math.log(s_next)
            h = lam_t - lam_s
            rks = [(lams[-(k + 1)] - lam_s) / h for k in range(1, p)]
            d1s = [(ms[-(k + 1)] - m0) / rk for k, rk in zip(range(1, p), rks)]
            h_phi_1, b_h, rho_p, rho_c = unipc_coefficients(h, rks, variant)
            x_t_ = (s_next / s) * run.up(x) - h_phi_1 * m0
            x_t = x_t_
            if rho_p:
                x_t = x_t_ - b_h * sum(r * d for r, d in zip(rho_p, d1s))
            if i < n - 1:  # UniC on every step but the last
                m_next = run.D(x_t, s_next, i)
                corr = sum(r * d for r, d in zip(rho_c[:-1], d1s)) + rho_c[-1] * (m_next - m0)
                x_t = x_t_ - b_h * corr
            else:
                m_next = None
            xc = x_t
        x = run.out(xc)
        run.emit(i, x, m0)
    return run.finish(x, return_info)
