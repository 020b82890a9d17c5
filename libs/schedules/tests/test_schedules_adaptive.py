"""VDM++'s adaptive schedule (VDM++ App. F/H): the pure-PyTorch reference."""

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


# --- the density floor: p(λ(t)) > 0 for every t the schedule can return ---------------------
def _returned_density_positive(s: Adaptive) -> None:
    t = torch.cat([torch.tensor([0.0, 1e-9, 1e-7, 1.0 - 1e-7, 1.0]), torch.linspace(0, 1, 4097)])
    lam, p = s.logsnr_pdf(t)
    assert bool(torch.isfinite(lam).all()) and bool((p > 0).all()), (t[p <= 0], lam[p <= 0])
    # p is the piecewise-constant density of the bin λ(t) lies in (from either side at an edge)
    inside = (lam >= s.logsnr_min) & (lam <= s.logsnr_max)
    assert bool(inside.all())


def test_top_bins_with_zero_mass_never_give_zero_density_at_t0():
    """EMA decayed to 0 in the top bins (e.g. a weighting that underflows at high λ): t = 0 maps
    to the upper end of the support (the last bin with mass), where p > 0, not into the flat
    tail where p = 0 (loss = w/p = inf)."""
    s = Adaptive(ONES, bins=10, logsnr_min=-5, logsnr_max=5)
    s.ema.copy_(torch.tensor([1.0] * 7 + [0.0] * 3))
    s.cdf.copy_(s.cdf_from_ema(s.ema))
    _returned_density_positive(s)
    lam, p = s.logsnr_pdf(torch.tensor([0.0]))
    assert lam.item() == pytest.approx(2.0) and p.item() == pytest.approx(1 / 7)  # top of bin 6


def test_top_bin_share_rounding_to_zero_in_float32():
    """The top bin holds mass ≪ float32 eps of the total: cdf[bins-1] rounds to 1 exactly."""
    s = Adaptive(ONES, bins=8, logsnr_min=-4, logsnr_max=4)
    s.ema.copy_(torch.tensor([1.0] * 7 + [1e-12]))
    s.cdf.copy_(s.cdf_from_ema(s.ema))
    assert s.cdf[-2].item() == 1.0  # the share rounded away
    _returned_density_positive(s)


def test_all_zero_ema_is_the_uniform_schedule_not_nan():
    s = Adaptive(ONES, bins=5, decay=0.5, logsnr_min=-5, logsnr_max=5)
    s.ema.zero_()
    s.update(torch.tensor([0.0]), torch.tensor([0.0]))  # keeps every bin at 0
    assert torch.equal(s.cdf, torch.linspace(0, 1, 6))
    _returned_density_positive(s)


def test_density_positive_after_training_like_updates_with_underflowing_weight():
    """A weighting that is exactly 0 above λ = 8 for 300 steps of decay 0.5: those bins' EMA
    decays below the float32 normals (0.5^300), their cdf share rounds to 0."""
    w = lambda lam: torch.where(lam < 8, torch.exp(-lam), torch.zeros_like(lam))
    s = Adaptive(w, bins=40, decay=0.5, logsnr_min=-10, logsnr_max=10)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        lam = torch.rand(256, generator=g) * 20 - 10
        s.update(lam, torch.ones(256))
    assert (s.ema < torch.finfo(torch.float32).tiny).any()
    assert s.cdf[-5].item() == 1.0  # the top 4 bins hold no float32 mass
    _returned_density_positive(s)


# --- add_stats / apply_stats (the data-parallel path the trainer runs) ----------------------
def test_add_stats_accumulates_bin_stats():
    g = torch.Generator().manual_seed(3)
    s = Adaptive(lambda lam: torch.sigmoid(2 - lam), bins=16, logsnr_min=-8, logsnr_max=8)
    stats = s.new_stats()
    ref = torch.zeros(2, 16)
    for _ in range(3):
        lam, loss = torch.randn(40, generator=g) * 5, torch.rand(40, generator=g)
        assert s.add_stats(stats, lam, loss) is stats
        ref += s.bin_stats(lam, loss)
    assert torch.equal(stats, ref)


@pytest.mark.parametrize("kernels", ["auto", "0"])
def test_data_parallel_path_equals_reference(monkeypatch, kernels):
    """add_stats ×2 → apply_stats, with the kernels (when installed) or VDMPP_KERNELS=0, equals
    the bin_stats → apply_stats reference with force_reference, bit for bit on CPU."""
    if kernels == "0":
        monkeypatch.setenv("VDMPP_KERNELS", "0")
    else:
        monkeypatch.delenv("VDMPP_KERNELS", raising=False)
    w = lambda lam: torch.sigmoid(2 - lam)
    a = Adaptive(w, bins=50, decay=0.95, logsnr_min=-12, logsnr_max=10)
    b = Adaptive(w, bins=50, decay=0.95, logsnr_min=-12, logsnr_max=10)
    b.force_reference = True
    g = torch.Generator().manual_seed(4)
    for step in range(20):
        st_a, st_b = a.new_stats(), b.new_stats()
        for _ in range(2):
            lam = a.logsnr(torch.rand(64, generator=g))
            loss = (1 + torch.tanh(lam / 4)) * torch.rand(64, generator=g)
            a.add_stats(st_a, lam, loss)
            st_b += b.bin_stats(lam, loss)
        a.apply_stats(st_a)
        b.apply_stats(st_b)
        assert torch.equal(a.ema, b.ema) and torch.equal(a.cdf, b.cdf), step
