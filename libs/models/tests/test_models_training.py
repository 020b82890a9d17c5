"""The tiny config learns on a CPU, and compiles without graph breaks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vdmpp.models import Preconditioned, build


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one intra-op thread is faster here, and immune to oversubscription when
    the CPU is shared (two threads on a busy 2-core box ran these tests 15× slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def digits_batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """n sklearn digits as 1×8×8 images in [−1, 1] (pixel values 0..16) and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.from_numpy(data.images[:n].astype(np.float32)) / 8.0 - 1.0
    return x[:, None], torch.from_numpy(data.target[:n]).long()


@pytest.mark.slow
@pytest.mark.parametrize("parameterization", ["eps", "edm"])
def test_tiny_overfits_a_batch_of_digits(parameterization):
    """Fixed (x, ε, λ): the loss of a memorisable batch falls at least 10× in 300 Adam steps."""
    torch.manual_seed(0)
    x, labels = digits_batch(8)
    eps = torch.randn_like(x)
    logsnr = torch.linspace(-4.0, 4.0, 8)
    alpha, sigma = torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()
    z = alpha[:, None, None, None] * x + sigma[:, None, None, None] * eps
    model = Preconditioned(build("tiny"), parameterization)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)

    def loss_fn() -> torch.Tensor:
        if parameterization == "eps":
            return (model(z, logsnr, labels) - eps).square().mean()
        # EDM: x-error weighted by 1/c_out² (EDM eq. 8), i.e. the F-error
        c_out = 0.5 * torch.exp(-logsnr / 2) / torch.sqrt(torch.exp(-logsnr) + 0.25)
        err = (model.denoise(z, logsnr, labels) - x) / c_out[:, None, None, None]
        return err.square().mean()

    losses = []
    for _ in range(300):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = losses[0], float(np.mean(losses[-10:]))
    assert first > 0.5, first  # a fresh network predicts F = 0 / ε̂ = 0: loss ≈ E[target²]
    assert last < first / 10, (first, last)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inside inductor, not ours
def test_torch_compile_tiny_fullgraph():
    torch.manual_seed(0)
    model = Preconditioned(build("tiny"), "edm").eval()
    with torch.no_grad():  # non-zero last layer so the comparison is not 0 == 0
        model.net.conv_out.weight.normal_(0, 0.05)
    z, logsnr = torch.randn(4, 1, 8, 8), torch.linspace(-5, 5, 4)
    labels = torch.tensor([0, 3, 9, 10])
    torch._dynamo.reset()
    # fullgraph=True: any graph break is an error. Inductor (C++ codegen) once, with labels;
    # the null-class path (class_labels=None) through the cheaper aot_eager backend.
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        ref = model(z, logsnr, labels)
        out = compiled(z, logsnr, labels)
        out_null = torch.compile(model, fullgraph=True, backend="aot_eager")(z, logsnr)
    assert ref.abs().max() > 1e-3
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_null, model(z, logsnr), rtol=1e-5, atol=1e-6)
