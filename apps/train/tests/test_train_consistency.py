"""The three libraries agree on what a parameterization means.

vdmpp.models (Preconditioned.denoise), vdmpp.losses (parameterizations.to_x) and
vdmpp.samplers (as_denoiser) each turn a network output into x̂. They are separate
distributions, so only an app (which depends on all of them) can check they agree.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vdmpp.losses import parameterizations
from vdmpp.models import Preconditioned
from vdmpp.samplers import as_denoiser
from vdmpp.schedules import logsnr_from_sigma, ve, vp


class _Net(nn.Module):
    """A fixed random λ-conditioned 'network' (so the three wrappers see the same output)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4, dtype=torch.float64) * 0.3)

    def forward(self, z, logsnr, class_labels=None):
        return torch.tanh(z @ self.w) + 0.1 * logsnr.reshape(-1, 1)


@pytest.mark.parametrize("process", ["vp", "ve"])
@pytest.mark.parametrize("parameterization", ["eps", "x", "v", "edm"])
def test_models_losses_samplers_agree_on_x_hat(parameterization, process):
    torch.manual_seed(0)
    net = _Net()
    model = Preconditioned(net, parameterization, sigma_data=0.5, process=process).double()
    sigma = torch.tensor([0.01, 0.3, 1.0, 7.0, 60.0], dtype=torch.float64)
    x_edm = torch.randn(5, 4, dtype=torch.float64)  # EDM units: x = data + σ·n
    lam = logsnr_from_sigma(sigma)
    alpha, _ = (vp if process == "vp" else ve)(lam)
    z = alpha[:, None] * x_edm
    with torch.no_grad():
        out = model(z, lam)
        from_models = model.denoise(z, lam)
        from_losses = parameterizations.to_x(
            out, parameterization, z, lam, process=process, sigma_data=0.5
        )
        from_samplers = as_denoiser(model, parameterization, process, sigma_data=0.5)(x_edm, sigma)
    assert torch.allclose(from_models, from_losses, rtol=1e-9, atol=1e-9)
    assert torch.allclose(from_models, from_samplers, rtol=1e-9, atol=1e-9)
