"""VDM++'s adaptive schedule (seed 000 App. F/H): the pure-PyTorch reference."""

from __future__ import annotations

import math

import pytest
import torch

from vdmpp.schedules import Adaptive, NoiseSchedule

ONES = lambda lam: torch.ones_like(lam)


def test_initial_schedule_is_uniform_in_logsnr():
    s = Adaptive(ONES, bins=10, logsnr_min=-5, logsnr_max=5)
    assert isinstance(s, NoiseSchedule)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.allclose(s.logsnr(t).double(), 5 - 10 * t, atol=1e-5)
    assert torch.allclose(s.pdf(torch.tensor([0.0, -4.9, 4.9])), torch.full((3,), 0.1))


def test_density_converges_to_known_profile():
    bins = 20
    s = Adaptive(lambda lam: torch.exp(-0.1 * lam), bins=bins, decay=0.9)
    centres = s.edges()[:-1] + s.width / 2
    profile = 1.0 + torch.sigmoid(centres / 3)  # unweighted loss shape
    for _ in range(300):
        s.update(centres, profile)
    target = torch.exp(-0.1 * centres) * profile
    target = target / (target.sum() * s.width)
    assert torch.allclose(s.pdf(centres), target, rtol=1e-4)
    lam = torch.linspace(-20, 20, 40001)
    assert torch.trapezoid(s.pdf(lam), lam).item() == pytest.approx(1.0, abs=1e-3)


def test_several_samples_in_one_bin_are_averaged():
    s = Adaptive(ONES, bins=4, decay=0.5, logsnr_min=0, logsnr_max=4)
    s.update(torch.tensor([0.2, 0.5, 0.9, 2.5]), torch.tensor([1.0, 3.0, 8.0, 5.0]))
    # bin 0: mean 4 → 0.5·1 + 0.5·4; bin 2: 0.5 + 2.5; bins 1 and 3 untouched.
    assert s.ema.tolist() == pytest.approx([2.5, 1.0, 3.0, 1.0])
    assert s.cdf.tolist() == pytest.approx([0, 2.5 / 7.5, 3.5 / 7.5, 6.5 / 7.5, 1.0])
    assert s.cdf[-1].item() == 1.0


def test_out_of_range_clipped_to_end_bins_and_nonfinite_loss_ignored():
    s = Adaptive(ONES, bins=4, decay=0.5, logsnr_min=0, logsnr_max=4)
    s.update(torch.tensor([-100.0, 100.0, 1.5]), torch.tensor([3.0, 5.0, float("nan")]))
    assert s.ema.tolist() == pytest.approx([2.0, 1.0, 1.0, 3.0])
    with pytest.raises(ValueError, match="NaN"):
        s.update(torch.tensor([float("nan")]), torch.tensor([1.0]))


def test_sampling_t_uniform_gives_adaptive_density():
    bins = 10
    s = Adaptive(ONES, bins=bins, decay=0.5, logsnr_min=-10, logsnr_max=10)
    centres = s.edges()[:-1] + s.width / 2
    profile = torch.arange(1.0, bins + 1.0) ** 2
    for _ in range(60):
        s.update(centres, profile)
    g = torch.Generator().manual_seed(0)
    n = 200_000
    lam = s.logsnr(torch.rand(n, generator=g))
    counts = torch.histc(lam, bins=bins, min=-10, max=10)
    expected = n * profile / profile.sum()
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 27.9  # χ² with 9 dof, p = 0.001
    # Inverse and density are consistent: t(λ(t)) = t and p = −dt/dλ.
    t = torch.linspace(0, 1, 501, dtype=torch.float64)
    assert torch.allclose(s.t(s.logsnr(t.float())).double(), t, atol=1e-5)
    s64 = s.double()  # buffers to float64 for a clean finite difference
    lam = torch.linspace(-9.9, 9.9, 37, dtype=torch.float64)
    h = 1e-4
    fd = -(s64.t(lam + h) - s64.t(lam - h)) / (2 * h)
    inner = ((lam + 10) / s.width - torch.floor((lam + 10) / s.width) - 0.5).abs() < 0.45
    assert torch.allclose(fd[inner], s64.pdf(lam)[inner], rtol=1e-8)


def test_state_dict_round_trip():
    a = Adaptive(ONES, bins=8)
    a.update(
        torch.linspace(-19, 19, 32), torch.rand(32, generator=torch.Generator().manual_seed(1))
    )
    b = Adaptive(ONES, bins=8)
    b.load_state_dict(a.state_dict())
    t = torch.rand(100)
    assert torch.equal(a.logsnr(t), b.logsnr(t))
    assert set(a.state_dict()) == {"ema", "cdf"}


def test_bin_stats_reduce_like_a_big_batch():
    """Data-parallel: summing per-rank stats equals one update over the whole batch."""
    g = torch.Generator().manual_seed(2)
    lam, loss = torch.rand(64, generator=g) * 40 - 20, torch.rand(64, generator=g)
    one, two = Adaptive(ONES, bins=16), Adaptive(ONES, bins=16)
    one.update(lam, loss)
    two.apply_stats(two.bin_stats(lam[:32], loss[:32]) + two.bin_stats(lam[32:], loss[32:]))
    assert torch.allclose(one.ema, two.ema) and torch.allclose(one.cdf, two.cdf)


def test_zero_loss_bin_keeps_schedule_invertible():
    s = Adaptive(ONES, bins=4, decay=0.5, logsnr_min=0, logsnr_max=4)
    for _ in range(80):
        s.update(torch.tensor([1.5]), torch.tensor([0.0]))
    lam = s.logsnr(torch.linspace(0, 1, 101))
    assert torch.isfinite(lam).all() and torch.all(lam[1:] <= lam[:-1])
    assert math.isclose(s.pdf(torch.tensor([1.5])).item(), 0.0, abs_tol=1e-20)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(bins=0),
        dict(bins=2.5),
        dict(decay=0.0),
        dict(decay=1.0),
        dict(decay=1.5),
        dict(logsnr_min=3.0, logsnr_max=3.0),
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        Adaptive(ONES, **kwargs)


def test_shape_mismatch_and_bad_t():
    s = Adaptive(ONES)
    with pytest.raises(ValueError, match="equal shape"):
        s.update(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError):
        s.logsnr(torch.tensor([-0.1]))
    with pytest.raises(TypeError):
        Adaptive("elbo")
