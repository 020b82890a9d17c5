"""Guidance (CFG, autoguidance, guidance interval) against exact denoisers of Gaussian data.

Ground truth, derived here and not from the implementation:

* Class c of the two-class mixture is N(mu_c, s² I). Its exact denoiser is
  D_c(x, σ) = mu_c + s²/(s² + σ²)·(x − mu_c), and the unconditional one is the posterior-weighted
  mixture D_u = Σ_k r_k(x, σ)·D_k with r_k ∝ π_k N(x; mu_k, (s² + σ²) I). Hence
  D_c − D_u = σ²/(s² + σ²)·Σ_k r_k (mu_c − mu_k), so CFG is
  D_u + w·σ²/(s² + σ²)·Σ_k r_k (mu_c − mu_k).
* With a reference of the *same* variance, N(m_r, s² I), the guided denoiser
  D_r + w(D_c − D_r) = m_w + s²/(s² + σ²)(x − m_w), m_w = m_r + w(mu_c − m_r), is the exact
  denoiser of N(m_w, s² I). Its PF-ODE dx/dσ = (x − D)/σ = (x − m_w)·σ/(s² + σ²) has the solution
  x(σ) − m_w = (x(σ') − m_w)·√((s² + σ²)/(s² + σ'²)); piecewise in σ for an interval.
"""

from __future__ import annotations

import math

import pytest
import torch

import vdmpp.samplers.denoiser as denoiser_module
from vdmpp.samplers import (
    Guided,
    ddim,
    ddpm,
    edm_stochastic,
    euler,
    guided,
    heun,
    karras_sigmas,
)

F64 = torch.float64
S = 0.4  # per-class standard deviation
MU = torch.tensor([[-1.0, 0.5], [1.5, -0.3]], dtype=F64)  # class means, 2-D data
PI = torch.tensor([0.35, 0.65], dtype=F64)


def col(sigma, x):
    s = torch.as_tensor(sigma, dtype=x.dtype)
    return (s.expand(x.shape[0]) if s.ndim == 0 else s).reshape(-1, *([1] * (x.ndim - 1)))


def gaussian_denoiser(x, sigma, mean):
    """Exact denoiser of N(mean, S² I); ``mean`` broadcasts against x."""
    sg2 = col(sigma, x) ** 2
    return mean + S**2 / (S**2 + sg2) * (x - mean)


def posterior(x, sigma):
    """r_k(x, σ) ∝ π_k N(x; mu_k, (S² + σ²) I), shape [B, 2]."""
    var = S**2 + col(sigma, x) ** 2  # [B, 1]
    sq = ((x[:, None, :] - MU[None]) ** 2).sum(-1)  # [B, 2]
    logits = PI.log() - 0.5 * sq / var
    r1 = torch.sigmoid(logits[:, 1] - logits[:, 0])  # two classes (softmax is slow on CPU here)
    return torch.stack([1 - r1, r1], dim=1)


def mixture_denoiser(x, sigma, class_labels=None):
    """Class-conditional exact denoiser; class_labels=None is the exact unconditional one."""
    if class_labels is None:
        r = posterior(x, sigma)
        d_k = torch.stack([gaussian_denoiser(x, sigma, MU[k]) for k in range(2)], dim=1)
        return (r[..., None] * d_k).sum(1)
    return gaussian_denoiser(x, sigma, MU[class_labels])


def cfg_closed_form(x, sigma, y, w):
    """D_u + w·σ²/(s² + σ²)·Σ_k r_k (mu_c − mu_k): the derivation in the module docstring."""
    sg2 = col(sigma, x) ** 2
    r = posterior(x, sigma)
    pull = (r[..., None] * (MU[y][:, None, :] - MU[None])).sum(1)
    return mixture_denoiser(x, sigma) + w * sg2 / (S**2 + sg2) * pull


class Recorder:
    """Wraps a denoiser and records every call's σ and keyword arguments."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, sigma, **kwargs):
        self.calls.append((sigma, kwargs))
        return self.fn(x, sigma, **kwargs)


def batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 2.0 * torch.randn(n, 2, generator=g, dtype=F64)
    sigma = torch.exp(
        torch.empty(n, dtype=F64).uniform_(math.log(0.01), math.log(20.0), generator=g)
    )
    y = torch.randint(0, 2, (n,), generator=g)
    return x, sigma, y


# --- the guided denoiser ---------------------------------------------------------------------
@pytest.mark.parametrize("w", [0.0, 0.5, 1.0, 2.0, 3.5, -0.5])
def test_cfg_is_du_plus_w_times_dc_minus_du(w):
    x, sigma, y = batch()
    d_c, d_u = mixture_denoiser(x, sigma, y), mixture_denoiser(x, sigma)
    got = guided(mixture_denoiser, w)(x, sigma, class_labels=y)
    expected = d_c if w == 1.0 else d_u if w == 0.0 else d_u + w * (d_c - d_u)
    assert torch.equal(got, expected)  # bit for bit: the formula, evaluated once each
    torch.testing.assert_close(got, cfg_closed_form(x, sigma, y, w), rtol=1e-12, atol=1e-12)


def test_cfg_with_a_separate_unconditional_denoiser():
    x, sigma, y = batch(seed=1)

    def uncond(x, sigma):  # takes no class_labels: guided must not pass them
        return mixture_denoiser(x, sigma)

    for G in (guided(mixture_denoiser, 2.5, uncond=uncond), guided(mixture_denoiser, uncond, 2.5)):
        torch.testing.assert_close(
            G(x, sigma, class_labels=y), cfg_closed_form(x, sigma, y, 2.5), rtol=1e-12, atol=1e-12
        )


def test_autoguidance_guide_receives_the_same_conditioning():
    x, sigma, y = batch(seed=2)
    delta = torch.tensor([0.3, -0.2], dtype=F64)
    main = Recorder(
        lambda x, s, class_labels, extra=None: gaussian_denoiser(x, s, MU[class_labels])
    )
    guide = Recorder(
        lambda x, s, class_labels, extra=None: gaussian_denoiser(x, s, MU[class_labels] - delta)
    )
    w = 2.0
    got = guided(main, w, guide=guide)(x, sigma, class_labels=y, extra="e")
    for rec in (main, guide):
        assert len(rec.calls) == 1
        assert rec.calls[0][1]["class_labels"] is y and rec.calls[0][1]["extra"] == "e"
    # equal variances: the guided denoiser is the exact one of N(mu_c + (w − 1)·delta, S² I)
    expected = gaussian_denoiser(x, sigma, MU[y] + (w - 1) * delta)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_guide_receives_class_labels_through_a_sampler():
    _, _, y = batch(8, seed=3)
    guide = Recorder(mixture_denoiser)
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    heun(guided(mixture_denoiser, 2.0, guide=guide), noise, karras_sigmas(6),
         extra_args={"class_labels": y})  # fmt: skip
    assert len(guide.calls) == 11 and all(kw["class_labels"] is y for _, kw in guide.calls)


# --- the guided PF-ODE -----------------------------------------------------------------------
def ode_then_denoise(x_t, sigma_from, stages, sigma_min):
    """Closed form of the PF-ODE through Gaussian stages [(sigma_to, mean), ...] down to
    ``sigma_min``, then the last grid step to σ = 0 (an Euler step, x₀ = D(x; σ_min))."""
    x, s_from = x_t, sigma_from
    for s_to, mean in stages:
        x = mean + (x - mean) * math.sqrt((S**2 + s_to**2) / (S**2 + s_from**2))
        s_from = s_to
    mean = stages[-1][1]
    return mean + S**2 / (S**2 + sigma_min**2) * (x - mean)


@pytest.mark.parametrize("kind", ["uncond", "guide"])
def test_guided_heun_lands_on_the_closed_form(kind):
    """Equal-variance reference: the guided ODE is that of N(m_w, S² I)."""
    n = 16
    y = torch.arange(n) % 2
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    w, mu_c = 2.5, MU[y]
    if kind == "uncond":  # CFG with an unconditional Gaussian N(m_u, S²)
        m_r = torch.tensor([0.2, 0.1], dtype=F64)
        G = guided(
            lambda x, s, class_labels: gaussian_denoiser(x, s, MU[class_labels]),
            w, uncond=lambda x, s: gaussian_denoiser(x, s, m_r),
        )  # fmt: skip
    else:  # autoguidance with a biased guide of the same class (it needs the labels)
        delta = torch.tensor([0.3, -0.2], dtype=F64)
        m_r = mu_c - delta
        G = guided(
            lambda x, s, class_labels: gaussian_denoiser(x, s, MU[class_labels]),
            w, guide=lambda x, s, class_labels: gaussian_denoiser(x, s, MU[class_labels] - delta),
        )  # fmt: skip
    m_w = m_r + w * (mu_c - m_r)
    sigma_max, sigma_min = 80.0, 0.002
    expected = ode_then_denoise(noise * sigma_max, sigma_max, [(sigma_min, m_w)], sigma_min)
    errs = []
    for steps in (256, 512):
        x0 = heun(
            G, noise, karras_sigmas(steps, sigma_min, sigma_max), extra_args={"class_labels": y}
        )
        errs.append((x0 - expected).abs().max().item())
    assert errs[1] < 1e-4  # |x₀| ≈ 4, from x_T = 80·noise
    assert 3.5 < errs[0] / errs[1] < 4.5  # Heun's second order: the error is the method's
    unguided = ode_then_denoise(noise * sigma_max, sigma_max, [(sigma_min, mu_c)], sigma_min)
    assert (unguided - expected).abs().max() > 1000 * errs[1]  # and guidance moved it


def rk4_log_sigma(field, x, sigma_from, sigma_to, steps):
    """Classical RK4 on dx/dt = σ·dx/dσ = x − D(x, σ) with t = log σ (independent of heun)."""
    t0, t1 = math.log(sigma_from), math.log(sigma_to)
    h = (t1 - t0) / steps
    f = lambda t, x: x - field(x, math.exp(t))
    t = t0
    for _ in range(steps):
        k1 = f(t, x)
        k2 = f(t + h / 2, x + h / 2 * k1)
        k3 = f(t + h / 2, x + h / 2 * k2)
        k4 = f(t + h, x + h * k3)
        x, t = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), t + h
    return x


def test_cfg_heun_on_the_mixture_matches_rk4_of_the_closed_form_field():
    n = 16
    y = torch.arange(n) % 2
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    w, sigma_max, sigma_min = 3.0, 40.0, 0.01
    field = lambda x, s: cfg_closed_form(x, torch.full((n,), s, dtype=F64), y, w)
    x_min = rk4_log_sigma(field, noise * sigma_max, sigma_max, sigma_min, 800)
    expected = field(x_min, sigma_min)  # the last grid step to σ = 0 is x₀ = D(x; σ_min)
    errs = []  # RK4 at 800 steps agrees with 400 steps to 7e-8: the reference is converged
    for steps in (256, 512):
        x0 = heun(guided(mixture_denoiser, w), noise, karras_sigmas(steps, sigma_min, sigma_max),
                  extra_args={"class_labels": y})  # fmt: skip
        errs.append((x0 - expected).abs().max().item())
    assert errs[1] < 5e-5
    assert 3.5 < errs[0] / errs[1] < 4.5  # Heun's second order towards the same endpoint
    # CFG at w = 3 concentrates samples near their class means
    assert ((x0 - MU[y]).norm(dim=1) < 3 * S).all()


# --- the interval ----------------------------------------------------------------------------
LO, HI = 0.5, 2.0


def _edges():
    up = lambda v: math.nextafter(v, math.inf)
    down = lambda v: math.nextafter(v, -math.inf)
    #       σ           guided?   (open below, closed above: (LO, HI])
    return [(down(LO), False), (LO, False), (up(LO), True), (1.0, True), (down(HI), True),
            (HI, True), (up(HI), False), (10.0, False)]  # fmt: skip


@pytest.mark.parametrize("how", ["float", "tensor", "hint"])
def test_interval_switches_exactly_at_its_edges(how):
    x, _, y = batch(8, seed=6)
    G = guided(mixture_denoiser, 2.0, interval=(LO, HI))
    for s, inside in _edges():
        st = torch.full((8,), s, dtype=F64)
        if how == "float":
            d, nfe = G.call_counted(x, s, class_labels=y)
        elif how == "tensor":
            d, nfe = G.call_counted(x, st, class_labels=y)
        else:
            d, nfe = G.call_counted(x, st, sigma_value=s, class_labels=y)
        expected = cfg_closed_form(x, st, y, 2.0) if inside else mixture_denoiser(x, st, y)
        torch.testing.assert_close(d, expected, rtol=1e-12, atol=1e-12, msg=f"sigma={s!r}")
        assert nfe == (2 if inside else 1), s
        if not inside:
            assert torch.equal(d, mixture_denoiser(x, st, y))  # exactly D_c outside


def test_interval_with_per_sample_sigmas():
    x, _, _ = batch(len(_edges()), seed=7)
    y = torch.arange(len(_edges())) % 2
    s = torch.tensor([e[0] for e in _edges()], dtype=F64)
    inside = torch.tensor([e[1] for e in _edges()])
    cond = Recorder(mixture_denoiser)
    d, nfe = guided(cond, 2.0, interval=(LO, HI)).call_counted(x, s, class_labels=y)
    expected = torch.where(
        inside[:, None], cfg_closed_form(x, s, y, 2.0), mixture_denoiser(x, s, y)
    )
    torch.testing.assert_close(d, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(d[~inside], mixture_denoiser(x, s, y)[~inside])
    assert nfe == 2 == len(cond.calls)  # mixed batch: both branches on the whole batch
    # all outside, all inside: one branch / both, read from the CPU tensor
    for sig, n in ((torch.full_like(s, 5.0), 1), (torch.full_like(s, 1.0), 2)):
        cond.calls.clear()
        assert guided(cond, 2.0, interval=(LO, HI)).call_counted(x, sig, class_labels=y)[1] == n
        assert len(cond.calls) == n


def test_interval_without_reading_the_tensor(monkeypatch):
    """An accelerator tensor is never read on the host: both branches + torch.where, n = 2."""
    monkeypatch.setattr(denoiser_module, "_host_readable", lambda t: False)
    x, _, y = batch(8, seed=8)
    G = guided(mixture_denoiser, 2.0, interval=(LO, HI))
    for s, inside in _edges():
        st = torch.full((8,), s, dtype=F64)
        d, nfe = G.call_counted(x, st, class_labels=y)
        expected = cfg_closed_form(x, st, y, 2.0) if inside else mixture_denoiser(x, st, y)
        torch.testing.assert_close(d, expected, rtol=1e-12, atol=1e-12)
        assert nfe == 2
        # a sampler's hint still decides in Python: one evaluation outside
        assert G.call_counted(x, st, sigma_value=s, class_labels=y)[1] == (2 if inside else 1)


def test_interval_euler_lands_on_the_piecewise_closed_form():
    """Edges on grid nodes: Euler's step from σ_i uses the field at σ_i, and (LO, HI] guides the
    steps from nodes in (LO, HI], i.e. exactly the segments inside [LO, HI]; first order."""
    n = 16
    y = torch.arange(n) % 2
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(9), dtype=F64)
    w, mu_c, m_u = 3.0, MU[y], torch.tensor([0.2, 0.1], dtype=F64)
    m_w = m_u + w * (mu_c - m_u)
    sigma_max, sigma_min = 20.0, 0.01
    G = guided(lambda x, s, class_labels: gaussian_denoiser(x, s, MU[class_labels]), w,
               uncond=lambda x, s: gaussian_denoiser(x, s, m_u), interval=(LO, HI))  # fmt: skip
    expected = ode_then_denoise(noise * sigma_max, sigma_max,
                                [(HI, mu_c), (LO, m_w), (sigma_min, mu_c)], sigma_min)  # fmt: skip
    errs = []
    for k in (500, 1000):

        def geo(a, b, k=k):
            return torch.logspace(math.log10(a), math.log10(b), k + 1, dtype=F64)

        grid = torch.cat([geo(sigma_max, HI)[:-1], geo(HI, LO)[:-1], geo(LO, sigma_min),
                          torch.zeros(1, dtype=F64)])  # fmt: skip
        assert HI in grid.tolist() and LO in grid.tolist()
        errs.append((euler(G, noise, grid, extra_args={"class_labels": y}) - expected).abs().max())
    assert errs[1] < 5e-3
    assert 1.8 < errs[0] / errs[1] < 2.2  # first order: the error is Euler's, not the edges'
    unguided = ode_then_denoise(noise * sigma_max, sigma_max, [(sigma_min, mu_c)], sigma_min)
    everywhere = ode_then_denoise(noise * sigma_max, sigma_max, [(sigma_min, m_w)], sigma_min)
    for other in (unguided, everywhere):
        assert (other - expected).abs().max() > 100 * errs[1]


# --- NFE -------------------------------------------------------------------------------------
def _expected_heun_nfe(ts, cost):
    n = len(ts) - 1
    first = sum(cost(ts[i]) for i in range(n))
    second = sum(cost(ts[i + 1]) for i in range(n) if ts[i + 1] > 0)
    return first + second


@pytest.mark.parametrize(
    ("w", "interval", "per_eval"),
    [(1.0, None, lambda s: 1), (0.0, None, lambda s: 1), (2.0, None, lambda s: 2),
     (2.0, (LO, HI), lambda s: 2 if LO < s <= HI else 1),
     (0.0, (LO, HI), lambda s: 1)],
)  # fmt: skip
def test_heun_nfe_counts_real_denoiser_evaluations(w, interval, per_eval):
    y = torch.arange(6) % 2
    noise = torch.randn(6, 2, generator=torch.Generator().manual_seed(10), dtype=F64)
    ts = karras_sigmas(12, 0.01, 20.0).tolist()
    cond = Recorder(mixture_denoiser)
    seen = []
    _, info = heun(guided(cond, w, interval=interval), noise, ts, extra_args={"class_labels": y},
                   return_info=True, callback=lambda d: seen.append(d["nfe"]))  # fmt: skip
    assert info.nfe == len(cond.calls) == _expected_heun_nfe(ts, per_eval)
    assert seen[-1] == info.nfe and seen == sorted(seen)
    if w == 0.0 and interval is not None:  # outside: D_c (labels); inside: D_u (labels None)
        labels = [kw["class_labels"] is None for _, kw in cond.calls]
        assert labels.count(True) == sum(1 for s, _ in cond.calls if LO < float(s[0]) <= HI)


@pytest.mark.parametrize("sampler", ["euler", "ddim", "ddpm", "edm_stochastic"])
def test_every_sampler_counts_guided_evaluations(sampler):
    y = torch.arange(4) % 2
    gen = torch.Generator().manual_seed(11)
    noise = torch.randn(4, 2, generator=gen, dtype=F64)
    cond = Recorder(mixture_denoiser)
    G = guided(cond, 1.5, interval=(LO, HI))
    fn = {"euler": euler, "ddim": ddim, "ddpm": ddpm, "edm_stochastic": edm_stochastic}[sampler]
    kw = {"churn": 10.0} if sampler == "edm_stochastic" else {}
    _, info = fn(G, noise, karras_sigmas(10, 0.01, 20.0), generator=gen, return_info=True,
                 extra_args={"class_labels": y}, **kw)  # fmt: skip
    ref = sum(1 for _, kw in cond.calls if kw["class_labels"] is None)  # one per guided eval
    main = len(cond.calls) - ref  # one per sampler evaluation
    assert info.nfe == len(cond.calls) == main + ref
    assert 0 < ref < main  # both kinds of step occurred
    assert all(LO < float(s[0]) <= HI for s, kw in cond.calls if kw["class_labels"] is None)


def test_nested_guided_counts_through():
    x, sigma, y = batch(4, seed=12)
    inner = guided(mixture_denoiser, 2.0)
    outer = Guided(inner, None, 1.5, guide=inner)
    assert outer.call_counted(x, sigma, class_labels=y)[1] == 4


# --- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [({"interval": (2.0, 1.0)}, ValueError, "empty"),
     ({"interval": (1.0, 1.0)}, ValueError, "empty"),
     ({"interval": (-0.5, 1.0)}, ValueError, ">= 0"),
     ({"interval": (float("nan"), 1.0)}, ValueError, "numbers"),
     ({"interval": (0.1, float("nan"))}, ValueError, "numbers"),
     ({"interval": (float("inf"), float("inf"))}, ValueError, "numbers"),
     ({"interval": (1.0,)}, TypeError, "pair"),
     ({"interval": "ab"}, TypeError, "pair"),
     ({"guide": mixture_denoiser, "uncond": mixture_denoiser}, ValueError, "not both"),
     ({"guide": 3.0}, TypeError, "guide"),
     ({"uncond": "u"}, TypeError, "uncond")],
)  # fmt: skip
def test_guided_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        guided(mixture_denoiser, 2.0, **kwargs)


def test_guided_bad_scales():
    for bad, exc in ((float("inf"), ValueError), (float("nan"), ValueError), ("2", TypeError),
                     (True, TypeError)):  # fmt: skip
        with pytest.raises(exc):
            guided(mixture_denoiser, bad)
    with pytest.raises(TypeError, match="twice"):
        guided(mixture_denoiser, mixture_denoiser, 2.0, uncond=mixture_denoiser)
    with pytest.raises(TypeError, match="needs a guidance scale"):
        guided(mixture_denoiser, uncond=mixture_denoiser)
    assert guided(mixture_denoiser, 2.0, interval=(0.0, float("inf"))).interval == (0.0, math.inf)
