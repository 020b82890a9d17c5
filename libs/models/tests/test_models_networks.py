"""UNet / UViT and the named configs: shapes, conditioning, determinism, gradients, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vdmpp.models import CONFIGS, PARAM_COUNTS, UNet, UViT, build, config, param_count


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one intra-op thread is faster here, and immune to oversubscription when
    the CPU is shared (two threads on a busy 2-core box ran these tests 15× slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Small versions of every config with the same structure (levels, attention placement,
# resolution, class count), used where the real size would be too slow on a 2-core CPU.
SMALL = {
    "tiny": {},
    "cifar32": dict(model_channels=16, num_res_blocks=1),
    "adm64": dict(model_channels=16, num_res_blocks=1, head_channels=16),
    "uvit128": dict(channels=(8, 16, 32), num_res_blocks=1, width=64, depth=2, heads=4),
}


def randomize(model: nn.Module, seed: int = 0, scale: float = 0.05) -> nn.Module:
    """Give the zero-initialised layers (last conv of each branch) small random weights.

    A fresh network outputs exactly zero and its inner layers get no gradient; tests that
    compare outputs or look for dead branches need every layer to contribute.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def inputs(net, batch=2, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    r, c = net.resolution, net.in_channels
    z = torch.randn(batch, c, r, r, generator=g).to(device)
    logsnr = torch.linspace(-6, 6, batch).to(device)
    labels = None
    if net.num_classes:
        labels = torch.arange(batch).remainder(net.num_classes).to(device)
    return z, logsnr, labels


def test_param_counts_table():
    for name in CONFIGS:
        assert param_count(name) == PARAM_COUNTS[name], name
    assert 0.5e6 < PARAM_COUNTS["tiny"] < 2e6
    assert 50e6 < PARAM_COUNTS["cifar32"] < 70e6  # DDPM++ (EDM) CIFAR-10: 56M
    assert 290e6 < PARAM_COUNTS["adm64"] < 300e6  # ADM ImageNet-64: 296M
    assert param_count("tiny", model_channels=16) < PARAM_COUNTS["tiny"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_shapes_on_meta_device(name):
    with torch.device("meta"):
        net = build(name)
        z, logsnr, labels = inputs(net, batch=2, device="meta")
        out = net(z, logsnr, labels)
    assert out.shape == z.shape and out.device.type == "meta"
    assert isinstance(net, UViT if CONFIGS[name]["arch"] == "uvit" else UNet)


@pytest.mark.parametrize(
    "name",
    [
        "tiny",
        "cifar32",
        pytest.param("adm64", marks=pytest.mark.slow),
        pytest.param("uvit128", marks=pytest.mark.slow),
    ],
)
def test_real_forward_at_full_size(name):
    torch.manual_seed(0)
    net = build(name).eval()
    randomize(net.conv_out)  # only the last layer: enough for a non-zero output, and cheap
    z, logsnr, labels = inputs(net, batch=1)
    with torch.no_grad():
        out = net(z, logsnr, labels)
    assert out.shape == z.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.abs().sum() > 0


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fresh_network_outputs_zero(name):
    net = build(name, **SMALL[name])
    z, logsnr, labels = inputs(net)
    assert torch.equal(net(z, logsnr, labels), torch.zeros_like(z))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_class_conditioning_and_null_class(name):
    torch.manual_seed(0)
    net = randomize(build(name, **SMALL[name])).eval()
    z, logsnr, _ = inputs(net)
    k = net.num_classes
    with torch.no_grad():
        a = net(z, logsnr, torch.tensor([0, 0]))
        b = net(z, logsnr, torch.tensor([1, 1]))
        null = net(z, logsnr, None)
        null_explicit = net(z, logsnr, torch.tensor([k, k]))
        mixed = net(z, logsnr, torch.tensor([0, k]))
    assert (a - b).abs().max() > 1e-4  # the label changes the output
    assert (a - null).abs().max() > 1e-4
    torch.testing.assert_close(null, null_explicit, rtol=0, atol=0)  # None is class k
    torch.testing.assert_close(mixed[0], a[0])
    torch.testing.assert_close(mixed[1], null[1])


def test_logsnr_conditioning_matters():
    torch.manual_seed(0)
    net = randomize(build("tiny")).eval()
    z = torch.randn(1, 1, 8, 8).expand(2, -1, -1, -1)
    with torch.no_grad():
        out = net(z, torch.tensor([-3.0, 3.0]))
    assert (out[0] - out[1]).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["cifar32", "uvit128"])
def test_dropout_only_in_train_mode(name):
    torch.manual_seed(0)
    net = randomize(build(name, **SMALL[name]))
    assert CONFIGS[name]["dropout"] > 0
    z, logsnr, labels = inputs(net)
    net.eval()
    with torch.no_grad():
        e1, e2 = net(z, logsnr, labels), net(z, logsnr, labels)
    assert torch.equal(e1, e2)
    net.train()
    with torch.no_grad():
        t1, t2 = net(z, logsnr, labels), net(z, logsnr, labels)
    assert (t1 - t2).abs().max() > 1e-5


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradient_reaches_every_parameter(name):
    torch.manual_seed(0)
    net = randomize(build(name, **SMALL[name], dropout=0.0))
    z, logsnr, labels = inputs(net)
    out = net(z.requires_grad_(), logsnr, labels)
    (out * torch.randn_like(out)).sum().backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"{name}: no gradient for {dead}"
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_gradient_reaches_fourier_input_layer():
    torch.manual_seed(0)
    net = randomize(build("tiny", fourier_features=(7, 8)))
    z, logsnr, labels = inputs(net)
    net(z, logsnr, labels).square().sum().backward()
    w = net.conv_in.weight.grad
    assert w.shape[1] == 5 and (w.abs().sum(dim=(0, 2, 3)) > 0).all()


@pytest.mark.parametrize("name", ["tiny", "uvit128"])
def test_bf16_autocast(name):
    torch.manual_seed(0)
    net = randomize(build(name, **SMALL[name])).eval()
    z, logsnr, labels = inputs(net)
    with torch.no_grad():
        ref = net(z, logsnr, labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(z, logsnr, labels)
    assert torch.isfinite(out).all()
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.05, rel  # bf16 has 8 mantissa bits: ~1% error through the network


@pytest.mark.parametrize("name", ["tiny", "cifar32", "uvit128"])
def test_channels_last_matches_contiguous(name):
    torch.manual_seed(0)
    net = randomize(build(name, **SMALL[name])).eval()
    z, logsnr, labels = inputs(net)
    with torch.no_grad():
        ref = net(z, logsnr, labels)
        net = net.to(memory_format=torch.channels_last)
        out = net(z.contiguous(memory_format=torch.channels_last), logsnr, labels)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bad_input_errors_name_the_config():
    net = build("tiny")
    with pytest.raises(ValueError, match=r"tiny: expected 1 input channels, got 3"):
        net(torch.randn(2, 3, 8, 8), torch.zeros(2))
    with pytest.raises(ValueError, match=r"tiny: spatial size 9x9 is not divisible .* factor 2"):
        net(torch.randn(2, 1, 9, 9), torch.zeros(2))
    with pytest.raises(ValueError, match=r"tiny: logsnr must have shape \[batch\]"):
        net(torch.randn(2, 1, 8, 8), torch.zeros(3))
    with pytest.raises(ValueError, match=r"tiny: expected z of shape"):
        net(torch.randn(1, 8, 8), torch.zeros(1))
    with pytest.raises(ValueError, match=r"tiny: class_labels must have shape"):
        net(torch.randn(2, 1, 8, 8), torch.zeros(2), torch.zeros(3, dtype=torch.long))
    assert net(torch.randn(2, 1, 16, 16), torch.zeros(2)).shape == (2, 1, 16, 16)  # 16×16 ok
    with torch.device("meta"):
        adm = build("adm64")
        with pytest.raises(ValueError, match=r"adm64: spatial size 60x60 .* factor 8"):
            adm(torch.randn(1, 3, 60, 60), torch.zeros(1))
        with pytest.raises(ValueError, match=r"adm64: expected 3 input channels, got 1"):
            adm(torch.randn(1, 1, 64, 64), torch.zeros(1))
        uvit = build("uvit128")
        with pytest.raises(ValueError, match=r"uvit128: built for 128x128 inputs, got 64x64"):
            uvit(torch.randn(1, 3, 64, 64), torch.zeros(1))
    with pytest.raises(ValueError, match=r"cifar32: resolution 30 is not divisible"):
        build("cifar32", resolution=30)
    with pytest.raises(ValueError, match="unknown model config 'cifar64'"):
        build("cifar64")
    with pytest.raises(ValueError, match="unconditional network got class_labels"):
        build("tiny", num_classes=None)(torch.randn(1, 1, 8, 8), torch.zeros(1), torch.zeros(1))


def test_build_overrides_and_config():
    net = build("tiny", resolution=16, num_classes=None, model_channels=16)
    assert net.resolution == 16 and net.num_classes is None and net.class_emb is None
    assert config("tiny")["name"] == "tiny"
    assert build("tiny", name="mine").name == "mine"
    with pytest.raises(ValueError, match="mine: expected 1 input channels"):
        build("tiny", name="mine")(torch.randn(1, 2, 8, 8), torch.zeros(1))
