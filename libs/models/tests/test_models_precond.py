"""EDM preconditioning (EDM Table 1) and the eps/v/x heads of `Preconditioned`."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vdmpp.models import Preconditioned, build, edm_coefficients, edm_coefficients_logsnr


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one intra-op thread is faster here, and immune to oversubscription when
    the CPU is shared (two threads on a busy 2-core box ran these tests 15× slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SIGMAS = [0.002, 0.05, 0.5, 1.0, 3.0, 80.0]


class ZeroNet(nn.Module):
    def forward(self, z, logsnr, class_labels=None):
        return torch.zeros_like(z)


class RecordingNet(nn.Module):
    """Returns a fixed tensor and remembers what it was called with."""

    def __init__(self, out=None):
        super().__init__()
        self.out = out
        self.calls = []

    def forward(self, z, logsnr, class_labels=None):
        self.calls.append((z.clone(), logsnr.clone(), class_labels))
        return torch.zeros_like(z) if self.out is None else self.out.clone()


def vp_alpha_sigma(lam):
    """VP process written out from α² = sigmoid(λ), σ² = sigmoid(−λ) (float64 reference)."""
    return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()


def b4(t):
    return t.reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_edm_coefficients_match_table1(sigma_data):
    sigma = torch.tensor(SIGMAS, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, sigma_data)
    for i, s in enumerate(SIGMAS):
        d = sigma_data
        assert c_skip[i].item() == pytest.approx(d**2 / (s**2 + d**2), rel=1e-12)
        assert c_out[i].item() == pytest.approx(s * d / math.sqrt(s**2 + d**2), rel=1e-12)
        assert c_in[i].item() == pytest.approx(1 / math.sqrt(s**2 + d**2), rel=1e-12)
        assert c_noise[i].item() == pytest.approx(0.25 * math.log(s), rel=1e-12)


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_edm_coefficients_in_logsnr_units(sigma_data):
    sigma = torch.tensor(SIGMAS, dtype=torch.float64)
    logsnr = (-2 * sigma.log()).float()  # λ = −2 ln σ
    ref = edm_coefficients(sigma, sigma_data)
    got = edm_coefficients_logsnr(logsnr, sigma_data)
    for r, g in zip(ref, got):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), r, rtol=2e-6, atol=1e-7)
    # finite and at the right limits far outside the usual range
    far = torch.tensor([-30.0, 30.0])
    c_skip, c_out, c_in, _ = edm_coefficients_logsnr(far, sigma_data)
    assert all(torch.isfinite(c).all() for c in (c_skip, c_out, c_in))
    assert c_skip[0] < 1e-10 and c_skip[1] == pytest.approx(1.0)
    assert c_out[0] == pytest.approx(sigma_data, rel=1e-6)  # σ → ∞: c_out → σ_d
    assert c_in[1] == pytest.approx(1 / sigma_data, rel=1e-6)  # σ → 0: c_in → 1/σ_d


def test_zero_net_denoiser_returns_c_skip_x_in_edm_units():
    x = torch.randn(len(SIGMAS), 2, 4, 4, dtype=torch.float64)
    sigma = torch.tensor(SIGMAS, dtype=torch.float64)
    model = Preconditioned(ZeroNet(), "edm", sigma_data=0.5, process="ve")
    d = model.denoise(x, -2 * sigma.log())  # VE: z is EDM's x at noise level σ
    c_skip = 0.25 / (sigma**2 + 0.25)
    torch.testing.assert_close(d, b4(c_skip) * x, rtol=1e-12, atol=0)


def test_zero_net_denoiser_returns_c_skip_x_in_logsnr_units():
    lam = torch.linspace(-12, 12, 7, dtype=torch.float64)
    x_edm = torch.randn(7, 3, 4, 4, dtype=torch.float64)
    alpha, _ = vp_alpha_sigma(lam)
    z_vp = b4(alpha) * x_edm  # the same noisy point in VP units (EDM eq. 4, s = α)
    model = Preconditioned(ZeroNet(), "edm", sigma_data=0.5)
    c_skip = 0.25 / (torch.exp(-lam) + 0.25)  # σ_d²/(σ² + σ_d²), σ² = e^{−λ}
    torch.testing.assert_close(model.denoise(z_vp, lam), b4(c_skip) * x_edm, rtol=1e-12, atol=0)
    ve = Preconditioned(ZeroNet(), "edm", sigma_data=0.5, process="ve")
    torch.testing.assert_close(ve.denoise(x_edm, lam), model.denoise(z_vp, lam))


@pytest.mark.parametrize("process", ["vp", "ve"])
def test_network_input_scaling(process):
    lam = torch.linspace(-10, 10, 5, dtype=torch.float64)
    z = torch.randn(5, 1, 2, 2, dtype=torch.float64)
    alpha_vp, sigma_vp = vp_alpha_sigma(lam)
    alpha = alpha_vp if process == "vp" else torch.ones_like(lam)
    sigma = sigma_vp if process == "vp" else torch.exp(-lam / 2)
    torch.testing.assert_close(sigma / alpha, torch.exp(-lam / 2))  # same σ_edm either way
    for param in ["edm", "eps", "v", "x"]:
        net = RecordingNet()
        Preconditioned(net, param, sigma_data=0.5, process=process)(z, lam)
        z_in, lam_in, labels = net.calls[0]
        torch.testing.assert_close(lam_in, lam)  # the net is conditioned on λ itself
        assert labels is None
        if param == "edm":
            _, _, c_in, _ = edm_coefficients(torch.exp(-lam / 2), 0.5)
            expected = b4(c_in) * z / b4(alpha)  # c_in · x_edm
        else:
            expected = b4(alpha_vp) * z / b4(alpha)  # the VP sample with the same λ
        torch.testing.assert_close(z_in, expected, rtol=1e-12, atol=1e-12)
    if process == "vp":  # plain heads see z unchanged
        net = RecordingNet()
        Preconditioned(net, "eps")(z, lam)
        torch.testing.assert_close(net.calls[0][0], z, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("process", ["vp", "ve"])
@pytest.mark.parametrize("param", ["edm", "eps", "v", "x"])
def test_denoise_recovers_x_from_the_exact_prediction(param, process):
    """An oracle net that outputs the true target makes denoise return the clean x exactly."""
    g = torch.Generator().manual_seed(0)
    lam = torch.linspace(-8, 8, 6, dtype=torch.float64)
    x = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    if process == "vp":
        alpha, sigma = (b4(t) for t in vp_alpha_sigma(lam))
    else:
        alpha, sigma = torch.ones(6, 1, 1, 1, dtype=torch.float64), b4(torch.exp(-lam / 2))
    z = alpha * x + sigma * eps
    if param == "edm":
        c_skip, c_out, _, _ = edm_coefficients(torch.exp(-lam / 2), 0.5)
        target = (x - b4(c_skip) * z / alpha) / b4(c_out)  # EDM eq. 8
    else:
        target = {"eps": eps, "x": x, "v": alpha * eps - sigma * x}[param]
    model = Preconditioned(RecordingNet(target), param, process=process)
    torch.testing.assert_close(model(z, lam), target, rtol=0, atol=0)  # forward = prediction
    torch.testing.assert_close(model.denoise(z, lam), x, rtol=1e-9, atol=1e-9)


def test_preconditioned_real_net_class_labels_and_dtype():
    torch.manual_seed(0)
    model = Preconditioned(build("tiny"), "edm").eval()
    z, lam = torch.randn(3, 1, 8, 8), torch.tensor([-5.0, 0.0, 5.0])
    out = model(z, lam, torch.tensor([1, 2, 3]))
    assert out.shape == z.shape and out.dtype == torch.float32
    # a fresh network is zero at the output (zero-initialised last conv): D = c_skip·z/α
    c_skip = torch.sigmoid(lam + math.log(0.25))
    torch.testing.assert_close(model.denoise(z, lam), b4(c_skip / torch.sigmoid(lam).sqrt()) * z)
    with pytest.raises(ValueError, match="logsnr"):
        model(z, torch.zeros(2))


def test_bad_arguments():
    with pytest.raises(ValueError, match="parameterization"):
        Preconditioned(ZeroNet(), "score")
    with pytest.raises(ValueError, match="process"):
        Preconditioned(ZeroNet(), "edm", process="subvp")
    with pytest.raises(ValueError, match="sigma_data"):
        Preconditioned(ZeroNet(), "edm", sigma_data=0.0)
