"""With and without the extension, a full Heun / EDM-stochastic sample and an adaptive-schedule
training loop give the same results (bit for bit on CPU)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

import vdmpp.kernels as K
from vdmpp.kernels import reference as R

HAS_CUDA = torch.cuda.is_available() and K.has_kernel("heun_step", "cuda")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no GPU"))]


def _karras(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    i = torch.arange(n, dtype=torch.float64) / (n - 1)
    s = (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return [*s.tolist(), 0.0]


def _gaussian_denoiser(mu=0.3, s=0.5):
    """Exact D(x; σ) for data ~ N(mu, s²) per pixel."""

    def D(x, sigma):
        sig = sigma.reshape(-1, *([1] * (x.dim() - 1))).to(torch.float32)
        return (mu + (s * s) / (s * s + sig * sig) * (x.float() - mu)).to(x.dtype)

    return D


def _heun_loop(ops, D, noise, ts, churn=0.0, s_noise=1.0, generator=None):
    """EDM Alg. 2 (Alg. 1 when churn = 0), written against an ops module with churn/heun_step."""
    x = noise * ts[0]
    n = len(ts) - 1
    gamma = min(churn / n, math.sqrt(2.0) - 1.0)
    for i in range(n):
        t_cur, t_next = ts[i], ts[i + 1]
        t_hat = t_cur + gamma * t_cur
        if gamma > 0:
            eps = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x)
            x = ops.churn(x, eps, t_cur, t_hat, s_noise)
        sig = torch.full((x.shape[0],), t_hat)
        d1 = D(x, sig)
        x_next = ops.heun_step(x, d1, None, t_hat, t_next)
        if t_next > 0:
            d2 = D(x_next, torch.full((x.shape[0],), t_next))
            x_next = ops.heun_step(x, d1, d2, t_hat, t_next)
        x = x_next
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("churn", [0.0, 40.0])
def test_kernels_full_heun_loop_same_with_and_without(dtype, churn):
    noise = torch.randn(3, 3, 9, 11, generator=torch.Generator().manual_seed(0)).to(dtype)
    D, ts = _gaussian_denoiser(), _karras(12)
    outs = [
        _heun_loop(ops, D, noise, ts, churn, 1.003, torch.Generator().manual_seed(1))
        for ops in (K, R)
    ]
    assert torch.equal(outs[0], outs[1])
    assert bool(torch.isfinite(outs[0].float()).all())


needs_samplers = pytest.mark.skipif(
    importlib.util.find_spec("vdmpp.samplers") is None, reason="vdmpp-samplers not installed"
)


@needs_samplers
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["heun", "edm_stochastic", "euler"])
def test_kernels_samplers_use_kernels_true_equals_false(monkeypatch, device, dtype, name):
    import vdmpp.samplers as S

    monkeypatch.delenv("VDMPP_KERNELS", raising=False)
    sampler = getattr(S, name)
    kw = {"churn": 30.0, "s_noise": 1.007} if name == "edm_stochastic" else {}
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    noise = noise.to(device=device, dtype=dtype)
    sigmas = _karras(10)
    D = _gaussian_denoiser()
    runs = {}
    for use in (True, False):
        g = torch.Generator(device=device).manual_seed(4)
        x, info = sampler(D, noise, sigmas, generator=g, use_kernels=use, return_info=True, **kw)
        assert info.kernels is use
        runs[use] = x
    if device == "cpu":
        assert torch.equal(runs[True], runs[False])
    else:  # CUDA reference divides by a reciprocal: ulp-level differences per step
        torch.testing.assert_close(runs[True], runs[False], rtol=1e-4, atol=1e-4)


@needs_samplers
def test_kernels_samplers_env_switch(monkeypatch):
    import vdmpp.samplers as S

    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    res = {}
    for env in ("1", "0"):
        monkeypatch.setenv("VDMPP_KERNELS", env)
        res[env] = S.heun(_gaussian_denoiser(), noise, _karras(6), return_info=True)
        assert res[env][1].kernels is (env == "1")
    assert torch.equal(res["1"][0], res["0"][0])


needs_schedules = pytest.mark.skipif(
    importlib.util.find_spec("vdmpp.schedules") is None, reason="vdmpp-schedules not installed"
)


@needs_schedules
@pytest.mark.parametrize("bins", [1, 100])
def test_kernels_adaptive_training_loop_same_with_and_without(monkeypatch, bins):
    """Adaptive.update through the kernel equals the reference path, step for step."""
    from vdmpp.schedules import Adaptive

    monkeypatch.delenv("VDMPP_KERNELS", raising=False)
    calls = []
    real = K.adaptive_ema_update
    monkeypatch.setattr(K, "adaptive_ema_update", lambda *a: calls.append(1) or real(*a))
    w = lambda lam: torch.sigmoid(2.0 - lam)
    fast = Adaptive(w, bins=bins, decay=0.99, logsnr_min=-12.0, logsnr_max=10.0)
    slow = Adaptive(w, bins=bins, decay=0.99, logsnr_min=-12.0, logsnr_max=10.0)
    slow.force_reference = True
    g = torch.Generator().manual_seed(0)
    for step in range(40):
        # sample λ from the current schedule (as training does), a loss that depends on λ
        t = torch.rand(64 + step, generator=g)
        lam = fast.logsnr(t)
        assert torch.equal(lam, slow.logsnr(t))
        loss = (1 + torch.tanh(lam / 4)) * torch.rand(lam.shape, generator=g)
        fast.update(lam, loss)
        slow.update(lam, loss)
        assert torch.equal(fast.ema, slow.ema) and torch.equal(fast.cdf, slow.cdf), step
    assert len(calls) == 40  # the kernel served every fast update, none of the slow ones
    monkeypatch.setenv("VDMPP_KERNELS", "0")
    fast.update(lam, loss)
    assert len(calls) == 40


needs_train = pytest.mark.skipif(
    importlib.util.find_spec("vdmpp.train") is None, reason="vdmpp-train not installed"
)

# digits at 8×8 with a tiny U-Net (as the train app's tests): 2 micro-batches of 8 per step, so
# the statistics of two slots are accumulated before the (single-rank) all-reduce and the apply.
_DIGITS_SMALL = [
    "data.resolution=8",
    "batch.global=16",
    "batch.per_device=8",
    "model.overrides={model_channels=16, channel_mult=[1, 2], num_res_blocks=1, "
    "attention_resolutions=[], head_channels=16}",
    "log.progress=false",
    "sample.every=0",
    "optimizer.warmup_images=0",
    "device=cpu",
]


def _digits_run(tmp_path, name, steps):
    from vdmpp.train import config as C
    from vdmpp.train.trainer import Trainer

    torch.manual_seed(0)
    cfg = C.load("digits", [*_DIGITS_SMALL, f"out={tmp_path / name}", f"steps={steps}"])
    trainer = Trainer(cfg.validate())
    try:
        for _ in range(steps):
            assert trainer.train_step()["ok"]
        sched = trainer.objective.schedule
        return (
            {k: v.clone() for k, v in trainer.model.state_dict().items()},
            sched.ema.clone(),
            sched.cdf.clone(),
        )
    finally:
        trainer.close()


@needs_train
def test_kernels_digits_training_runs_the_fused_pair_and_equals_reference(monkeypatch, tmp_path):
    """A digits training run with the extension goes through adaptive_bin_stats (once per
    micro-batch) and adaptive_apply_stats (once per step), and its weights and schedule equal,
    bit for bit, the run with VDMPP_KERNELS=0 (the PyTorch bin_stats → apply_stats path)."""
    monkeypatch.delenv("VDMPP_KERNELS", raising=False)
    calls = {"bin_stats": 0, "apply_stats": 0, "ema_update": 0}
    for name in calls:
        real = getattr(K, f"adaptive_{name}")

        def counted(*a, _real=real, _name=name):
            calls[_name] += 1
            return _real(*a)

        monkeypatch.setattr(K, f"adaptive_{name}", counted)
    steps = 6
    fused = _digits_run(tmp_path, "fused", steps)
    assert calls == {"bin_stats": 2 * steps, "apply_stats": steps, "ema_update": 0}
    monkeypatch.setenv("VDMPP_KERNELS", "0")
    reference = _digits_run(tmp_path, "reference", steps)
    assert calls == {"bin_stats": 2 * steps, "apply_stats": steps, "ema_update": 0}
    weights_f, ema_f, cdf_f = fused
    weights_r, ema_r, cdf_r = reference
    assert weights_f.keys() == weights_r.keys()
    for k in weights_f:
        assert torch.equal(weights_f[k], weights_r[k]), k
    assert torch.equal(ema_f, ema_r) and torch.equal(cdf_f, cdf_r)
    assert not torch.equal(ema_f, torch.ones_like(ema_f))  # the schedule did move
