"""vdmpp::adaptive_ema_update and the data-parallel pair adaptive_bin_stats → all-reduce →
adaptive_apply_stats equal Adaptive.bin_stats + apply_stats (VDM++ App. F/H)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import vdmpp.kernels as K
from vdmpp.kernels import reference as R

HAS_CUDA = torch.cuda.is_available() and K.has_kernel("adaptive_ema_update", "cuda")
HAS_SCHEDULES = importlib.util.find_spec("vdmpp.schedules") is not None
LMIN, LMAX = -20.0, 20.0


def _state(bins, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ema = (torch.rand(bins, generator=g) * 2 + 0.1).to(device)
    return ema, R_cdf(ema)


def R_cdf(ema):
    c = torch.cumsum(ema.clamp_min(torch.finfo(ema.dtype).tiny), 0)
    c = torch.cat([c.new_zeros(1), c / c[-1:]])
    return torch.cat([c[:-1], c.new_ones(1)])


def _batch(kind, n, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":  # many hits per bin
        lam = torch.randn(n, generator=g) * 8
    elif kind == "wide":  # beyond both ends: clipped into the end bins
        lam = (torch.rand(n, generator=g) - 0.5) * 100
    elif kind == "one_bin":  # every example in a single bin
        lam = torch.full((n,), 3.3)
    elif kind == "edges":  # exactly on bin edges and the range ends
        lam = torch.linspace(LMIN, LMAX, n) if n > 1 else torch.full((n,), LMAX)
    else:
        raise AssertionError(kind)
    value = torch.rand(n, generator=g) * 5
    return lam.to(device), value.to(device)


def _step_ref(ema, cdf, lam, value, decay):
    R.adaptive_ema_update(ema, cdf, lam, value, decay, LMIN, LMAX)


@pytest.mark.parametrize("bins", [1, 7, 100, 333])
@pytest.mark.parametrize("n", [0, 1, 5, 256, 4097])
@pytest.mark.parametrize("kind", ["normal", "wide", "one_bin", "edges"])
def test_kernels_adaptive_matches_reference_bitwise_cpu(bins, n, kind):
    ema_k, cdf_k = _state(bins, "cpu")
    ema_r, cdf_r = ema_k.clone(), cdf_k.clone()
    for step in range(4):
        lam, value = _batch(kind, n, seed=step)
        K.adaptive_ema_update(ema_k, cdf_k, lam, value, 0.9, LMIN, LMAX)
        _step_ref(ema_r, cdf_r, lam, value, 0.9)
        assert torch.equal(ema_k, ema_r), step
        assert torch.equal(cdf_k, cdf_r), step
    assert cdf_k[0] == 0 and cdf_k[-1] == 1 and bool((cdf_k.diff() >= 0).all())


@pytest.mark.skipif(not HAS_SCHEDULES, reason="vdmpp-schedules not installed")
@pytest.mark.parametrize("n", [0, 1, 64, 1000])
def test_kernels_adaptive_matches_schedule_bin_stats_apply_stats(n):
    """Against the schedule's own reference path, with its weighting applied in Python."""
    from vdmpp.schedules import Adaptive

    w = lambda lam: torch.sigmoid(2.0 - lam)
    sched = Adaptive(w, bins=50, decay=0.95, logsnr_min=-15.0, logsnr_max=12.0)
    ema, cdf = sched.ema.clone(), sched.cdf.clone()
    for step in range(5):
        lam, loss = _batch("wide", n, seed=10 + step)
        sched.apply_stats(sched.bin_stats(lam, loss))
        value = w(lam) * loss
        K.adaptive_ema_update(ema, cdf, lam, value, 0.95, -15.0, 12.0)
        assert torch.equal(ema, sched.ema) and torch.equal(cdf, sched.cdf), step


def test_kernels_adaptive_non_finite_values_ignored_cpu():
    ema_k, cdf_k = _state(10, "cpu")
    ema_r, cdf_r = ema_k.clone(), cdf_k.clone()
    inf, nan = float("inf"), float("nan")
    lam = torch.tensor([-inf, inf, 0.5, 0.5, 7.0, -19.0, 19.9])
    value = torch.tensor([1.0, 2.0, inf, 3.0, nan, -inf, 4.0])
    K.adaptive_ema_update(ema_k, cdf_k, lam, value, 0.5, LMIN, LMAX)
    _step_ref(ema_r, cdf_r, lam, value, 0.5)
    assert torch.equal(ema_k, ema_r) and torch.equal(cdf_k, cdf_r)
    # only the finite pairs moved their bins: bin of 0.5 (value 3) and of 19.9 (value 4)
    moved = (ema_k != _state(10, "cpu")[0]).nonzero().flatten().tolist()
    assert moved == [5, 9]


@pytest.mark.parametrize("ldtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vdtype", [torch.float32, torch.bfloat16])
def test_kernels_adaptive_bf16_inputs_cpu(ldtype, vdtype):
    ema_k, cdf_k = _state(64, "cpu")
    ema_r, cdf_r = ema_k.clone(), cdf_k.clone()
    lam, value = _batch("normal", 777, seed=5)
    lam, value = lam.to(ldtype), value.to(vdtype)
    K.adaptive_ema_update(ema_k, cdf_k, lam, value, 0.99, LMIN, LMAX)
    _step_ref(ema_r, cdf_r, lam, value, 0.99)  # the reference upcasts to float32 too
    assert torch.equal(ema_k, ema_r) and torch.equal(cdf_k, cdf_r)


def test_kernels_adaptive_nan_logsnr_is_an_error_cpu():
    ema, cdf = _state(10, "cpu")
    ema0, cdf0 = ema.clone(), cdf.clone()
    lam = torch.tensor([0.0, float("nan"), 1.0])
    with pytest.raises(ValueError, match="logsnr contains NaN"):
        K.adaptive_ema_update(ema, cdf, lam, torch.ones(3), 0.9, LMIN, LMAX)
    assert torch.equal(ema, ema0) and torch.equal(cdf, cdf0)  # nothing written


def test_kernels_adaptive_zero_mass_is_uniform():
    """All EMA mass <= 0: every bin keeps the smallest normal float, so the cdf is uniform
    (not 0/0 = NaN) in the kernel and the reference alike."""
    ema_k = torch.full((4,), -1.0)
    cdf_k = torch.zeros(5)
    ema_r, cdf_r = ema_k.clone(), cdf_k.clone()
    lam, value = torch.tensor([0.0]), torch.tensor([-5.0])
    K.adaptive_ema_update(ema_k, cdf_k, lam, value, 0.5, LMIN, LMAX)
    _step_ref(ema_r, cdf_r, lam, value, 0.5)
    assert torch.equal(ema_k, ema_r) and torch.equal(cdf_k, cdf_r)
    assert torch.equal(cdf_k, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))


# --- the data-parallel pair: adaptive_bin_stats → (all-reduce) → adaptive_apply_stats --------
@pytest.mark.parametrize("bins", [1, 7, 100])
@pytest.mark.parametrize("n", [0, 1, 256, 4097])
@pytest.mark.parametrize("kind", ["normal", "wide", "one_bin", "edges"])
def test_kernels_pair_matches_reference_bitwise_cpu(bins, n, kind):
    """Three micro-batches accumulated into one stats, then one apply: bit-equal."""
    ema_k, cdf_k = _state(bins, "cpu")
    ema_r, cdf_r = ema_k.clone(), cdf_k.clone()
    for step in range(3):
        st_k, st_r = torch.zeros(2, bins), torch.zeros(2, bins)
        for micro in range(3):
            lam, value = _batch(kind, n, seed=10 * step + micro)
            K.adaptive_bin_stats(st_k, lam, value, LMIN, LMAX)
            R.adaptive_bin_stats(st_r, lam, value, LMIN, LMAX)
            assert torch.equal(st_k, st_r), (step, micro)
        K.adaptive_apply_stats(ema_k, cdf_k, st_k, 0.9)
        R.adaptive_apply_stats(ema_r, cdf_r, st_r, 0.9)
        assert torch.equal(ema_k, ema_r) and torch.equal(cdf_k, cdf_r), step


def test_kernels_pair_one_batch_equals_ema_update_cpu():
    """bin_stats into zeros then apply_stats is adaptive_ema_update, bit for bit."""
    ema_a, cdf_a = _state(64, "cpu")
    ema_b, cdf_b = ema_a.clone(), cdf_a.clone()
    lam, value = _batch("normal", 3000, seed=3)
    K.adaptive_ema_update(ema_a, cdf_a, lam, value, 0.99, LMIN, LMAX)
    stats = torch.zeros(2, 64)
    K.adaptive_bin_stats(stats, lam, value, LMIN, LMAX)
    K.adaptive_apply_stats(ema_b, cdf_b, stats, 0.99)
    assert torch.equal(ema_a, ema_b) and torch.equal(cdf_a, cdf_b)


def test_kernels_pair_summed_stats_equal_one_big_batch_counts():
    """Stats are sum-reducible: two ranks' stats summed (the all-reduce) count every example
    once, and the per-bin sums equal the whole batch's up to float32 summation order."""
    lam, value = _batch("normal", 2000, seed=4)
    whole, a, b = torch.zeros(2, 50), torch.zeros(2, 50), torch.zeros(2, 50)
    K.adaptive_bin_stats(whole, lam, value, LMIN, LMAX)
    K.adaptive_bin_stats(a, lam[:1000], value[:1000], LMIN, LMAX)
    K.adaptive_bin_stats(b, lam[1000:], value[1000:], LMIN, LMAX)
    reduced = a + b
    assert torch.equal(reduced[1], whole[1]) and float(reduced[1].sum()) == 2000
    torch.testing.assert_close(reduced[0], whole[0], rtol=1e-5, atol=1e-4)


def test_kernels_pair_non_finite_and_nan_cpu():
    inf, nan = float("inf"), float("nan")
    lam = torch.tensor([-inf, inf, 0.5, 0.5, 7.0, -19.0, 19.9])
    value = torch.tensor([1.0, 2.0, inf, 3.0, nan, -inf, 4.0])
    st_k, st_r = torch.zeros(2, 10), torch.zeros(2, 10)
    K.adaptive_bin_stats(st_k, lam, value, LMIN, LMAX)
    R.adaptive_bin_stats(st_r, lam, value, LMIN, LMAX)
    assert torch.equal(st_k, st_r)
    assert st_k[1].nonzero().flatten().tolist() == [5, 9] and float(st_k[1].sum()) == 2
    before = st_k.clone()
    with pytest.raises(ValueError, match="logsnr contains NaN"):
        K.adaptive_bin_stats(st_k, torch.tensor([0.0, nan]), torch.ones(2), LMIN, LMAX)
    assert torch.equal(st_k, before)  # nothing written


def test_kernels_pair_fractional_and_zero_counts_follow_reference():
    """apply_stats takes any reduced stats: mean = sum / max(count, 1), only count > 0 moves."""
    ema_k, cdf_k = _state(6, "cpu")
    ema_r, cdf_r = ema_k.clone(), cdf_k.clone()
    stats = torch.tensor([[3.0, 1.0, 0.0, -2.0, 5.0, 7.0], [2.0, 0.5, 0.0, 1.0, 0.0, 3.0]])
    K.adaptive_apply_stats(ema_k, cdf_k, stats, 0.8)
    R.adaptive_apply_stats(ema_r, cdf_r, stats, 0.8)
    assert torch.equal(ema_k, ema_r) and torch.equal(cdf_k, cdf_r)
    moved = (ema_k != _state(6, "cpu")[0]).nonzero().flatten().tolist()
    assert moved == [0, 1, 3, 5]


@pytest.mark.parametrize("op", ["ema_update", "bin_stats", "apply_stats"])
def test_kernels_adaptive_mutation_bumps_version_counters(op):
    """The schemas declare the mutation (Tensor(a!)), so the dispatcher bumps ._version of the
    mutated tensors: autograd sees an in-place change of a saved tensor."""
    ema, cdf = _state(8, "cpu")
    stats = torch.zeros(2, 8)
    lam, value = _batch("normal", 32, seed=1)
    v_ema, v_cdf, v_stats, v_lam = ema._version, cdf._version, stats._version, lam._version
    if op == "ema_update":
        K.adaptive_ema_update(ema, cdf, lam, value, 0.9, LMIN, LMAX)
    elif op == "bin_stats":
        K.adaptive_bin_stats(stats, lam, value, LMIN, LMAX)
    else:
        stats[1] += 1
        v_stats = stats._version
        K.adaptive_apply_stats(ema, cdf, stats, 0.9)
    if op == "bin_stats":
        assert stats._version > v_stats and ema._version == v_ema
    else:
        assert ema._version > v_ema and cdf._version > v_cdf and stats._version == v_stats
    assert lam._version == v_lam  # inputs read only
    # a tensor saved for backward and then mutated by the op: autograd must refuse
    w = torch.ones(8, requires_grad=True)
    y = (w * ema).sum() if op != "bin_stats" else (w * stats[0]).sum()
    if op == "bin_stats":
        K.adaptive_bin_stats(stats, lam, value, LMIN, LMAX)
    else:
        K.adaptive_ema_update(ema, cdf, lam, value, 0.9, LMIN, LMAX)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


# --- CUDA (skipped without a GPU) -------------------------------------------------------------
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA kernels")


def _ulps(a, b):
    """|a - b| in units of b's float32 ulp (elementwise)."""
    a, b = a.float().cpu(), b.float().cpu()
    ulp = torch.nextafter(b.abs(), torch.tensor(float("inf"))) - b.abs()
    return ((a - b).abs() / ulp).nan_to_num(0.0)


def _f64_stats(lam, value, bins):
    st = torch.zeros(2, bins, dtype=torch.float64)
    lam32, v32 = lam.float(), value.float()
    ok = torch.isfinite(lam32) & torch.isfinite(v32)
    width = float(torch.tensor((LMAX - LMIN) / bins, dtype=torch.float32))
    k = torch.floor((lam32[ok] - LMIN) / width).clamp(0, bins - 1).long()
    st[0].index_add_(0, k, v32[ok].double())
    st[1].index_add_(0, k, torch.ones_like(k, dtype=torch.float64))
    return st


@cuda
@pytest.mark.parametrize("bins", [1, 100, 2048])
@pytest.mark.parametrize("n", [0, 1, 256, 4096, 16384, 16385, 200_000])
@pytest.mark.parametrize("kind", ["normal", "wide", "one_bin"])
def test_kernels_adaptive_cuda_matches_float64_oracle(bins, n, kind):
    """CUDA sums per bin exactly (fixed point): the EMA and cdf equal the float32 steps applied
    to the float64 oracle's sums within a few ulp (not the CPU kernel's float32 running sums,
    which are the less accurate side: ~7e-6 relative off at n = 200000 in one bin)."""
    ema_o, cdf_o = _state(bins, "cpu")
    ema_g, cdf_g = ema_o.cuda(), cdf_o.cuda()
    for step in range(3):
        lam, value = _batch(kind, n, seed=step)
        K.adaptive_ema_update(ema_g, cdf_g, lam.cuda(), value.cuda(), 0.9, LMIN, LMAX)
        R.adaptive_apply_stats(ema_o, cdf_o, _f64_stats(lam, value, bins).float(), 0.9)
        assert float(_ulps(ema_g, ema_o).max()) <= 4, step
        assert float(_ulps(cdf_g, cdf_o).max()) <= 4, step
    assert cdf_g[0].item() == 0.0 and cdf_g[-1].item() == 1.0


@cuda
@pytest.mark.parametrize("bins", [1, 100, 2048])
@pytest.mark.parametrize("n", [0, 1, 4096, 16384, 16385, 200_000])
def test_kernels_pair_cuda_matches_float64_oracle(bins, n):
    """bin_stats: counts bitwise, sums within an ulp of the float64 oracle and bit-equal to the
    fixed-point sums of params.h as the CPU computes them; apply_stats on the same stats."""
    ema_c, cdf_c = _state(bins, "cpu")
    ema_g, cdf_g = ema_c.cuda(), cdf_c.cuda()
    st_o, st_g = torch.zeros(2, bins), torch.zeros(2, bins, device="cuda")
    for micro in range(2):
        lam, value = _batch("normal", n, seed=micro)
        st_o += torch.ops.vdmpp._debug_fixed_bin_sums(lam, value, bins, LMIN, LMAX).float()
        K.adaptive_bin_stats(st_g, lam.cuda(), value.cuda(), LMIN, LMAX)
        oracle = _f64_stats(lam, value, bins).float()
        one = torch.zeros(2, bins, device="cuda")
        K.adaptive_bin_stats(one, lam.cuda(), value.cuda(), LMIN, LMAX)
        assert torch.equal(one[1].cpu(), oracle[1])
        assert float(_ulps(one[0], oracle[0]).max()) <= 1
    assert torch.equal(st_g.cpu(), st_o)
    K.adaptive_apply_stats(ema_c, cdf_c, st_o, 0.9)
    K.adaptive_apply_stats(ema_g, cdf_g, st_o.cuda(), 0.9)  # same stats: only rounding differs
    assert float(_ulps(ema_g, ema_c).max()) <= 1
    assert float(_ulps(cdf_g, cdf_c).max()) <= 4


@cuda
@pytest.mark.parametrize("n", [4096, 16384, 16385, 1_000_000])
def test_kernels_adaptive_cuda_is_deterministic(n):
    """Same inputs, same bits: ten runs (one hot bin included) agree bitwise, and the one-block
    and multi-block paths give the same sums for the same batch."""
    lam, value = _batch("normal", n, seed=3, device="cuda")
    lam[: n // 2] = 3.3  # half the batch in one bin: heavy contention
    outs = []
    for _ in range(10):
        st = torch.zeros(2, 100, device="cuda")
        K.adaptive_bin_stats(st, lam, value, LMIN, LMAX)
        ema, cdf = _state(100, "cuda")
        K.adaptive_ema_update(ema, cdf, lam, value, 0.9, LMIN, LMAX)
        outs.append(torch.cat([st.flatten(), ema, cdf]).cpu())
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    ref = torch.ops.vdmpp._debug_fixed_bin_sums(lam.cpu(), value.cpu(), 100, LMIN, LMAX).float()
    assert torch.equal(outs[0][:200].view(2, 100), ref)


@cuda
def test_kernels_pair_cuda_graph_capture():
    """bin_stats → apply_stats capture in a CUDA graph (no host sync) and replay to eager."""
    ema, cdf = _state(100, "cuda")
    ema_e, cdf_e = ema.clone(), cdf.clone()
    lam, value = _batch("normal", 4096, seed=7, device="cuda")
    stats = torch.zeros(2, 100, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside capture
        K.adaptive_bin_stats(stats.clone(), lam, value, LMIN, LMAX)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        stats.zero_()
        K.adaptive_bin_stats(stats, lam, value, LMIN, LMAX)
        K.adaptive_apply_stats(ema, cdf, stats, 0.9)
    for _ in range(3):
        graph.replay()
        st = torch.zeros(2, 100, device="cuda")
        K.adaptive_bin_stats(st, lam, value, LMIN, LMAX)
        K.adaptive_apply_stats(ema_e, cdf_e, st, 0.9)
    torch.cuda.synchronize()
    assert torch.equal(ema, ema_e) and torch.equal(cdf, cdf_e)  # deterministic: bitwise


@cuda
def test_kernels_adaptive_cuda_masks_nan_logsnr():
    ema_g, cdf_g = _state(10, "cuda")
    ema_c, cdf_c = ema_g.cpu(), cdf_g.cpu()
    lam = torch.tensor([0.0, float("nan"), 1.0, float("inf")])
    value = torch.tensor([1.0, 9.0, 2.0, 3.0])
    K.adaptive_ema_update(ema_g, cdf_g, lam.cuda(), value.cuda(), 0.9, LMIN, LMAX)
    keep = torch.isfinite(lam)
    R.adaptive_apply_stats(ema_c, cdf_c, _f64_stats(lam[keep], value[keep], 10).float(), 0.9)
    assert float(_ulps(ema_g, ema_c).max()) <= 1


@cuda
@pytest.mark.parametrize("n", [4096, 100_000])
def test_kernels_adaptive_cuda_graph_capture(n):
    """No host sync: the update captures in a CUDA graph and replays to the eager result."""
    ema, cdf = _state(100, "cuda")
    ema_e, cdf_e = ema.clone(), cdf.clone()
    lam, value = _batch("normal", n, seed=7, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside capture
        K.adaptive_ema_update(ema.clone(), cdf.clone(), lam, value, 0.9, LMIN, LMAX)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        K.adaptive_ema_update(ema, cdf, lam, value, 0.9, LMIN, LMAX)
    for _ in range(3):
        graph.replay()
        K.adaptive_ema_update(ema_e, cdf_e, lam, value, 0.9, LMIN, LMAX)
    torch.cuda.synchronize()
    assert torch.equal(ema, ema_e) and torch.equal(cdf, cdf_e)  # deterministic: bitwise


@cuda
def test_kernels_adaptive_cuda_too_many_bins():
    ema = torch.ones(K.CUDA_MAX_BINS + 1, device="cuda")
    cdf = torch.zeros(K.CUDA_MAX_BINS + 2, device="cuda")
    lam, value = torch.zeros(3, device="cuda"), torch.ones(3, device="cuda")
    assert not K.can_use("adaptive_ema_update", ema, lam)
    with pytest.raises(RuntimeError, match="at most"):
        K.adaptive_ema_update(ema, cdf, lam, value, 0.9, LMIN, LMAX)
