"""Post-hoc EMA (EDM2 App. C): every formula re-derived here in float64, independently of
vdmpp.train.phema — moments and L² inner products of the profiles p_t(τ) = (γ+1)τ^γ/t^(γ+1)
by Gauss–Legendre quadrature, the EMA recursion by direct summation — and the snapshot files'
failure modes (corrupt, truncated, missing, inconsistent, interrupted write)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vdmpp.train import phema as P

# Gauss–Legendre nodes on [0, 1].
_X, _W = np.polynomial.legendre.leggauss(200)
_X, _W = (_X + 1.0) / 2.0, _W / 2.0


def profile(tau: np.ndarray, t: float, g: float) -> np.ndarray:
    """p_t(τ) of exponent γ, from its definition (zero after t)."""
    return np.where(tau <= t, (g + 1.0) * tau**g / t ** (g + 1.0), 0.0)


def integrate(f, breaks) -> float:
    """∫ f over [0, max(breaks)], Gauss–Legendre on each piece between the sorted breakpoints;
    the first piece with τ = b·u² so that τ^γ near 0 becomes a smooth u^(2γ+1)."""
    b = np.unique(np.concatenate([[0.0], np.asarray(breaks, dtype=np.float64)]))
    u = _X
    total = float(np.sum(_W * f(b[1] * u**2) * 2.0 * b[1] * u))
    for lo, hi in itertools.pairwise(b[1:]):
        total += float(np.sum(_W * f(lo + (hi - lo) * _X)) * (hi - lo))
    return total


# ---------------------------------------------------------------------------- conversions


@pytest.mark.parametrize("g", [0.0, 0.5, 1.0, 2.5, 6.94, 16.97, 50.0])
def test_exp_to_std_is_the_relative_std_of_the_profile(g: float) -> None:
    t = 1.0
    mean = integrate(lambda x: x * profile(x, t, g), [t])
    var = integrate(lambda x: (x - mean) ** 2 * profile(x, t, g), [t])
    assert integrate(lambda x: profile(x, t, g), [t]) == pytest.approx(1.0, rel=1e-13)
    assert float(P.exp_to_std(g)) == pytest.approx(np.sqrt(var) / t, rel=1e-12)


def test_std_to_exp_inverts_exp_to_std() -> None:
    g = np.concatenate([[0.0], np.logspace(-3, 3, 61)])
    np.testing.assert_allclose(P.std_to_exp(P.exp_to_std(g)), g, rtol=1e-12, atol=1e-14)
    s = np.linspace(0.005, P.MAX_STD, 50)
    np.testing.assert_allclose(P.exp_to_std(P.std_to_exp(s)), s, rtol=1e-13)
    assert P.std_to_exp(s).shape == s.shape and float(P.std_to_exp(P.MAX_STD)) == 0.0
    # EDM2's own pairs (§3.1: σ_rel 0.05 ↔ γ ≈ 16.97, 0.10 ↔ γ ≈ 6.94).
    np.testing.assert_allclose(P.std_to_exp([0.05, 0.10]), [16.97, 6.94], atol=5e-3)


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.29, float("nan")])
def test_std_out_of_range_is_refused(bad: float) -> None:
    with pytest.raises(ValueError):
        P.std_to_exp(bad)


# ---------------------------------------------------------------------------- β(t), eq. 127


@pytest.mark.parametrize("std", [0.05, 0.10, 0.2])
def test_beta_recursion_is_the_power_function_average(std: float) -> None:
    """θ̂ ← βθ̂ + (1−β)θ_k with eq. 127's β equals Σ_k (τ_k^(γ+1) − τ_(k−1)^(γ+1))/t^(γ+1) θ_k,
    i.e. ∫ p_t(τ)θ(τ)dτ for θ constant over each step — at every step."""
    g = float(P.std_to_exp(std))
    rng = np.random.default_rng(0)
    delta, n = 3.0, 400
    theta = rng.standard_normal(n)
    tau = delta * np.arange(n + 1)
    ema = 123.0  # the first β is 0, so the initial value must not matter
    for k in range(1, n + 1):
        beta = float(P.power_function_beta(std, tau[k], delta))
        if k == 1:
            assert beta == 0.0
        ema = beta * ema + (1.0 - beta) * theta[k - 1]
        w = (tau[1 : k + 1] ** (g + 1) - tau[:k] ** (g + 1)) / tau[k] ** (g + 1)
        assert ema == pytest.approx(float(np.dot(w, theta[:k])), rel=1e-11, abs=1e-13)
    # and β itself, from its definition
    assert float(P.power_function_beta(std, 80.0, 8.0)) == pytest.approx(0.9 ** (g + 1), 1e-15)


# ---------------------------------------------------------------------------- inner products


def test_correlation_is_the_l2_inner_product_of_the_profiles() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        ta, tb = rng.uniform(10.0, 1000.0, 2)
        sa, sb = rng.uniform(0.02, 0.28, 2)
        ga, gb = float(P.std_to_exp(sa)), float(P.std_to_exp(sb))
        ref = integrate(
            lambda x, ta=ta, ga=ga, tb=tb, gb=gb: profile(x, ta, ga) * profile(x, tb, gb),
            [ta, tb],
        )
        got = float(P.power_function_correlation(ta, sa, tb, sb))
        assert got == pytest.approx(ref, rel=1e-11)
        assert float(P.power_function_correlation(tb, sb, ta, sa)) == pytest.approx(got, 1e-14)
    # ⟨p, p⟩ = (γ+1)²/((2γ+1) t)
    g = float(P.std_to_exp(0.1))
    assert float(P.power_function_correlation(50.0, 0.1, 50.0, 0.1)) == pytest.approx(
        (g + 1) ** 2 / ((2 * g + 1) * 50.0), rel=1e-14
    )


def _gram_by_quadrature(ts, gs, out_t, out_g):
    breaks = [*ts, out_t]
    n = len(ts)
    a = np.empty((n, n))
    b = np.empty(n)
    for i in range(n):
        for k in range(n):
            a[i, k] = integrate(
                lambda x, i=i, k=k: profile(x, ts[i], gs[i]) * profile(x, ts[k], gs[k]), breaks
            )
        b[i] = integrate(lambda x, i=i: profile(x, ts[i], gs[i]) * profile(x, out_t, out_g), breaks)
    return a, b


def test_coefficients_are_the_l2_least_squares_fit() -> None:
    """Alg. 3 against the normal equations assembled by quadrature (then EDM2's rescaling to
    a unit sum); the tolerance is cond(A)·1e-13, the rounding of an exact solve."""
    nimg = [200.0, 400.0, 600.0, 800.0]
    std = [0.05, 0.10]
    ts = [t for t in nimg for _ in std]
    ss = [s for _ in nimg for s in std]
    gs = [float(g) for g in P.std_to_exp(ss)]
    for out_s in (0.03, 0.07, 0.15):
        a, b = _gram_by_quadrature(ts, gs, 800.0, float(P.std_to_exp(out_s)))
        x = np.linalg.solve(a, b)
        x /= x.sum()
        got = P.solve_posthoc_coefficients(ts, ss, 800.0, [out_s])
        assert got.shape == (len(ts), 1)
        tol = np.linalg.cond(a) * 1e-13
        np.testing.assert_allclose(got[:, 0], x, rtol=0, atol=tol * np.abs(x).max())
    # a tracked profile is reproduced by itself
    got = P.solve_posthoc_coefficients(ts, ss, 800.0, [0.05, 0.10])
    np.testing.assert_allclose(got[:, 0], np.eye(len(ts))[6], atol=1e-9)
    np.testing.assert_allclose(got[:, 1], np.eye(len(ts))[7], atol=1e-9)


# ---------------------------------------------------------------------------- synthetic run


class Scalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.v = nn.Parameter(torch.zeros(3, dtype=torch.float32))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))


def theta_of(tau: np.ndarray, total: float) -> np.ndarray:
    """A smooth known trajectory: drift plus a slow oscillation."""
    s = tau / total
    return 1.0 + 2.0 * s**2 + 0.5 * np.sin(6.0 * s)


DELTA, STEPS, EVERY = 8, 1600, 100
STD = (0.05, 0.10)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    """Train 'a model' whose weight follows theta_of; snapshot every EVERY steps."""
    d = tmp_path_factory.mktemp("phema")
    net = Scalar()
    ema = P.PowerFunctionEMA(net, std=STD)
    taus = DELTA * np.arange(1, STEPS + 1, dtype=np.float64)
    theta = theta_of(taus, float(taus[-1]))
    with torch.no_grad():
        for k in range(STEPS):
            net.w.fill_(float(theta[k]))
            net.v.fill_(float(theta[k]))
            net.count.fill_(k + 1)
            ema.update(net, (k + 1) * DELTA, DELTA)
            if (k + 1) % EVERY == 0:
                P.save_snapshot(d, ema.snapshot())
    return d, ema, theta


def direct_average(theta: np.ndarray, steps: int, std: float) -> float:
    g = float(P.std_to_exp(std))
    tau = DELTA * np.arange(steps + 1, dtype=np.float64)
    w = (tau[1:] ** (g + 1) - tau[:-1] ** (g + 1)) / tau[-1] ** (g + 1)
    return float(np.dot(w, theta[:steps]))


def test_tracked_profiles_are_the_direct_power_function_averages(run) -> None:
    _, ema, theta = run
    for i, s in enumerate(STD):
        assert float(ema.emas[i].w) == pytest.approx(direct_average(theta, STEPS, s), rel=1e-12)
        assert int(ema.emas[i].count) == STEPS


def test_reconstructing_a_tracked_profile_reproduces_it(run) -> None:
    d, ema, theta = run
    snaps = P.load_snapshots(d)
    assert [s.nimg for s in snaps] == [DELTA * EVERY * (j + 1) for j in range(STEPS // EVERY)]
    outs = P.reconstruct(snaps, list(STD))
    for i, out in enumerate(outs):
        ref = float(ema.emas[i].w)
        assert abs(float(out["w"]) - ref) <= 1e-6 * abs(ref)
        assert out["w"].dtype == torch.float64 and out["v"].dtype == torch.float32
        assert int(out["count"]) == STEPS  # buffers: the snapshot's
    # at an earlier snapshot
    mid = snaps[7]
    out = P.reconstruct(snaps, 0.05, at_nimg=mid.nimg)
    assert float(out["w"]) == pytest.approx(float(mid.emas[0]["w"]), rel=1e-6)
    assert float(out["w"]) == pytest.approx(direct_average(theta, 8 * EVERY, 0.05), rel=1e-6)


@pytest.mark.parametrize("out_std", [0.03, 0.07, 0.15])
def test_intermediate_profile_within_the_documented_tolerance(run, out_std: float) -> None:
    """Two tolerances for a σ_rel between/around the tracked ones.

    Proven: Σ x_i = 1 and every profile integrates to 1, so the residual profile
    r = Σ x_i p_i − p_out integrates to 0 and |reconstructed − ∫p_out θ| = |∫ r (θ − θ̄)| ≤
    ‖r‖₂ ‖θ − θ̄‖₂ (Cauchy–Schwarz; θ is constant per step, so the tracked EMAs and the direct
    average are exact integrals, and ‖r‖₂ is computed here by quadrature).
    Documented for this smooth trajectory, 16 snapshots × σ_rel {0.05, 0.10}: relative error
    ≤ 1e-3 (measured 3.6e-4 at 0.03, 3.5e-5 at 0.07, 1.3e-4 at 0.15).
    """
    d, _, theta = run
    snaps = P.load_snapshots(d)
    got = float(P.reconstruct(snaps, out_std)["w"])
    want = direct_average(theta, STEPS, out_std)
    ts = [float(s.nimg) for s in snaps for _ in s.std]
    ss = [sd for s in snaps for sd in s.std]
    gs = [float(g) for g in P.std_to_exp(ss)]
    t_out, g_out = float(snaps[-1].nimg), float(P.std_to_exp(out_std))
    x = P.solve_posthoc_coefficients(ts, ss, t_out, [out_std])[:, 0]
    assert float(np.sum(x)) == pytest.approx(1.0, abs=1e-12)

    def r2(tau):
        r = -profile(tau, t_out, g_out)
        for xi, ti, gi in zip(x, ts, gs):
            r = r + xi * profile(tau, ti, gi)
        return r**2

    res = np.sqrt(integrate(r2, ts))
    bound = res * np.sqrt(np.sum((theta - theta.mean()) ** 2) * DELTA)
    assert abs(got - want) <= bound
    assert abs(got - want) <= 1e-3 * abs(want)


# ---------------------------------------------------------------------------- state and files


def test_state_dict_round_trip_resumes_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    a = P.PowerFunctionEMA(net, std=STD)
    for k in range(1, 6):
        with torch.no_grad():
            net.weight.add_(torch.randn_like(net.weight))
        a.update(net, 4 * k, 4)
    torch.save(a.state_dict(), tmp_path / "s.pt")
    b = P.PowerFunctionEMA(nn.Linear(3, 2), std=STD)
    b.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    for k in range(6, 9):
        with torch.no_grad():
            net.weight.add_(torch.randn_like(net.weight))
        a.update(net, 4 * k, 4)
        b.update(net, 4 * k, 4)
    for ea, eb in zip(a.emas, b.emas):
        for (ka, va), (kb, vb) in zip(ea.state_dict().items(), eb.state_dict().items()):
            assert ka == kb and torch.equal(va, vb)
    assert b.cur_nimg == 32 and b.batch_size == 4
    with pytest.raises(ValueError, match="σ_rel"):
        P.PowerFunctionEMA(nn.Linear(3, 2), std=(0.05,)).load_state_dict(a.state_dict())
    with pytest.raises(ValueError):
        a.update(net, 32, 4)  # image count must increase


def _one_snapshot(d: Path, nimg: int = 16, std=STD, width: int = 3) -> Path:
    net = nn.Linear(width, 2)
    ema = P.PowerFunctionEMA(net, std=std)
    ema.update(net, nimg, 8 if nimg >= 8 else nimg)
    return P.save_snapshot(d, ema.snapshot())


def test_snapshot_file_round_trip(tmp_path: Path) -> None:
    path = _one_snapshot(tmp_path, 16)
    assert path.name == "phema-000000000016.pt"
    raw = torch.load(path, weights_only=True)
    assert raw["nimg"] == 16 and raw["std"] == list(STD) and raw["batch_size"] == 8
    (snap,) = P.load_snapshots(tmp_path)
    assert snap.nimg == 16 and snap.std == STD and snap.path == path
    assert snap.param_keys == ("weight", "bias")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left


def _expect(d: Path, name: str, match: str) -> None:
    with pytest.raises(P.PhemaError, match=match) as e:
        P.load_snapshots(d)
    assert name in str(e.value) and "\n" not in str(e.value)


def test_truncated_snapshot_is_refused(tmp_path: Path) -> None:
    _one_snapshot(tmp_path, 8)
    path = _one_snapshot(tmp_path, 16)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _expect(tmp_path, path.name, "unreadable")


def test_corrupt_snapshot_is_refused(tmp_path: Path) -> None:
    path = _one_snapshot(tmp_path, 16)
    raw = torch.load(path, weights_only=True)
    raw["emas"][1]["weight"][0, 0] += 1.0  # a flipped value, rewritten as a valid torch file
    torch.save(raw, path)
    _expect(tmp_path, path.name, "checksum")
    raw["emas"][1]["weight"][0, 0] -= 1.0
    raw["nimg"] = 24  # the metadata is covered too
    torch.save(raw, path)
    _expect(tmp_path, path.name, "checksum")


def test_bytes_flipped_on_disk_are_refused(tmp_path: Path) -> None:
    path = _one_snapshot(tmp_path, 16)
    data = bytearray(path.read_bytes())
    # every float of the profiles lies in the zip's data records; flip bytes across the file
    for off in range(64, len(data) - 64, max(1, len(data) // 17)):
        bad = bytearray(data)
        bad[off] ^= 0xFF
        path.write_bytes(bytes(bad))
        try:
            P.load_snapshots(tmp_path)
        except P.PhemaError as e:
            assert path.name in str(e)
        else:  # a flip that torch and the checksum both accept must leave the content intact
            (snap,) = P.load_snapshots(tmp_path)
            path.write_bytes(bytes(data))
            (good,) = P.load_snapshots(tmp_path)
            for a, b in zip(snap.emas, good.emas):
                assert all(torch.equal(a[k], b[k]) for k in a)
    path.write_bytes(b"not a torch file")
    _expect(tmp_path, path.name, "unreadable")


def test_missing_and_inconsistent_snapshots_are_refused(tmp_path: Path) -> None:
    _expect(tmp_path / "nope", "nope", "no post-hoc EMA snapshot directory")
    _expect(tmp_path, str(tmp_path), "no post-hoc EMA snapshots")
    _one_snapshot(tmp_path, 16)
    other = _one_snapshot(tmp_path, 24, std=(0.05, 0.15))
    _expect(tmp_path, other.name, "different runs")
    other.unlink()
    other = _one_snapshot(tmp_path, 24, width=4)
    _expect(tmp_path, other.name, "different model")
    other.unlink()
    wrong = _one_snapshot(tmp_path, 32)
    renamed = wrong.rename(wrong.with_name("phema-000000000040.pt"))
    _expect(tmp_path, renamed.name, "its name says")
    renamed.unlink()
    snaps = P.load_snapshots(tmp_path)
    with pytest.raises(P.PhemaError, match="no snapshot at 99 images"):
        P.reconstruct(snaps, 0.07, at_nimg=99)
    with pytest.raises(P.PhemaError):
        P.reconstruct(snaps, 0.5)
    with pytest.raises(P.PhemaError):
        P.reconstruct([], 0.07)


def test_interrupted_save_leaves_nothing_visible(tmp_path: Path, monkeypatch) -> None:
    first = _one_snapshot(tmp_path, 8)
    good = first.read_bytes()

    def crash(*a, **k):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        _one_snapshot(tmp_path, 16)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]
    (snap,) = P.load_snapshots(tmp_path)
    assert snap.nimg == 8 and first.read_bytes() == good

    # a writer killed mid-write (no cleanup) leaves only its temp file, which is ignored
    (tmp_path / ".phema-000000000016.pt.4242.tmp").write_bytes(good[: len(good) // 3])
    assert [s.nimg for s in P.load_snapshots(tmp_path)] == [8]

    # a failure inside torch.save after some bytes were written: same
    real_save = torch.save

    def half_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(RuntimeError, match="disk full"):
        _one_snapshot(tmp_path, 24)
    monkeypatch.setattr(torch, "save", real_save)
    assert [s.nimg for s in P.load_snapshots(tmp_path)] == [8]
