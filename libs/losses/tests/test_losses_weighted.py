"""WeightedLoss (VDM++ eq. 7): equivalences with the published losses (App. D), invariance to
the schedule (Sec. 3.2), every vdmpp schedule, and bad input.

Expectations over t are computed by composite Gauss–Legendre quadrature in t (panels graded
towards both ends), with a fixed set of M (x, ε) pairs as common random numbers; the EDM loss is
an expectation over ln σ ∼ N(P_mean, P_std²) computed by Gauss–Hermite quadrature. The "model" is
a fixed random denoiser x̂ = h(z/α, λ) in EDM form, so every parameterization of it is the same
denoiser; its outputs are formed with the papers' own definitions (written out below).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special

from vdmpp.losses import LossOutput, WeightedLoss
from vdmpp.losses import weightings as W
from vdmpp.schedules import (
    Adaptive,
    Cosine,
    EDMSampling,
    EDMTraining,
    FlowOT,
    Learned,
    LinearVP,
)

D, M, SD = 4, 8, 0.5
DT = torch.float64


# --- a fixed random denoiser and its parameterizations (independent of the library) -----
class Core:
    """x̂ = c_skip·u + c_out·tanh(u W₁ + b + cλ/10) W₂ with u = z/α in VE units (σ = e^{−λ/2})."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(D, 16, generator=g, dtype=DT) * 0.7
        self.b = torch.randn(16, generator=g, dtype=DT)
        self.c = torch.randn(16, generator=g, dtype=DT)
        self.w2 = torch.randn(16, D, generator=g, dtype=DT) * 0.4

    def __call__(self, u, lam):
        sig2 = torch.exp(-lam)[:, None]
        h = torch.tanh(u @ self.w1 + self.b + self.c * lam[:, None] / 10) @ self.w2
        return SD**2 / (sig2 + SD**2) * u + torch.sqrt(sig2) * SD / torch.sqrt(sig2 + SD**2) * h


def alpha_sigma(lam, process):
    if process == "vp":
        return torch.sqrt(torch.sigmoid(lam)), torch.sqrt(torch.sigmoid(-lam))
    if process == "ve":
        return torch.ones_like(lam), torch.exp(-lam / 2)
    if process == "fm":  # z = (1 − t)x + tε with t = sigmoid(−λ/2) (VDM++ eq. 62, 66)
        return torch.sigmoid(lam / 2), torch.sigmoid(-lam / 2)
    raise AssertionError(process)


def predict(core, z, lam, param, process):
    """The core denoiser's output in parameterization ``param`` (paper definitions)."""
    a, s = (v[:, None] for v in alpha_sigma(lam, process))
    xh = core(z / a, lam)
    eh = (z - a * xh) / s
    if param == "x":
        return xh
    if param == "eps":
        return eh
    if param == "v":
        return a * eh - s * xh  # VDM++ eq. 50
    if param == "score":
        return -eh / s  # eq. 109
    if param == "flow":
        return xh - eh  # eq. 72
    if param == "edm":  # EDM Table 1: D = c_skip·(z/α) + c_out·F
        sig = torch.exp(-lam / 2)[:, None]
        c_skip, c_out = SD**2 / (sig**2 + SD**2), sig * SD / torch.sqrt(sig**2 + SD**2)
        return (xh - c_skip * z / a) / c_out
    raise AssertionError(param)


def make_model(core, param, process):
    def model(z, lam, class_labels=None):
        return predict(core, z, lam, param, process)

    return model


def pairs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, D, generator=g, dtype=DT) * 0.6, torch.randn(M, D, generator=g, dtype=DT)


def t_quadrature(panels=128, order=8):
    """Composite Gauss–Legendre on [0, 1], panel edges sigmoid(u), u uniform in [−14, 14]."""
    edges = special.expit(np.linspace(-14, 14, panels + 1))
    edges[0], edges[-1] = 0.0, 1.0
    xg, wg = np.polynomial.legendre.leggauss(order)
    a, b = edges[:-1, None], edges[1:, None]
    t = (0.5 * (b - a) * xg + 0.5 * (a + b)).ravel()
    w = (0.5 * (b - a) * wg).ravel()
    return torch.tensor(t, dtype=DT), torch.tensor(w, dtype=DT)


def expect_t(fn, x, eps, **quad):
    """∫₀¹ mean_m fn(t, x_m, ε_m) dt for a per-example fn(t[B], x[B,D], ε[B,D]) -> [B]."""
    t, w = t_quadrature(**quad)
    n = t.numel()
    vals = fn(t.repeat_interleave(M), x.repeat(n, 1), eps.repeat(n, 1)).reshape(n, M).mean(1)
    return float((w * vals).sum())


def expect_loss(loss, model, x, eps, **quad):
    return expect_t(lambda t, xx, ee: loss(model, xx, t=t, noise=ee).loss, x, eps, **quad)


def literature(schedule, process, param, x, eps, core, per_example):
    """E_{t∼U}[per_example(λ, prediction, target...)] for a published loss on its own schedule."""

    def fn(t, xx, ee):
        lam = schedule.logsnr(t)
        a, s = (v[:, None] for v in alpha_sigma(lam, process))
        z = a * xx + s * ee
        return per_example(lam, predict(core, z, lam, param, process), xx, ee, a, s)

    return expect_t(fn, x, eps)


def span(schedule):
    """t₁ − t₀ of a truncated schedule (its p̃ = p/(t₁ − t₀)), from the closed forms."""
    lo, hi = schedule.logsnr_min, schedule.logsnr_max
    if isinstance(schedule, Cosine):
        f = lambda lam: 2 / math.pi * math.atan(math.exp(-lam / 2 + schedule.shift))
    elif isinstance(schedule, FlowOT):
        f = lambda lam: special.expit(-lam / 2)
    else:
        raise AssertionError
    return f(lo) - f(hi)


def sq(v):
    return v.square().sum(1)


# --- equivalences (VDM++ App. D) -----------------------------------------------------
def test_edm_loss_equals_weighted_loss_with_edm_weighting():
    """EDM's loss E_{ln σ∼N(−1.2,1.2²)}[(σ²+σ_d²)/(σσ_d)²·‖D(y+σn;σ) − y‖²] = 2·L_w(EDM)."""
    core, (x, eps) = Core(), pairs()
    xi, wi = np.polynomial.hermite_e.hermegauss(80)
    ln_sigma = torch.tensor(-1.2 + 1.2 * xi, dtype=DT)
    n = ln_sigma.numel()
    sigma = torch.exp(ln_sigma).repeat_interleave(M)
    y, noise = x.repeat(n, 1), eps.repeat(n, 1)
    denoised = core(y + sigma[:, None] * noise, -2 * torch.log(sigma))  # VE: D(y + σn; σ)
    lam_w = (sigma**2 + SD**2) / (sigma * SD) ** 2
    per = (lam_w * sq(denoised - y)).reshape(n, M).mean(1)
    edm_loss = float((torch.tensor(wi, dtype=DT) * per).sum()) / math.sqrt(2 * math.pi)

    for sched, param, process in [
        (Cosine(logsnr_min=-20, logsnr_max=20), "edm", "vp"),
        (FlowOT(logsnr_min=-20, logsnr_max=20), "x", "ve"),
    ]:
        loss = WeightedLoss(sched, W.EDM(), param, process)
        got = expect_loss(loss, make_model(core, param, process), x, eps)
        assert got == pytest.approx(edm_loss / 2, rel=2e-4), (sched, param)


def test_edm_loss_pointwise_with_edm_training_schedule():
    """With EDM's own schedule, ½w/p is exactly ½(t₁−t₀)·λ(σ)σ² per draw (same t and ε)."""
    core, (x, eps) = Core(), pairs()
    sched = EDMTraining()
    loss = WeightedLoss(sched, "edm", "x", "ve")
    t = torch.rand(M, generator=torch.Generator().manual_seed(3), dtype=DT)
    out = loss(make_model(core, "x", "ve"), x, t=t, noise=eps)
    assert isinstance(out, LossOutput) and out.loss.shape == (M,)
    sigma = torch.exp(-out.logsnr / 2)  # EDM's σ for the drawn λ
    denoised = core(x + sigma[:, None] * eps, out.logsnr)
    edm_term = (sigma**2 + SD**2) / (sigma * SD) ** 2 * sq(denoised - x)
    t0, t1 = (float(special.ndtr((2.4 - v) / 2.4)) for v in (20.0, -20.0))
    torch.testing.assert_close(out.loss, 0.5 * (t1 - t0) * edm_term, rtol=1e-10, atol=0)


@pytest.mark.parametrize(
    ("case", "lit_sched", "lit_process", "lit_param", "per_example", "const", "weighting", "wl"),
    [
        # D.2: v-prediction MSE with the cosine schedule, E_t‖v − v̂‖² = (2/π)/Δt · L_w(e^{−λ/2})
        (
            "vpred",
            Cosine(logsnr_min=-20, logsnr_max=20),
            "vp",
            "v",
            lambda lam, y, x, e, a, s: sq(y - (a * e - s * x)),
            lambda sch: 2 / math.pi / span(sch),
            W.VPrediction(),
            (FlowOT(logsnr_min=-20, logsnr_max=20), "v", "vp"),
        ),
        # D.3: conditional flow matching E_t‖o − ô‖², o = x − ε on z = (1−t)x + tε: L_w/Δt
        (
            "cfm",
            FlowOT(logsnr_min=-20, logsnr_max=20),
            "fm",
            "flow",
            lambda lam, y, x, e, a, s: sq(y - (x - e)),
            lambda sch: 1 / span(sch),
            W.FlowOT(),
            (Cosine(logsnr_min=-20, logsnr_max=20), "flow", "vp"),
        ),
        # D.6: min-SNR-5, E_t[min(e^λ, γ)‖x − x̂‖²] with cosine: (1/π)/Δt · L_w
        (
            "minsnr",
            Cosine(logsnr_min=-20, logsnr_max=20),
            "vp",
            "x",
            lambda lam, y, x, e, a, s: torch.clamp(torch.exp(lam), max=5.0) * sq(y - x),
            lambda sch: 1 / math.pi / span(sch),
            W.MinSNR(5.0),
            (FlowOT(logsnr_min=-20, logsnr_max=20), "eps", "ve"),
        ),
        # D.5: P2 (k = 1, γ = ½), E_t[‖ε − ε̂‖²/(1 + e^λ)^γ] with cosine: (1/π)/Δt · L_w
        (
            "p2",
            Cosine(logsnr_min=-20, logsnr_max=20),
            "vp",
            "eps",
            lambda lam, y, x, e, a, s: sq(y - e) / torch.sqrt(1 + torch.exp(lam)),
            lambda sch: 1 / math.pi / span(sch),
            W.P2(gamma=0.5),
            (FlowOT(logsnr_min=-20, logsnr_max=20), "score", "vp"),
        ),
        # Sec. 3.1: ε-prediction MSE with cosine (IDDPM): (1/π)/Δt · L_w(sech(λ/2))
        (
            "iddpm",
            Cosine(logsnr_min=-20, logsnr_max=20),
            "vp",
            "eps",
            lambda lam, y, x, e, a, s: sq(y - e),
            lambda sch: 1 / math.pi / span(sch),
            W.IDDPM(),
            (LinearVP(logsnr_min=-20, logsnr_max=20), "x", "vp"),
        ),
        # D.4: InDI, E_t‖x − x̂‖² on the FM-OT path: (1/4)/Δt · L_w(e^{−λ}sech²(λ/4))
        (
            "indi",
            FlowOT(logsnr_min=-20, logsnr_max=20),
            "fm",
            "x",
            lambda lam, y, x, e, a, s: sq(y - x),
            lambda sch: 0.25 / span(sch),
            W.InDI(),
            (Cosine(logsnr_min=-20, logsnr_max=20), "v", "ve"),
        ),
    ],
    ids=["vpred", "cfm", "minsnr", "p2", "iddpm", "indi"],
)
def test_published_loss_equals_weighted_loss(
    case, lit_sched, lit_process, lit_param, per_example, const, weighting, wl
):
    core, (x, eps) = Core(), pairs()
    lit = literature(lit_sched, lit_process, lit_param, x, eps, core, per_example)
    sched, param, process = wl  # a different schedule (same endpoints) and parameterization
    loss = WeightedLoss(sched, weighting, param, process)
    got = expect_loss(loss, make_model(core, param, process), x, eps)
    assert lit == pytest.approx(const(lit_sched) * got, rel=2e-4), case


# --- invariance (Sec. 3.2) --------------------------------------------------------------
def test_expected_loss_invariant_to_schedule_but_variance_is_not():
    core, (x, eps) = Core(), pairs()
    model = make_model(core, "eps", "vp")
    means, variances = [], []
    for sched in (
        Cosine(logsnr_min=-12, logsnr_max=12),
        FlowOT(logsnr_min=-12, logsnr_max=12),
        EDMTraining(logsnr_min=-12, logsnr_max=12),
    ):
        loss = WeightedLoss(sched, W.Sigmoid(), "eps")
        m1 = expect_loss(loss, model, x, eps)
        m2 = expect_t(lambda t, xx, ee, f=loss: f(model, xx, t=t, noise=ee).loss ** 2, x, eps)
        means.append(m1)
        variances.append(m2 - m1**2)
    assert means[1] == pytest.approx(means[0], rel=1e-4)
    assert means[2] == pytest.approx(means[0], rel=1e-4)
    assert max(variances) > 1.5 * min(variances), variances


def test_default_low_discrepancy_estimate_matches_quadrature():
    core, (x, eps) = Core(), pairs()
    model = make_model(core, "v", "vp")
    loss = WeightedLoss(Cosine(logsnr_min=-15, logsnr_max=15), W.Sigmoid(bias=1.0), "v")
    exact = expect_loss(loss, model, x, eps)
    n = 2048
    g = torch.Generator().manual_seed(0)
    xs, es = x.repeat(n, 1), eps.repeat(n, 1)  # vary t only (low-discrepancy), ε fixed
    out = loss(model, xs, noise=es, generator=g)
    assert float(out.loss.mean()) == pytest.approx(exact, rel=1e-2)
    assert torch.equal(
        out.t, loss(model, xs, noise=es, generator=torch.Generator().manual_seed(0)).t
    )


# --- every schedule, Adaptive and Learned -----------------------------------------------
class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(D + 1, D)

    def forward(self, z, logsnr, class_labels=None):
        return self.lin(torch.cat([z, logsnr[:, None] / 10], dim=1))


SCHEDULES = {
    "cosine": lambda: Cosine(),
    "cosine_shifted": lambda: Cosine.for_resolution(256),
    "edm_training": lambda: EDMTraining(),
    "edm_sampling": lambda: EDMSampling(),
    "flow_ot": lambda: FlowOT(),
    "linear_vp": lambda: LinearVP(),
    "learned": lambda: Learned(hidden=8),
    "adaptive": lambda: Adaptive(W.Sigmoid()),
}


@pytest.mark.parametrize("key", sorted(SCHEDULES))
@pytest.mark.parametrize("param", ["eps", "v", "edm"])
def test_works_with_every_schedule(key, param):
    torch.manual_seed(0)
    sched, net = SCHEDULES[key](), TinyNet()
    loss = WeightedLoss(sched, W.Sigmoid(), param)
    x = torch.randn(16, D)
    out = loss(net, x, generator=torch.Generator().manual_seed(1))
    for v in out:
        assert v.shape == (16,) and torch.isfinite(v).all()
    assert (out.loss >= 0).all() and (out.unweighted >= 0).all()
    lo, hi = (float(torch.as_tensor(v).detach()) for v in (sched.logsnr_min, sched.logsnr_max))
    lam = out.logsnr.detach()
    assert lo - 1e-5 <= float(lam.min()) and float(lam.max()) <= hi + 1e-5
    out.loss.mean().backward()
    assert net.lin.weight.grad is not None and torch.isfinite(net.lin.weight.grad).all()
    if isinstance(sched, Adaptive):
        before = sched.cdf.clone()
        sched.update(out.logsnr, out.unweighted)
        assert not torch.equal(before, sched.cdf)


def test_learned_schedule_gets_report_loss_and_gradients():
    sched, net = Learned(hidden=8), TinyNet()
    calls = []
    original = sched.report_loss
    sched.report_loss = lambda per_example: (calls.append(per_example), original(per_example))
    loss = WeightedLoss(sched, "elbo", "eps")
    out = loss(net, torch.randn(8, D), generator=torch.Generator().manual_seed(0))
    assert len(calls) == 1 and calls[0] is out.loss
    out.loss.mean().backward()  # raises if report_loss had not been called
    assert sched.ends.grad is not None and torch.isfinite(sched.ends.grad).all()
    assert sched.w2.grad is not None and torch.isfinite(sched.w2.grad).all()


def test_adaptive_with_other_weighting_warns():
    with pytest.warns(UserWarning, match="adaptive schedule tracks"):
        WeightedLoss(Adaptive(W.Sigmoid()), W.EDM(), "eps")
    WeightedLoss(Adaptive(W.Sigmoid()), "sigmoid", "eps")  # equal weighting: no warning


# --- numerics ---------------------------------------------------------------------------
@pytest.mark.parametrize("param", ["x", "v", "edm", "flow", "score"])
def test_float32_matches_float64_at_extreme_logsnr(param):
    core, (x, eps) = Core(), pairs()
    model64 = make_model(core, param, "vp")
    lam = torch.linspace(-19.5, 19.5, M, dtype=DT)
    sched = Cosine()
    t = sched.t(lam)
    loss = WeightedLoss(sched, W.ELBO(), param)
    ref = loss(model64, x, t=t, noise=eps)
    # the float32 model output is the float64 one rounded: the loss must not amplify rounding
    out32 = loss(
        lambda z, lam_, cl=None: model64(z.double(), lam_.double()).float(),
        x.float(),
        t=t.float(),
        noise=eps.float(),
    )
    assert out32.loss.dtype == torch.float32
    torch.testing.assert_close(out32.unweighted.double(), ref.unweighted, rtol=5e-3, atol=1e-6)


# --- bad input --------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    sched, net, x = Cosine(), TinyNet(), torch.randn(4, D)
    with pytest.raises(ValueError, match="unknown weighting"):
        WeightedLoss(sched, "snr+1", "eps")
    with pytest.raises(ValueError, match="unknown parameterization"):
        WeightedLoss(sched, "elbo", "noise")
    with pytest.raises(ValueError, match="unknown process"):
        WeightedLoss(sched, "elbo", "eps", "subvp")
    with pytest.raises(ValueError, match="unknown time_sampler"):
        WeightedLoss(sched, "elbo", "eps", time_sampler="sobol")
    with pytest.raises(TypeError, match="schedule must provide"):
        WeightedLoss(object(), "elbo", "eps")
    with pytest.raises(TypeError, match="weighting must be"):
        WeightedLoss(sched, 3.0, "eps")
    with pytest.raises(ValueError, match=r"outside the range .* where VPrediction\(\)"):
        WeightedLoss(FlowOT(logsnr_min=-400, logsnr_max=10), W.VPrediction(), "eps")
    WeightedLoss(FlowOT(logsnr_min=-400, logsnr_max=10), W.Sigmoid(), "eps")  # bounded: fine
    loss = WeightedLoss(sched, "elbo", "eps")
    with pytest.raises(ValueError, match="model output must have"):
        loss(lambda z, lam, c=None: z[:, :2], x)
    with pytest.raises(ValueError, match=r"t must have shape \[4\]"):
        loss(net, x, t=torch.rand(3))
    with pytest.raises(ValueError, match="noise must have shape"):
        loss(net, x, noise=torch.randn(4, D + 1))
    with pytest.raises(ValueError, match="class_labels must have batch size 4"):
        loss(net, x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="floating-point"):
        loss(net, torch.ones(4, D, dtype=torch.long))
    with pytest.raises(ValueError, match="t must lie in"):
        loss(net, x, t=torch.full((4,), 1.5))
