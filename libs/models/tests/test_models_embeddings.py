"""Fourier-feature inputs (VDM App. C) and the λ embedding."""

from __future__ import annotations

import math

import pytest
import torch

from vdmpp.models import (
    UNet,
    build,
    c_noise_from_logsnr,
    edm_coefficients,
    fourier_channels,
    fourier_features,
    sinusoidal_embedding,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one intra-op thread is faster here, and immune to oversubscription when
    the CPU is shared (two threads on a busy 2-core box ran these tests 15× slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_fourier_channel_count():
    z = torch.randn(2, 3, 4, 4)
    assert fourier_features(z).shape == (2, 2 * 2 * 3, 4, 4)  # n ∈ {7, 8}: sin and cos
    assert fourier_features(z, 5, 8).shape == (2, 2 * 4 * 3, 4, 4)
    assert fourier_channels(3) == 12 and fourier_channels(1, 5, 8) == 8
    with pytest.raises(ValueError, match="n_min"):
        fourier_features(z, 8, 7)


def test_fourier_values_at_known_inputs():
    # channel 0 holds 0, channel 1 holds 1/256: z·2^7·π = π/2 and z·2^8·π = π
    z = torch.zeros(1, 2, 1, 1)
    z[0, 1] = 1 / 256
    f = fourier_features(z, 7, 8)[0, :, 0, 0]
    # layout (k·N + i)·C + c: [sin n=7 (c0, c1), sin n=8 (..), cos n=7 (..), cos n=8 (..)]
    expected = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, -1.0])
    torch.testing.assert_close(f, expected, rtol=0, atol=1e-6)
    # general values against the formula sin(z 2^n π), cos(z 2^n π)
    z = torch.rand(2, 1, 3, 3, dtype=torch.float64) * 2 - 1
    f = fourier_features(z, 6, 8)
    assert f.dtype == torch.float64
    for i, n in enumerate(range(6, 9)):
        torch.testing.assert_close(f[:, i : i + 1], torch.sin(z * 2**n * math.pi))
        torch.testing.assert_close(
            f[:, 3 + i : 4 + i], torch.cos(z * 2**n * math.pi).float().double()
        )


def test_unet_with_fourier_features_widens_its_input():
    net = UNet(
        in_channels=1,
        resolution=8,
        model_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(),
        fourier_features=(7, 8),
    )
    assert net.conv_in.in_channels == 1 + 4
    net_plain = build("tiny")
    assert net_plain.conv_in.in_channels == 1
    assert build("tiny", fourier_features=(7, 8)).conv_in.in_channels == 5
    out = net(torch.rand(2, 1, 8, 8), torch.zeros(2))
    assert out.shape == (2, 1, 8, 8)


def test_c_noise_is_edm_quarter_log_sigma():
    sigma = torch.tensor([0.002, 0.5, 1.0, 80.0], dtype=torch.float64)
    torch.testing.assert_close(c_noise_from_logsnr(-2 * sigma.log()), edm_coefficients(sigma)[3])


def test_sinusoidal_embedding_values():
    x = torch.tensor([0.0, 1.0])
    e = sinusoidal_embedding(x, 8, max_freq=8.0)  # frequencies 1, 2, 4, 8
    assert e.shape == (2, 8) and e.dtype == torch.float32
    torch.testing.assert_close(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    f = torch.tensor([1.0, 2.0, 4.0, 8.0])
    torch.testing.assert_close(e[1], torch.cat([f.cos(), f.sin()]))
    with pytest.raises(ValueError):
        sinusoidal_embedding(x, 7)
