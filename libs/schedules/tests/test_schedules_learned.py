"""VDM's learned monotone schedule (VDM App. H, eq. 59) and its variance gradient (I.2)."""

from __future__ import annotations

import pytest
import torch

from vdmpp.schedules import Learned, NoiseSchedule


def make(seed: int = 0, **kw) -> Learned:
    torch.manual_seed(seed)
    s = Learned(hidden=64, **kw).double()
    with torch.no_grad():  # a visibly non-linear shape
        s.w3.fill_(0.5)
    return s


def test_endpoints_monotone_inverse_and_density():
    s = make()
    assert isinstance(s, NoiseSchedule)
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    with torch.no_grad():
        lam = s.logsnr(t)
        assert lam[0].item() == pytest.approx(float(s.logsnr_max), abs=1e-12)
        assert lam[-1].item() == pytest.approx(float(s.logsnr_min), abs=1e-12)
        assert float(s.logsnr_min) == pytest.approx(-5.0) and float(s.logsnr_max) == pytest.approx(
            13.3
        )
        assert torch.all(lam[1:] < lam[:-1])
        assert torch.allclose(s.t(lam), t, atol=1e-9)
        grid = torch.linspace(-4.9, 13.2, 301, dtype=torch.float64)
        h = 1e-6
        fd = -(s.t(grid + h) - s.t(grid - h)) / (2 * h)
        assert torch.allclose(s.pdf(grid), fd, rtol=1e-5)
        fine = torch.linspace(-5.0, 13.3, 200_001, dtype=torch.float64)
        assert torch.trapezoid(s.pdf(fine), fine).item() == pytest.approx(1.0, abs=1e-6)
        lam2, p2 = s.logsnr_pdf(t)
        assert torch.allclose(p2, s.pdf(lam2), rtol=1e-6)


def _toy_loss(lam: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A per-example 'diffusion loss' 0.5·w/p·m(λ) with a fixed, λ-dependent error m."""
    return 0.5 * (1 + torch.tanh(lam / 4)) / p


def test_variance_gradient_equals_grad_of_squared_loss():
    """Shape params get ∇η Σ L_i² (eq. 60–62); endpoints get the plain ∇ Σ L_i."""
    t = torch.linspace(0.03, 0.97, 16, dtype=torch.float64)
    s = make()
    lam, p = s.logsnr_pdf(t)
    loss = _toy_loss(lam, p)
    s.report_loss(loss)
    loss.sum().backward()
    got = {n: q.grad.clone() for n, q in s.named_parameters()}

    ref = make(variance_grad=False)
    lam, p = ref.logsnr_pdf(t)
    loss = _toy_loss(lam, p)
    shape = [q for n, q in ref.named_parameters() if n != "ends"]
    want_shape = torch.autograd.grad((loss**2).sum(), shape, retain_graph=True)
    want_ends = torch.autograd.grad(loss.sum(), ref.ends)[0]
    for (n, _), w in zip([(n, q) for n, q in ref.named_parameters() if n != "ends"], want_shape):
        assert torch.allclose(got[n], w, rtol=1e-10, atol=1e-12), n
    assert torch.allclose(got["ends"], want_ends, rtol=1e-10)
    assert want_ends.abs().sum() > 0


def test_backward_without_report_is_a_clear_error():
    s = make()
    lam, p = s.logsnr_pdf(torch.rand(4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="report_loss"):
        _toy_loss(lam, p).sum().backward()


def test_endpoints_can_be_frozen_and_state_round_trips():
    s = make(learn_endpoints=False)
    assert "ends" not in dict(s.named_parameters())
    b = make(seed=1, learn_endpoints=False)
    b.load_state_dict(s.state_dict())
    t = torch.rand(8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(s.logsnr(t), b.logsnr(t))


def test_bad_arguments():
    with pytest.raises(ValueError):
        Learned(logsnr_min=1.0, logsnr_max=0.0)
    with pytest.raises(ValueError):
        Learned(hidden=0)
    with pytest.raises(ValueError):
        make().logsnr(torch.tensor([1.5], dtype=torch.float64))


def test_float32_finite():
    s = Learned()
    with torch.no_grad():
        lam, p = s.logsnr_pdf(torch.tensor([0.0, 0.5, 1.0]))
    assert torch.isfinite(lam).all() and torch.isfinite(p).all() and torch.all(p > 0)


def test_normalisation_constants_live_on_the_module_not_the_host():
    """t ∈ {0, 1} of the normalisation is a non-persistent buffer: it follows .to() (no
    host→device copy per call) and checkpoints keep their keys."""
    s = Learned(hidden=8)
    assert "_t01" not in s.state_dict() and s._t01.tolist() == [0.0, 1.0]
    d = s.double()
    assert d._t01.dtype == torch.float64
    lam, p = d.logsnr_pdf(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert lam.tolist() == pytest.approx([13.3, -5.0]) and bool((p > 0).all())
