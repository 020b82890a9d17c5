"""Models from elsewhere: a timestep-conditioned DDPM-style network as an EDM denoiser D(x; σ).

A DDPM/IDDPM or diffusers-style network ``model(z, t, **kwargs)`` was trained on a table
``alphas_cumprod`` = ᾱ_t, t = 0 … T − 1, with z_t = √ᾱ_t·x + √(1 − ᾱ_t)·ε (VP, Ho et al. 2020).
In log-SNR, λ_t = log(ᾱ_t/(1 − ᾱ_t)) (VDM eq. 2), and EDM's noise level of that entry is

    σ_t = e^{−λ_t/2} = √((1 − ᾱ_t)/ᾱ_t)                                    (EDM Table 1, "VP")

because EDM's x = z/α = x₀ + (σ_p/α)·ε with (α, σ_p) = (√ᾱ, √(1 − ᾱ)).

**The denoiser** (EDM eq. 4 with s = α: a VP model sees its input scaled by α). Given EDM's
x = x₀ + σn at a σ in the table's range, :class:`DiscreteDenoiser`

1. finds the timestep of σ: the table's log σ_t is increasing in t; σ between σ_k and σ_{k+1}
   maps to the fractional t = k + (log σ − log σ_k)/(log σ_{k+1} − log σ_k) (linear in log σ,
   as k-diffusion's ``DiscreteSchedule``), or, with ``quantize=True``, to the entry nearest in
   log σ (the integer timestep a DDPM network was trained on);
2. calls the network on the VP input z = α·x with α = 1/√(1 + σ²) and σ_p = σα
   (α² + σ_p² = 1 and σ_p/α = σ, so z = αx₀ + σ_p n is exactly q(z_t|x₀) at that σ);
3. turns the output o into x̂ by the definitions of the three heads (VDM++ App. E.2, D.2), using
   the σ of the call (not the quantized entry's σ):

   ==========  ==========================  ======================================================
   head        the network predicts        x̂
   ==========  ==========================  ======================================================
   ``eps``     ε (z = αx₀ + σ_p ε)         (z − σ_p·o)/α = x − σ·o
   ``v``       v = αε − σ_p x₀             α z − σ_p·o = α(z − σ·o)   (uses α² + σ_p² = 1)
   ``x``       x₀                          o
   ==========  ==========================  ======================================================

   (diffusers' names ``epsilon``, ``v_prediction`` and ``sample`` are accepted too).

Where σ is a table entry σ_t the network is queried at exactly its training condition, so for a
network that is exact on the table, D equals the exact denoiser E[x₀ | x] at every σ_t; a grid
made of table entries (``sigmas_from_discrete`` with a DDIM spacing) then samples with the same
iterates as the exact continuous denoiser. **Noise scaling:** like every vdmpp sampler, pass unit
noise; sampling starts from ``noise * sigmas[0]`` (k-diffusion's samplers instead take x already
multiplied by σ₀, diffusers' schedulers start from unit-variance z).

**σ outside [σ_0, σ_{T−1}]** (e.g. EDM's default σ_min = 0.002 below a DDPM table's σ_0 ≈ 0.01)
has no timestep: ``D(x, σ)`` raises a ``ValueError`` that names the range when σ is on the CPU.
On an accelerator the check would cost a host sync per call, so by default the out-of-range
entries of x̂ become NaN instead, which a vdmpp sampler's ``check_finite`` reports once at the end;
``check_range=True`` raises everywhere (one sync per call), ``False`` clamps σ to the table.

**Likelihood.** ``predict_eps(z, t)`` returns ε̂ at integer timesteps in VP units; with
``alphas_cumprod`` it is the small protocol through which ``vdmpp.losses.bits_per_dim`` computes
VDM's discrete-time bound with T from the table (vdmpp-losses does not import this package).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from vdmpp.schedules import logsnr_from_sigma, vp

from .grids import karras_sigmas

__all__ = [
    "DISCRETE_PARAMETERIZATIONS",
    "DiscreteDenoiser",
    "discrete_sigmas",
    "from_discrete",
    "sigmas_from_discrete",
]

DISCRETE_PARAMETERIZATIONS = ("eps", "v", "x")
_ALIASES = {"epsilon": "eps", "v_prediction": "v", "sample": "x"}
SPACINGS = ("karras", "trailing", "leading", "linspace")

Output = str | int | Callable[[Any], Tensor] | None


def _table(alphas_cumprod: Tensor | Sequence[float]) -> Tensor:
    """Validate ᾱ and return it as a float64 CPU tensor."""
    if isinstance(alphas_cumprod, Tensor):
        a = alphas_cumprod.detach().to("cpu", torch.float64)
    else:
        a = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    if a.ndim != 1 or a.numel() < 2:
        raise ValueError(
            "alphas_cumprod must be a 1-D table with at least 2 entries, "
            f"got shape {tuple(a.shape)}"
        )
    if not bool(torch.isfinite(a).all()) or not bool(((a > 0) & (a < 1)).all()):
        bad = a[~(torch.isfinite(a) & (a > 0) & (a < 1))][:3].tolist()
        raise ValueError(
            "alphas_cumprod must lie strictly inside (0, 1) (σ = √((1 − ᾱ)/ᾱ) must be finite "
            f"and > 0); got values such as {bad}. A zero-terminal-SNR table ends in ᾱ = 0: "
            "drop that entry (its σ is infinite)"
        )
    if not bool((a[1:] < a[:-1]).all()):
        i = int(torch.nonzero(a[1:] >= a[:-1])[0]) + 1
        raise ValueError(
            "alphas_cumprod must be strictly decreasing in t (more noise at larger t); "
            f"alphas_cumprod[{i}] = {a[i].item():.6g} >= alphas_cumprod[{i - 1}] = "
            f"{a[i - 1].item():.6g}"
        )
    return a


def _log_sigmas(a: Tensor) -> Tensor:
    """log σ_t = ½(log(1 − ᾱ_t) − log ᾱ_t), via log1p (float64)."""
    return 0.5 * (torch.log1p(-a) - torch.log(a))


def discrete_sigmas(alphas_cumprod: Tensor | Sequence[float]) -> Tensor:
    """EDM's σ_t = √((1 − ᾱ_t)/ᾱ_t) of every table entry, increasing in t (float64, CPU)."""
    return torch.exp(_log_sigmas(_table(alphas_cumprod)))


def _canonical(parameterization: str) -> str:
    p = _ALIASES.get(parameterization, parameterization)
    if p not in DISCRETE_PARAMETERIZATIONS:
        raise ValueError(
            f"unknown parameterization {parameterization!r} for a discrete model; expected one of "
            f"{DISCRETE_PARAMETERIZATIONS} (or diffusers' {tuple(_ALIASES)})"
        )
    return p


class DiscreteDenoiser:
    """D(x, σ, **kwargs) from a timestep-conditioned network (see the module docstring).

    ``model(z, t, **kwargs)``: z in VP units, t of shape [B] (float timesteps, or int64 with
    ``quantize=True``); ``kwargs`` of the denoiser call (a sampler's ``extra_args``, e.g.
    ``encoder_hidden_states=...``) are passed through. ``output`` extracts the prediction from
    what the model returns: None (a tensor), an attribute or key name (``"sample"`` for
    diffusers), an index (``0`` for a tuple) or a callable (``lambda out: out[:, :3]`` for a
    model with learned variances, whose output holds ε̂ and the variance channels).

    Attributes: ``alphas_cumprod`` and ``sigmas`` (float64 CPU, per timestep), ``sigma_min`` and
    ``sigma_max`` (the valid range), ``num_timesteps`` (T).
    """

    def __init__(
        self,
        model: Callable[..., Any],
        alphas_cumprod: Tensor | Sequence[float],
        parameterization: str = "eps",
        *,
        quantize: bool = False,
        output: Output = None,
        check_range: bool | None = None,
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        if output is not None and not isinstance(output, (str, int)) and not callable(output):
            raise TypeError(
                "output must be None, an attribute/key name, an index or a callable, "
                f"got {output!r}"
            )
        self.model = model
        self.parameterization = _canonical(parameterization)
        self.quantize = bool(quantize)
        self.output = output
        self.check_range = check_range
        self.alphas_cumprod = _table(alphas_cumprod)
        self.log_sigmas = _log_sigmas(self.alphas_cumprod)
        self.sigmas = torch.exp(self.log_sigmas)
        self.num_timesteps = int(self.alphas_cumprod.numel())
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = float(self.sigmas[-1])
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    # -- tables on the device ------------------------------------------------------------------
    def _tables(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(log σ_t, ᾱ_t) on ``device`` in ``dtype``, copied once per (device, dtype)."""
        key = (device, dtype)
        if key not in self._cache:  # log of σ_t as rounded to dtype: a σ equal to σ_t gives t
            self._cache[key] = (
                torch.log(self.sigmas.to(device=device, dtype=dtype)),
                self.alphas_cumprod.to(device=device, dtype=dtype),
            )
        return self._cache[key]

    def _range_error(self, sigma: Tensor, bad: Tensor) -> ValueError:
        vals = sigma[bad][:3].tolist()
        return ValueError(
            f"sigma {', '.join(f'{v:g}' for v in vals)} is outside the range of the model's "
            f"alphas_cumprod table: sigma must lie in [{self.sigma_min:.6g}, {self.sigma_max:.6g}] "
            f"(timesteps 0 … {self.num_timesteps - 1}); build the grid with "
            "sigmas_from_discrete(alphas_cumprod, n) or clip it to that range"
        )

    def sigma_to_t(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(t, in_range) for σ of shape [B]: the fractional (or, quantized, int64) timestep.

        t = k + (log σ − log σ_k)/(log σ_{k+1} − log σ_k) on the segment holding σ; a σ that
        equals a table entry gives exactly its integer t. ``in_range``: σ within [σ_0, σ_{T−1}]
        up to a few float ulps (σ outside is clamped to the end of the table).
        """
        dtype = torch.float64 if sigma.dtype == torch.float64 else torch.float32
        s = sigma.to(dtype)
        log_t, _ = self._tables(s.device, dtype)
        ls = torch.log(s)
        tol = 64.0 * torch.finfo(dtype).eps
        in_range = (ls >= log_t[0] - tol) & (ls <= log_t[-1] + tol)
        hi = torch.searchsorted(log_t, ls.contiguous()).clamp(1, self.num_timesteps - 1)
        lo = hi - 1
        w = ((ls - log_t[lo]) / (log_t[hi] - log_t[lo])).clamp(0.0, 1.0)
        if self.quantize:  # nearest entry in log σ (ties to the smaller t)
            return torch.where(w > 0.5, hi, lo), in_range
        return lo.to(dtype) + w, in_range

    # -- the network ---------------------------------------------------------------------------
    def _extract(self, out: Any, like: Tensor) -> Tensor:
        o = self.output
        if o is None:
            r = out
        elif isinstance(o, str):
            r = out[o] if isinstance(out, Mapping) else getattr(out, o)
        elif isinstance(o, int):
            r = out[o]
        else:
            r = o(out)
        if not isinstance(r, Tensor):
            hint = (
                "; pass output='sample' (diffusers), an index or a callable to from_discrete"
                if o is None
                else ""
            )
            raise TypeError(f"the model returned {type(r).__name__}, not a tensor{hint}")
        if r.shape != like.shape:
            raise ValueError(
                f"the model's prediction has shape {tuple(r.shape)} for an input of shape "
                f"{tuple(like.shape)}; a model with learned variances returns ε̂ and the variance "
                "channels together: pass output=lambda out: out[:, :C] with C input channels"
            )
        return r

    def predict(self, z: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        """The network's raw prediction at (z, t), extracted by ``output``."""
        return self._extract(self.model(z, t, **kwargs), z)

    def predict_eps(self, z: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        """ε̂ at integer timesteps t ([B]) for z in VP units (a = √ᾱ_t, b = √(1 − ᾱ_t)).

        eps: o; v: ε = b z + a v (from z = a x + b ε and v = a ε − b x, a² + b² = 1);
        x: ε̂ = (z − a o)/b. Float32 math (float64 for float64 z), result in z's dtype.
        """
        ct = torch.float64 if z.dtype == torch.float64 else torch.float32
        _, abar = self._tables(z.device, ct)
        ti = torch.as_tensor(t, device=z.device)
        if ti.ndim == 0:
            ti = ti.expand(z.shape[0])
        shape = (-1,) + (1,) * (z.ndim - 1)
        ab = abar[ti.long()].reshape(shape)
        a, b = ab.sqrt(), (1.0 - ab).sqrt()
        o = self.predict(z, ti, **kwargs).to(ct)
        zc = z.to(ct)
        if self.parameterization == "eps":
            eps = o
        elif self.parameterization == "v":
            eps = b * zc + a * o
        else:
            eps = (zc - a * o) / b
        return eps.to(z.dtype)

    def __call__(self, x: Tensor, sigma: Tensor | float, **kwargs: Any) -> Tensor:
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32
        s = torch.as_tensor(sigma, device=x.device, dtype=ct)
        if s.ndim == 0:
            s = s.expand(x.shape[0])
        s = s.reshape(-1)
        t, in_range = self.sigma_to_t(s)
        mark_nan = False
        if self.check_range is not False:
            host = s.device.type == "cpu" and not torch.compiler.is_compiling()
            if self.check_range or host:
                if not bool(in_range.all()):
                    raise self._range_error(s, ~in_range)
            else:
                mark_nan = True
        col = s.reshape(-1, *([1] * (x.ndim - 1)))
        alpha, sig_p = vp(logsnr_from_sigma(col))  # α = 1/√(1+σ²), σ_p = σα
        xc = x.to(ct)
        z = (alpha * xc).to(x.dtype)
        o = self.predict(z, t, **kwargs).to(ct)
        if self.parameterization == "eps":
            x0 = xc - col * o
        elif self.parameterization == "v":
            x0 = alpha * (alpha * xc) - sig_p * o
        else:
            x0 = o
        if mark_nan:
            x0 = torch.where(in_range.reshape(col.shape), x0, torch.full_like(x0, math.nan))
        return x0.to(x.dtype)

    def __repr__(self) -> str:
        return (
            f"from_discrete({self.model!r}, <alphas_cumprod: T={self.num_timesteps}, "
            f"sigma {self.sigma_min:.4g}…{self.sigma_max:.4g}>, {self.parameterization!r}, "
            f"quantize={self.quantize}, output={self.output!r})"
        )


def from_discrete(
    model: Callable[..., Any],
    alphas_cumprod: Tensor | Sequence[float],
    parameterization: str = "eps",
    *,
    quantize: bool = False,
    output: Output = None,
) -> DiscreteDenoiser:
    """Wrap a timestep-conditioned DDPM-style ``model(z, t, **kw)`` into a denoiser D(x, σ).

    ``alphas_cumprod``: the model's ᾱ_t table (e.g. a diffusers scheduler's
    ``alphas_cumprod``); ``parameterization``: ``eps``, ``v`` or ``x`` (diffusers:
    ``epsilon``, ``v_prediction``, ``sample``); ``quantize``: round σ to the nearest table entry
    instead of interpolating t in log σ; ``output``: how to get the tensor from what the model
    returns (``"sample"`` for diffusers). See :class:`DiscreteDenoiser` and the module docstring
    for the scaling (EDM eq. 4, VP: z = x/√(1 + σ²)) and the σ range check.
    """
    return DiscreteDenoiser(
        model, alphas_cumprod, parameterization, quantize=quantize, output=output
    )


def _timesteps(spacing: str, T: int, n: int, offset: int) -> list[int]:
    """Decreasing integer timesteps of the DDIM-style spacings (as diffusers computes them)."""
    if spacing == "trailing":  # Lin et al. 2024, Table 2: round(T − k·T/n) − 1
        ts = [round(T - k * T / n) - 1 for k in range(n)]
    elif spacing == "leading":  # DDIM: (n−1)·⌊T/n⌋, …, ⌊T/n⌋, 0 (+ offset)
        step = T // n
        ts = [k * step + offset for k in reversed(range(n))]
    else:  # linspace: round(linspace(0, T − 1, n)), reversed
        ts = [round(v) for v in torch.linspace(0, T - 1, n, dtype=torch.float64).tolist()][::-1]
    if any(not 0 <= t < T for t in ts):
        raise ValueError(f"timesteps {ts[:3]}… leave the table 0 … {T - 1} (check offset)")
    return ts


def sigmas_from_discrete(
    alphas_cumprod: Tensor | Sequence[float],
    n: int,
    *,
    spacing: str = "karras",
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    offset: int = 0,
) -> Tensor:
    """A grid of n noise levels inside the table's σ range, then σ = 0 (float64, CPU).

    ``spacing``:

    * ``"karras"``: EDM's ρ-grid (EDM eq. 5) from σ_max to σ_min, each defaulting to the table's
      σ_{T−1} / σ_0 and clipped to [σ_0, σ_{T−1}] (so EDM's 0.002 / 80 become the table's ends
      where they lie outside it). Off-table levels: the denoiser interpolates (or quantizes) t.
    * ``"trailing"``: timesteps round(T − kT/n) − 1, k = 0 … n − 1 (starts at T − 1; diffusers'
      "trailing", Lin et al. 2024).
    * ``"leading"``: k·⌊T/n⌋ + offset, k = n − 1 … 0 (DDIM / diffusers' "leading"; Stable
      Diffusion uses offset=1).
    * ``"linspace"``: round(linspace(0, T − 1, n)) reversed.

    The DDIM-style spacings return the σ of exact table entries, where the network is queried at
    its training timesteps. n may not exceed T for them (the levels must be distinct).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"need n >= 1 steps, got {n!r}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")
    a = _table(alphas_cumprod)
    sig = torch.exp(_log_sigmas(a))
    T = int(a.numel())
    lo, hi = float(sig[0]), float(sig[-1])
    if spacing == "karras":
        s_min = lo if sigma_min is None else min(max(float(sigma_min), lo), hi)
        s_max = hi if sigma_max is None else min(max(float(sigma_max), lo), hi)
        if not s_min <= s_max:
            raise ValueError(f"need sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
        grid = karras_sigmas(n, s_min, s_max, rho)
        grid[:-1] = grid[:-1].clamp(s_min, s_max)  # the ρ-power round trip may leave σ by an ulp
        grid[0] = s_max
        if n > 1:
            grid[-2] = s_min
        return grid
    if n > T:
        raise ValueError(f"spacing {spacing!r} needs n <= T = {T} distinct timesteps, got n = {n}")
    if offset and spacing != "leading":
        raise ValueError("offset applies to spacing='leading' only")
    ts = _timesteps(spacing, T, n, int(offset))
    if any(ts[i] <= ts[i + 1] for i in range(len(ts) - 1)):
        raise ValueError(f"spacing {spacing!r} with n = {n} repeats a timestep; use a smaller n")
    return torch.cat([sig[torch.tensor(ts)], sig.new_zeros(1)])
