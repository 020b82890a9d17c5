"""vdmpp::heun_step and vdmpp::churn equal the pure-PyTorch references (EDM Alg. 1/2)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import vdmpp.kernels as K
from vdmpp.kernels import reference as R

DTYPES = [torch.float32, torch.bfloat16]
HAS_CUDA = torch.cuda.is_available() and K.has_kernel("heun_step", "cuda")

SHAPES = [(0,), (1,), (7,), (13, 1), (3, 5, 17), (2, 3, 33, 31), (0, 3, 8, 8), (4, 3, 16, 16)]
STEPS = [(80.0, 57.58), (1.3, 0.7), (0.5, 0.002), (2.0, 0.0)]  # (t_hat, t_next)


def _sampler_refs():
    """vdmpp.samplers' own references, when that library is importable."""
    if importlib.util.find_spec("vdmpp.samplers") is None:
        return []
    from vdmpp.samplers import _step

    return [_step]


def _inputs(shape, dtype, device, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(shape, generator=g) * s for s in (scale, 1.0, 1.1)]
    return [t.to(dtype).to(device) for t in ts]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("correct", [False, True])
def test_kernels_heun_step_matches_reference_bitwise(device, dtype, shape, correct):
    for t_hat, t_next in STEPS:
        if correct and t_next == 0.0:
            continue  # the step to σ = 0 is Euler
        x, d1, d2 = _inputs(shape, dtype, device, scale=t_hat)
        d2 = d2 if correct else None
        out = K.heun_step(x, d1, d2, t_hat, t_next)
        assert out.dtype == dtype and out.shape == x.shape and out.device == x.device
        # Same float32 operation order as the reference: bit-identical on CPU. The CUDA kernel
        # divides exactly (the CUDA reference multiplies by a reciprocal), so it is compared
        # with the CPU kernel bitwise and with the CUDA reference to a ulp-level tolerance.
        if device == "cpu":
            for ref in [R, *_sampler_refs()]:
                assert torch.equal(out, ref.heun_step(x, d1, d2, t_hat, t_next)), ref.__name__
        else:
            cpu = K.heun_step(x.cpu(), d1.cpu(), None if d2 is None else d2.cpu(), t_hat, t_next)
            assert torch.equal(out.cpu(), cpu)
            ref = R.heun_step(x, d1, d2, t_hat, t_next)
            tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {}
            torch.testing.assert_close(out, ref, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_churn_matches_reference_bitwise(device, dtype, shape):
    x, noise, _ = _inputs(shape, dtype, device, seed=1)
    cases = [(10.0, 12.5, 1.007), (0.3, 0.3, 1.0), (0.0, 0.5, 0.9), (1.0, 1.4, 0.0)]
    for t, t_hat, s_noise in cases:
        out = K.churn(x, noise, t, t_hat, s_noise)
        assert out.dtype == dtype and out.shape == x.shape
        if device == "cpu":
            for ref in [R, *_sampler_refs()]:
                assert torch.equal(out, ref.churn(x, noise, t, t_hat, s_noise)), ref.__name__
        else:
            assert torch.equal(out.cpu(), K.churn(x.cpu(), noise.cpu(), t, t_hat, s_noise))
    # No churn (t̂ = t) returns x exactly; the result is a new tensor, inputs untouched.
    x0 = x.clone()
    out = K.churn(x, noise, 0.7, 0.7, 1.0)
    assert torch.equal(out, x)
    assert out.data_ptr() != x.data_ptr() or x.numel() == 0
    assert torch.equal(x, x0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_heun_step_unaligned_views(device, dtype):
    """Contiguous views at an odd offset take the scalar path on CUDA; results are unchanged."""
    x, d1, d2 = _inputs((1 + 2 * 3 * 19 * 23,), dtype, device, seed=2)
    xs, d1s, d2s = x[1:], d1[1:], d2[1:]
    assert xs.is_contiguous()
    out = K.heun_step(xs, d1s, d2s, 3.0, 2.0)
    assert torch.equal(out.cpu(), R.heun_step(xs.cpu(), d1s.cpu(), d2s.cpu(), 3.0, 2.0))
    out = K.churn(xs, d1s, 2.0, 3.0, 1.0)
    assert torch.equal(out.cpu(), R.churn(xs.cpu(), d1s.cpu(), 2.0, 3.0, 1.0))


@pytest.mark.parametrize(
    "dtypes",
    [
        ("bf16", "f32", "f32"),
        ("bf16", "bf16", "f32"),
        ("f32", "bf16", "bf16"),
        ("f32", "bf16", None),
    ],
)
def test_kernels_mixed_float32_bf16_operands_match_reference(device, dtypes):
    """A bf16 sample with a float32 denoiser output (and vice versa): every operand upcast to
    float32, the result in x_hat's dtype — exactly the reference's policy."""
    dt = {"bf16": torch.bfloat16, "f32": torch.float32}
    x, d1, d2 = _inputs((2, 3, 17, 9), torch.float32, device, seed=6, scale=3.0)
    x, d1 = x.to(dt[dtypes[0]]), d1.to(dt[dtypes[1]])
    d2 = None if dtypes[2] is None else d2.to(dt[dtypes[2]])
    assert K.can_use("heun_step", x, d1, d2)
    out = K.heun_step(x, d1, d2, 3.0, 2.0)
    assert out.dtype == x.dtype
    ref = R.heun_step(x.cpu(), d1.cpu(), None if d2 is None else d2.cpu(), 3.0, 2.0)
    assert torch.equal(out.cpu(), ref)
    out = K.churn(x, d1, 2.0, 3.0, 1.01)
    assert out.dtype == x.dtype
    assert torch.equal(out.cpu(), R.churn(x.cpu(), d1.cpu(), 2.0, 3.0, 1.01))
    torch.library.opcheck(torch.ops.vdmpp.heun_step.default, (x, d1, d2, 3.0, 2.0))


def test_kernels_heun_step_large_parallel_cpu():
    """Big enough for at::parallel_for to split the work: still bitwise."""
    x, d1, d2 = _inputs((3, 3, 256, 257), torch.float32, "cpu", seed=3, scale=10.0)
    assert torch.equal(K.heun_step(x, d1, d2, 10.0, 7.0), R.heun_step(x, d1, d2, 10.0, 7.0))
    assert torch.equal(K.heun_step(x, d1, None, 10.0, 7.0), R.heun_step(x, d1, None, 10.0, 7.0))


def test_kernels_heun_step_special_values_cpu():
    """inf/NaN propagate exactly as in the reference (bf16 NaN compared as NaN)."""
    x = torch.tensor([float("inf"), -1.0, float("nan"), 3.0e38, 0.0])
    d = torch.tensor([1.0, float("inf"), 0.0, -3.0e38, -0.0])
    for dtype in DTYPES:
        a, b = x.to(dtype), d.to(dtype)
        out, ref = K.heun_step(a, b, b, 0.5, 0.25), R.heun_step(a, b, b, 0.5, 0.25)
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)


cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA kernels")


@cuda_only
@pytest.mark.parametrize("op", ["heun_step", "churn"])
def test_kernels_cuda_uses_current_stream(op):
    """On a side stream: a ~50 ms sleep, then new inputs are written, then the op. An op that
    ignored the current stream would run at once on the default stream and read the old
    inputs; the result is compared on the side stream's order only."""
    x, d1, d2 = _inputs((4, 3, 64, 64), torch.float32, "cuda", seed=4)
    new = [t + 1.5 for t in (x, d1, d2)]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU cycles before the copies below
        for dst, src in zip((x, d1, d2), new):
            dst.copy_(src)
        if op == "heun_step":
            out = K.heun_step(x, d1, d2, 2.0, 1.0)
        else:
            out = K.churn(x, d1, 1.0, 2.0, 1.0)
    s.synchronize()
    cpu = [t.cpu() for t in new]
    want = (K.heun_step(*cpu, 2.0, 1.0) if op == "heun_step"
            else K.churn(cpu[0], cpu[1], 1.0, 2.0, 1.0))  # fmt: skip
    assert torch.equal(out.cpu(), want)


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_kernels_cuda_grid_stride_loop_and_offset_views(dtype, offset):
    """More elements than the grid has threads (8 blocks per SM): every thread runs the
    grid-stride loop several times; views at an offset take the aligned vector body after a
    scalar head. Bit-equal to the CPU kernel."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    n = sms * 8 * 256 * 16 * 3 + 7  # >= 3 trips of the vector loop
    x, d1, d2 = _inputs((n + offset,), dtype, "cuda", seed=8, scale=3.0)
    x, d1, d2 = x[offset:], d1[offset:], d2[offset:]
    out = K.heun_step(x, d1, d2, 3.0, 2.0)
    assert torch.equal(out.cpu(), K.heun_step(x.cpu(), d1.cpu(), d2.cpu(), 3.0, 2.0))
    out = K.churn(x, d1, 2.0, 3.0, 1.0)
    assert torch.equal(out.cpu(), K.churn(x.cpu(), d1.cpu(), 2.0, 3.0, 1.0))
