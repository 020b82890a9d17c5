"""from_discrete / sigmas_from_discrete against exact discrete models (no peer library needed).

Ground truth. For data x₀ ~ N(μ, s²) per coordinate the exact EDM denoiser is
D(x; σ) = μ + s²/(s² + σ²)·(x − μ) (see test_samplers_exact). A DDPM network trained to
optimality on the table ᾱ_t sees z = a·x₀ + b·ε with a = √ᾱ_t, b = √(1 − ᾱ_t), i.e. EDM's
x = z/a at σ_t = b/a, so its heads at timestep t are, in closed form,

    x̂ = D(z/a; σ_t),   ε̂ = (z − a·x̂)/b,   v̂ = a·ε̂ − b·x̂.

``ExactDiscrete`` below computes exactly that from its own σ table (numpy, independent of the
package). At integer t it is the optimal network; at fractional t it uses σ(t) interpolated
linearly in log σ, the continuous extension for which from_discrete's σ ↦ t map is the inverse.
"""

from __future__ import annotations

import gc
import math
import sys
import types
from typing import ClassVar

import numpy as np
import pytest
import torch

from vdmpp.samplers import (
    DiscreteDenoiser,
    ddim,
    ddpm,
    discrete_sigmas,
    edm_stochastic,
    euler,
    from_discrete,
    heun,
    karras_sigmas,
    sigmas_from_discrete,
)

F64 = torch.float64
MU, S = 0.3, 0.5


def linear_table(T: int = 1000) -> torch.Tensor:
    """DDPM's linear β from 1e-4 to 0.02 (Ho et al. 2020), ᾱ_t = Π(1 − β)."""
    betas = torch.linspace(1e-4, 0.02, T, dtype=F64)
    return torch.cumprod(1.0 - betas, 0)


def cosine_table(T: int = 1000, s: float = 0.008) -> torch.Tensor:
    """IDDPM's cosine ᾱ (Nichol & Dhariwal 2021, eq. 17), β clipped at 0.999 as in diffusers."""
    f = [math.cos((i / T + s) / (1 + s) * math.pi / 2) ** 2 for i in range(T + 1)]
    betas = torch.tensor([min(1 - f[i + 1] / f[i], 0.999) for i in range(T)], dtype=F64)
    return torch.cumprod(1.0 - betas, 0)


TABLES = {"linear": linear_table(), "cosine": cosine_table()}


def exact_D(x, sigma):
    sg = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return MU + S**2 / (S**2 + sg**2) * (x - MU)


class ExactDiscrete:
    """The optimal timestep-conditioned network for Gaussian data (see the module docstring)."""

    def __init__(self, abar: torch.Tensor, head: str, integer_only: bool = True):
        a = abar.numpy()
        self.log_sig = 0.5 * np.log((1.0 - a) / a)
        self.head, self.integer_only = head, integer_only
        self.calls: list[torch.Tensor] = []

    def __call__(self, z, t):
        self.calls.append(t.clone())
        tn = t.detach().double().numpy()
        if self.integer_only:
            assert np.array_equal(tn, np.round(tn)), f"non-integer timesteps {tn}"
        sig = torch.tensor(
            np.exp(np.interp(tn, np.arange(len(self.log_sig)), self.log_sig)), dtype=F64
        ).reshape(-1, *([1] * (z.ndim - 1)))
        a = 1.0 / torch.sqrt(1.0 + sig**2)
        b = sig * a
        zd = z.double()
        x0 = exact_D(zd / a, sig.reshape(-1))
        eps = (zd - a * x0) / b
        out = {"eps": eps, "v": a * eps - b * x0, "x": x0}[self.head]
        return out.to(z.dtype)


def _floor(grid: torch.Tensor) -> float:
    """Float64 rounding floor of comparing two Heun runs whose D agree to rounding.

    The eps head's x̂ = x − σ·ε̂ cancels |x| ≈ σ₀ down to O(1), so D carries an absolute
    rounding error ≈ ε·σ₀ at σ₀; Heun's first step moves the Euler point by that much and
    multiplies D's change there by (σ₀ − σ₁)/(2σ₁). Hence ≈ ε·σ₀²/σ₁ (2·10⁻⁸ for the cosine table,
    σ₀ ≈ 2·10⁴, σ₁ ≈ 6.4), and 1e-10 where that is smaller.
    """
    s0, s1 = float(grid[0]), float(grid[1])
    return max(1e-10, 8 * torch.finfo(F64).eps * s0 * s0 / s1)


def _noise(shape=(8, 3), seed=0, dtype=F64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- sampling equals the exact continuous denoiser ---------------------------------------------


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("head", ["eps", "v", "x"])
@pytest.mark.parametrize("quantize", [False, True])
def test_heun_on_table_sigmas_equals_exact_denoiser(table, head, quantize):
    abar = TABLES[table]
    model = ExactDiscrete(abar, head, integer_only=True)
    D = from_discrete(model, abar, head, quantize=quantize)
    noise = _noise()
    for spacing in ("trailing", "leading", "linspace"):
        grid = sigmas_from_discrete(abar, 10, spacing=spacing)
        x, info = heun(D, noise, grid, return_info=True)
        ref = heun(exact_D, noise, grid)
        torch.testing.assert_close(x, ref, rtol=0, atol=_floor(grid))
        assert info.nfe == 19
        for sigma in grid[:-1].tolist():  # each evaluation: equal up to ε·σ (x − σε̂)
            xs = noise * sigma
            err = (D(xs, sigma) - exact_D(xs, sigma)).abs().max().item()
            scale = (1 + sigma) * (1 + xs.abs().max().item() / sigma)
            assert err <= 8 * torch.finfo(F64).eps * scale
    ts = torch.cat(model.calls)
    assert ts.dtype == (torch.int64 if quantize else F64)


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("head", ["eps", "v", "x"])
def test_interpolated_timesteps_are_exact_between_table_entries(table, head):
    """Off-table σ (EDM's ρ-grid): t interpolated in log σ is the inverse of the model's σ(t)."""
    abar = TABLES[table]
    model = ExactDiscrete(abar, head, integer_only=False)
    D = from_discrete(model, abar, head)
    grid = sigmas_from_discrete(abar, 18)
    noise = _noise(seed=1)
    x, ref = heun(D, noise, grid), heun(exact_D, noise, grid)
    torch.testing.assert_close(x, ref, rtol=0, atol=_floor(grid))
    ts = torch.cat(model.calls)
    assert bool((ts != ts.round()).any())  # it did query between entries
    x = _noise((5, 3), seed=2) * 3
    for s in grid[:-1].tolist():
        atol = 8 * torch.finfo(F64).eps * (1 + s) * 4
        torch.testing.assert_close(D(x * s, s), exact_D(x * s, s), rtol=0, atol=atol)


@pytest.mark.parametrize("head", ["eps", "v", "x"])
def test_quantize_queries_the_nearest_entry_and_scales_with_the_true_sigma(head):
    abar = TABLES["linear"]
    model = ExactDiscrete(abar, head, integer_only=True)
    D = from_discrete(model, abar, head, quantize=True)
    log_tab = model.log_sig
    x = _noise((4, 3), seed=3) * 2
    for sigma in [0.0123, 0.5, 1.0, 7.77, 80.0, 150.0]:
        got = D(x, sigma)
        k = int(np.argmin(np.abs(np.log(sigma) - log_tab)))  # nearest in log σ
        assert model.calls[-1].tolist() == [k] * 4 and model.calls[-1].dtype == torch.int64
        alpha = 1.0 / math.sqrt(1.0 + sigma**2)
        sig_p = sigma * alpha
        z = alpha * x
        o = model(z, torch.full((4,), k))
        if head == "eps":
            want = (z - sig_p * o) / alpha
        elif head == "v":
            want = alpha * z - sig_p * o
        else:
            want = o
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("sampler", [euler, ddim, ddpm])
def test_other_samplers_match_on_the_table(sampler):
    abar = TABLES["cosine"]
    D = from_discrete(ExactDiscrete(abar, "v"), abar, "v_prediction")
    grid = sigmas_from_discrete(abar, 12, spacing="trailing")
    noise = _noise(seed=4)
    a = sampler(D, noise, grid, generator=torch.Generator().manual_seed(5))
    b = sampler(exact_D, noise, grid, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=0, atol=_floor(grid))


def test_float32_sampling_stays_in_range_and_close():
    """A float32 σ rounds off the float64 table ends; that must not count as out of range."""
    abar = TABLES["linear"]
    for spacing in ("karras", "trailing"):
        grid = sigmas_from_discrete(abar, 18, spacing=spacing)
        D = from_discrete(ExactDiscrete(abar, "eps", integer_only=False), abar)
        x32 = heun(D, _noise().float(), grid)
        ref = heun(exact_D, _noise(), grid)
        assert x32.dtype == torch.float32
        torch.testing.assert_close(x32.double(), ref, rtol=0, atol=2e-4)


# --- what the model returns -------------------------------------------------------------------


class _Out:
    def __init__(self, sample):
        self.sample = sample


def test_model_returning_an_object_with_sample():
    abar = TABLES["linear"]
    inner = ExactDiscrete(abar, "eps")
    grid = sigmas_from_discrete(abar, 8, spacing="trailing")
    noise = _noise()
    ref = heun(from_discrete(inner, abar), noise, grid)
    for model, output in [
        (lambda z, t: _Out(inner(z, t)), "sample"),  # diffusers' UNet2DOutput
        (lambda z, t: {"sample": inner(z, t)}, "sample"),  # a Mapping
        (lambda z, t: (inner(z, t),), 0),  # return_dict=False
        (lambda z, t: torch.cat([inner(z, t), torch.ones_like(z)], 1), lambda o: o[:, :3]),
    ]:
        x = heun(from_discrete(model, abar, output=output), noise, grid)
        torch.testing.assert_close(x, ref, rtol=0, atol=0)


def test_unextracted_object_and_wrong_shape_are_explained():
    abar = TABLES["linear"]
    inner = ExactDiscrete(abar, "eps", integer_only=False)
    x = _noise((2, 3))
    with pytest.raises(TypeError, match="output='sample'"):
        from_discrete(lambda z, t: _Out(inner(z, t)), abar)(x, 1.0)
    with pytest.raises(ValueError, match=r"learned variances.*out\[:, :C\]"):
        from_discrete(lambda z, t: torch.cat([z, z], 1), abar)(x, 1.0)


def test_extra_args_reach_the_model():
    abar = TABLES["linear"]
    seen = {}

    def model(z, t, encoder_hidden_states=None):
        seen["ehs"] = encoder_hidden_states
        return torch.zeros_like(z)

    D = from_discrete(model, abar)
    heun(D, _noise(), sigmas_from_discrete(abar, 2), extra_args={"encoder_hidden_states": 7})
    assert seen["ehs"] == 7


# --- the σ range ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.002, 1e4])
def test_sigma_outside_the_table_is_an_error_naming_the_range(sigma):
    abar = TABLES["linear"]
    D = from_discrete(ExactDiscrete(abar, "eps"), abar)
    lo, hi = D.sigma_min, D.sigma_max
    assert lo == pytest.approx(math.sqrt(1e-4 / (1 - 1e-4)), rel=1e-12)  # ᾱ_0 = 1 − β_1
    with pytest.raises(ValueError, match=rf"\[{lo:.6g}, {hi:.6g}\]") as e:
        D(_noise((2, 3)), sigma)
    assert "timesteps 0 … 999" in str(e.value)


def test_edm_default_grid_below_a_ddpm_table_is_refused():
    abar = TABLES["linear"]
    D = from_discrete(ExactDiscrete(abar, "eps", integer_only=False), abar)
    with pytest.raises(ValueError, match="sigmas_from_discrete"):
        heun(D, _noise(), karras_sigmas(18))  # σ_min = 0.002 < σ_0 ≈ 0.01


def test_check_range_false_clamps_to_the_table():
    abar = TABLES["linear"]
    model = ExactDiscrete(abar, "eps", integer_only=False)
    D = DiscreteDenoiser(model, abar, check_range=False)
    out = D(_noise((2, 3)), 0.002)
    assert bool(torch.isfinite(out).all())
    assert model.calls[-1].tolist() == [0.0, 0.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_out_of_range_on_an_accelerator_is_nan_and_the_sampler_reports_it():
    abar = TABLES["linear"]
    D = from_discrete(lambda z, t: torch.zeros_like(z), abar)
    x = torch.ones(2, 3, device="cuda")
    out = D(x, torch.tensor([1.0, 0.002], device="cuda"))
    assert bool(torch.isfinite(out[0]).all()) and bool(torch.isnan(out[1]).all())
    with pytest.raises(FloatingPointError):
        heun(D, torch.randn(2, 3, device="cuda"), karras_sigmas(4))
    with pytest.raises(ValueError, match="outside the range"):
        DiscreteDenoiser(D.model, abar, check_range=True)(x, 0.002)


# --- the discrete model's ε̂ (the protocol vdmpp.losses uses) ---------------------------------


@pytest.mark.parametrize("head", ["eps", "v", "x"])
def test_predict_eps_is_the_exact_eps_at_integer_timesteps(head):
    abar = TABLES["cosine"]
    D = from_discrete(ExactDiscrete(abar, head), abar, head)
    t = torch.tensor([0, 10, 500, 998, 999])
    z = _noise((5, 3), seed=6)
    eps_model = ExactDiscrete(abar, "eps")(z, t)
    torch.testing.assert_close(D.predict_eps(z, t), eps_model, rtol=1e-9, atol=1e-9)


def test_discrete_bits_per_dim_through_vdmpp_losses():
    """The adapter is the protocol vdmpp.losses.bits_per_dim accepts (when both are installed)."""
    losses = pytest.importorskip("vdmpp.losses")
    abar = TABLES["linear"]
    inner = ExactDiscrete(abar, "eps")
    x = torch.randint(0, 256, (6, 2, 2, 2), generator=torch.Generator().manual_seed(0)) / 127.5 - 1
    x = x.double()
    D = from_discrete(inner, abar)
    a = losses.bits_per_dim(D, x, generator=torch.Generator().manual_seed(1))
    b = losses.vlb.bits_per_dim_discrete(
        inner, x, abar, generator=torch.Generator().manual_seed(1)
    )
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


# --- grids -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spacing, offset, want",
    [  # Lin et al. 2024, Table 2 (T = 1000, 10 steps; 0-indexed as diffusers), SD's offset 1
        ("trailing", 0, [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
        ("leading", 0, [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
        ("leading", 1, [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]),
        ("linspace", 0, [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
    ],
)
def test_ddim_spacings_pick_the_published_timesteps(spacing, offset, want):
    abar = TABLES["linear"]
    grid = sigmas_from_discrete(abar, 10, spacing=spacing, offset=offset)
    sig = torch.sqrt((1 - abar) / abar)
    torch.testing.assert_close(grid, torch.cat([sig[want], torch.zeros(1, dtype=F64)]))


def test_karras_spacing_is_edm_grid_clipped_to_the_table():
    abar = TABLES["linear"]
    sig = discrete_sigmas(abar)
    lo, hi = float(sig[0]), float(sig[-1])
    g = sigmas_from_discrete(abar, 18)
    assert g[0] == hi and g[-2] == lo and g[-1] == 0
    torch.testing.assert_close(g, karras_sigmas(18, lo, hi), rtol=1e-13, atol=0)
    g = sigmas_from_discrete(abar, 18, sigma_min=0.002, sigma_max=80.0)  # EDM's defaults
    assert g[0] == 80.0 and g[-2] == lo  # 80 lies inside, 0.002 is clipped up to σ_0
    torch.testing.assert_close(g, karras_sigmas(18, lo, 80.0), rtol=1e-13, atol=0)
    assert bool((g[:-1] >= lo).all()) and bool((g[:-1] <= hi).all())


def test_grid_and_table_errors():
    abar = TABLES["linear"]
    with pytest.raises(ValueError, match="n <= T"):
        sigmas_from_discrete(abar[:5], 6, spacing="trailing")
    with pytest.raises(ValueError, match="unknown spacing"):
        sigmas_from_discrete(abar, 4, spacing="uniform")
    with pytest.raises(ValueError, match="strictly decreasing"):
        from_discrete(lambda z, t: z, abar.flip(0))
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        from_discrete(lambda z, t: z, torch.cat([abar, torch.zeros(1, dtype=F64)]))
    with pytest.raises(ValueError, match="unknown parameterization"):
        from_discrete(lambda z, t: z, abar, "score")


# --- progress= ----------------------------------------------------------------------------------


class _FakeBar:
    made: ClassVar[list[_FakeBar]] = []

    def __init__(self, total, desc, unit, leave):
        self.total, self.n, self.postfix, self.closed = total, 0, None, False
        _FakeBar.made.append(self)

    def update(self, k):
        self.n += k

    def set_postfix(self, refresh=True, **kw):
        self.postfix = kw

    def close(self):
        self.closed = True


@pytest.mark.parametrize("sampler", [euler, heun, edm_stochastic, ddpm, ddim])
def test_progress_bar_counts_steps_and_nfe(sampler, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", types.ModuleType("tqdm"))
    monkeypatch.setitem(sys.modules, "tqdm.auto", types.SimpleNamespace(tqdm=_FakeBar))
    _FakeBar.made.clear()
    grid = karras_sigmas(6)
    def gen():
        return torch.Generator().manual_seed(3)

    x, info = sampler(exact_D, _noise(), grid, generator=gen(), progress=True, return_info=True)
    (bar,) = _FakeBar.made
    assert bar.total == bar.n == info.steps == 6 and bar.closed
    assert bar.postfix == {"nfe": info.nfe}
    torch.testing.assert_close(x, sampler(exact_D, _noise(), grid, generator=gen()), rtol=0, atol=0)
    _FakeBar.made.clear()
    sampler(exact_D, _noise(), grid, generator=gen())  # progress=False never asks for tqdm
    assert _FakeBar.made == []


def test_progress_without_tqdm_is_silent(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import tqdm.auto → ImportError
    x = heun(exact_D, _noise(), karras_sigmas(4), progress=True)
    torch.testing.assert_close(x, heun(exact_D, _noise(), karras_sigmas(4)), rtol=0, atol=0)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_progress_bar_closes_when_the_denoiser_raises(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", types.SimpleNamespace(tqdm=_FakeBar))
    _FakeBar.made.clear()

    def bad(x, sigma):
        return x * float("nan")

    raised = False
    try:
        heun(bad, _noise(), karras_sigmas(4), progress=True)
    except FloatingPointError:
        raised = True
    gc.collect()  # the suspended step generator is closed once the traceback is gone
    assert raised and _FakeBar.made[0].closed
