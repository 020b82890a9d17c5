"""The host-side setup the CUDA kernels share with the CPU ones (csrc/params.h), checked on the
CPU through the vdmpp::_debug_* ops: adaptive parameters, the launch plan and grid-stride loop of
heun_step/churn, and the fixed-point bin sums that make the CUDA adaptive reduction
deterministic. Also: every CPU instruction-set variant of heun_step/churn is bit-equal to the
reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import vdmpp.kernels as K
from vdmpp.kernels import reference as R

OPS = torch.ops.vdmpp
f32 = lambda v: float(np.float32(v))


# --- make_adaptive_params (0.2.0's CUDA make_params called itself forever) ----------------------
@pytest.mark.parametrize(
    ("bins", "decay", "lmin", "lmax"),
    [
        (100, 0.9, -20.0, 20.0),
        (7, 0.999, -15.0, 12.0),
        (1, 0.5, -1.0, 0.0),
        (2048, 0.3, -9.5, 3.25),
    ],
)
def test_adaptive_params_are_the_references_float32_values(bins, decay, lmin, lmax):
    p = OPS._debug_adaptive_params(bins, decay, lmin, lmax)
    assert p == [f32(lmin), f32((lmax - lmin) / bins), float(bins - 1), f32(decay),
                 f32(1 - decay), float(bins)]  # fmt: skip


def test_adaptive_params_refuse_bad_bins():
    with pytest.raises(RuntimeError, match="bins must lie in"):
        OPS._debug_adaptive_params(0, 0.9, -1.0, 1.0)


# --- launch plan and grid-stride loop of heun_step / churn ------------------------------------
MISALIGN = [[0, 0, 0], [4, 4, 4], [12, 12, 12], [2, 2, 2], [0, 4, 0], [2, 6, 2]]


@pytest.mark.parametrize(
    ("elem_size", "mis"),
    [(e, m) for e in (4, 2) for m in MISALIGN if all(x % e == 0 for x in m)],  # whole elements
)
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000, 65_537])
def test_elementwise_loop_visits_every_element_once(elem_size, n, mis):
    """One SM and one block per SM: the grid is a single block of 256 threads, so the
    grid-stride loop runs many trips (the second iteration and beyond)."""
    counts = OPS._debug_elementwise_coverage(n, elem_size, mis, 1, 1)
    assert counts.shape == (n,) and bool((counts == 1).all())
    head, n_vec, width, grid, threads, trips = OPS._debug_elementwise_plan(n, elem_size, mis, 1, 1)
    assert grid == 1 and threads == 256
    if len(set(mis)) == 1:  # same misalignment everywhere: a 16-byte body after a scalar head
        assert width == 16 // elem_size
        assert (mis[0] + head * elem_size) % 16 == 0 or head == n
        assert head < width and head + n_vec * width <= n < head + (n_vec + 1) * width + width
    else:
        assert (width, n_vec, head) == (1, 0, 0)
    if n == 65_537:
        assert trips > 1  # the loop's second iteration is reached


def test_elementwise_plan_grid_is_capped_by_the_device():
    """8 resident blocks per SM at most (132 SMs: an H200), at least one block."""
    n = 64 * 3 * 512 * 512
    *_, grid, threads, trips = OPS._debug_elementwise_plan(n, 4, [0, 0, 0, 0], 132, 8)
    assert grid == 132 * 8 and threads == 256
    assert trips == math.ceil(n / 4 / (grid * threads)) > 1
    assert OPS._debug_elementwise_plan(3, 4, [0, 0, 0], 132, 8)[3] == 1
    big = 2**31 + 5  # more than 2^31 elements: int64 indices, the tail still covered
    head, n_vec, width, *_ = OPS._debug_elementwise_plan(big, 2, [0, 0, 0], 132, 8)
    assert head == 0 and head + n_vec * width == big - 5


# --- fixed-point bin sums (the CUDA adaptive reduction) ----------------------------------------
def _oracle(lam, value, bins, lmin, lmax):
    """float64 per-bin sums and counts with the float32 binning of the kernels."""
    st = torch.zeros(2, bins, dtype=torch.float64)
    lam32, v32 = lam.float(), value.float()
    ok = torch.isfinite(lam32) & torch.isfinite(v32)
    width = f32((lmax - lmin) / bins)
    k = torch.floor((lam32[ok] - f32(lmin)) / width).clamp(0, bins - 1).long()
    st[0].index_add_(0, k, v32[ok].double())
    st[1].index_add_(0, k, torch.ones_like(k, dtype=torch.float64))
    return st


@pytest.mark.parametrize("kind", ["normal", "one_bin", "mixed_sign", "tiny_and_huge"])
@pytest.mark.parametrize("n", [1, 300, 16_384, 200_000])
def test_fixed_point_bin_sums_match_a_float64_oracle(kind, n):
    g = torch.Generator().manual_seed(n)
    lam = torch.randn(n, generator=g) * 8
    value = torch.rand(n, generator=g) * 5
    if kind == "one_bin":
        lam = torch.full((n,), 3.3)
    elif kind == "mixed_sign":
        value = torch.randn(n, generator=g) * 5
    elif kind == "tiny_and_huge":  # 40 orders of magnitude in one batch
        value = value * torch.pow(10.0, torch.randint(-30, 10, (n,), generator=g).float())
    got = OPS._debug_fixed_bin_sums(lam, value, 100, -20.0, 20.0)
    ref = _oracle(lam, value, 100, -20.0, 20.0)
    assert torch.equal(got[1], ref[1])  # counts exact
    # error bound of params.h: n * 2^-F of the bin's largest |value|, F = 62 - ceil(log2 n)
    frac = 62 - math.ceil(math.log2(max(n, 1)))
    biggest = torch.zeros(100, dtype=torch.float64)
    k = torch.floor((lam - f32(-20.0)) / f32(0.4)).clamp(0, 99).long()
    biggest.scatter_reduce_(0, k, value.abs().double(), "amax")
    bound = n * 2.0**-frac * biggest
    assert bool(((got[0] - ref[0]).abs() <= bound).all())
    if kind != "mixed_sign":  # non-negative: within one float32 ulp after rounding
        a, b = got[0].float(), ref[0].float()
        assert bool(((a == b) | ((a - b).abs() <= torch.finfo(torch.float32).eps * b.abs())).all())


def test_fixed_point_bin_sums_do_not_depend_on_order():
    """The property the CUDA atomics rely on: any order gives the same bits."""
    g = torch.Generator().manual_seed(1)
    lam, value = torch.randn(50_000, generator=g) * 8, torch.rand(50_000, generator=g)
    fwd = OPS._debug_fixed_bin_sums(lam, value, 64, -20.0, 20.0)
    assert torch.equal(fwd, OPS._debug_fixed_bin_sums(lam, value, 64, -20.0, 20.0, True))
    perm = torch.randperm(50_000, generator=g)
    assert torch.equal(fwd, OPS._debug_fixed_bin_sums(lam[perm], value[perm], 64, -20.0, 20.0))
    # while float32 sums in another order do differ (what the CPU kernel must avoid)
    s1 = torch.zeros(2, 64)
    s2 = torch.zeros(2, 64)
    K.adaptive_bin_stats(s1, lam, value, -20.0, 20.0)
    K.adaptive_bin_stats(s2, lam[perm], value[perm], -20.0, 20.0)
    assert not torch.equal(s1[0], s2[0])


def test_fixed_point_bin_sums_skip_non_finite_pairs():
    inf, nan = float("inf"), float("nan")
    lam = torch.tensor([-inf, inf, 0.5, 0.5, 7.0, -19.0, 19.9, nan])
    value = torch.tensor([1.0, 2.0, inf, 3.0, nan, -inf, 4.0, 1.0])
    got = OPS._debug_fixed_bin_sums(lam, value, 10, -20.0, 20.0)
    assert got[1].nonzero().flatten().tolist() == [5, 9]
    assert got[0, 5].item() == 3.0 and got[0, 9].item() == 4.0


# --- the CPU instruction-set variants -------------------------------------------------------
def _caps():
    start = OPS._debug_cpu_capability("")
    caps = []
    for c in ("default", "avx2", "avx512"):
        try:
            OPS._debug_cpu_capability(c)
            caps.append(c)
        except RuntimeError:
            pass
    OPS._debug_cpu_capability(start)
    return caps


@pytest.mark.parametrize("cap", _caps())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 31, 33, 100_003])
def test_every_cpu_variant_is_bit_equal_to_the_reference(cap, dtype, n):
    start = OPS._debug_cpu_capability("")
    try:
        assert OPS._debug_cpu_capability(cap) == cap
        g = torch.Generator().manual_seed(n)
        x, d1, d2 = (torch.randn(n, generator=g).mul(30).to(dtype) for _ in range(3))
        for t_hat, t_next in [(80.0, 57.58), (0.5, 0.002), (2.0, 0.0)]:
            nxt = None if t_next == 0.0 else d2
            assert torch.equal(K.heun_step(x, d1, nxt, t_hat, t_next),
                               R.heun_step(x, d1, nxt, t_hat, t_next))  # fmt: skip
            assert torch.equal(K.heun_step(x, d1, None, t_hat, t_next),
                               R.heun_step(x, d1, None, t_hat, t_next))  # fmt: skip
        assert torch.equal(K.churn(x, d1, 10.0, 12.5, 1.007), R.churn(x, d1, 10.0, 12.5, 1.007))
    finally:
        OPS._debug_cpu_capability(start)


def test_cpu_capability_refuses_unknown_names():
    with pytest.raises(RuntimeError, match="unknown"):
        OPS._debug_cpu_capability("sse9")


# --- can_use and the fake implementations ------------------------------------------------------
@pytest.mark.parametrize("op", ["adaptive_ema_update", "adaptive_bin_stats"])
def test_can_use_refuses_adaptive_inputs_requiring_grad_even_under_no_grad(op, monkeypatch):
    """The Autograd kernel rejects them in every grad mode, so can_use must say no."""
    monkeypatch.delenv("VDMPP_KERNELS", raising=False)
    buf = torch.ones(8) if op == "adaptive_ema_update" else torch.zeros(2, 8)
    lam = torch.randn(6, requires_grad=True)
    with torch.no_grad():
        assert not K.can_use(op, buf, lam, lam.detach())
        assert K.can_use(op, buf, lam.detach(), lam.detach())
        with pytest.raises(RuntimeError, match="requires grad"):
            if op == "adaptive_ema_update":
                K.adaptive_ema_update(buf, torch.zeros(9), lam, lam.detach(), 0.9, -5, 5)
            else:
                K.adaptive_bin_stats(buf, lam, lam.detach(), -5, 5)
        x = torch.randn(4, requires_grad=True)  # heun_step under no_grad: served
        assert K.can_use("heun_step", x, x)
        assert K.heun_step(x, x, None, 1.0, 0.5).requires_grad is False


def test_adaptive_fake_impls_check_device_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        ema, cdf = torch.ones(8), torch.zeros(9)
        lam = torch.zeros(5)
        OPS.adaptive_ema_update(ema, cdf, lam, lam, 0.9, -1.0, 1.0)  # fine
        with pytest.raises(RuntimeError, match="float32 or bfloat16"):
            OPS.adaptive_ema_update(ema, cdf, lam.double(), lam, 0.9, -1.0, 1.0)
        with pytest.raises(RuntimeError, match="float32 buffers"):
            OPS.adaptive_ema_update(ema.double(), cdf.double(), lam, lam, 0.9, -1.0, 1.0)
        with pytest.raises(RuntimeError, match="device"):
            OPS.adaptive_ema_update(ema, cdf, lam.to("meta"), lam, 0.9, -1.0, 1.0)
        stats = torch.zeros(2, 8)
        with pytest.raises(RuntimeError, match="device"):
            OPS.adaptive_bin_stats(stats, lam, lam.to("meta"), -1.0, 1.0)
        with pytest.raises(RuntimeError, match="stats must be float32"):
            OPS.adaptive_apply_stats(ema, cdf, stats.double(), 0.9)
        with pytest.raises(RuntimeError, match="device"):
            OPS.adaptive_apply_stats(ema, cdf, stats.to("meta"), 0.9)
