"""Shared fixtures of the vdmpp-kernels tests: the extension must load (these tests exist to
check it), and CUDA variants run only where a GPU and the CUDA kernels are present."""

from __future__ import annotations

import os

import pytest
import torch

import vdmpp.kernels as K

if not K.available():
    raise RuntimeError(f"vdmpp.kernels is installed but its extension did not load: {K.load_error}")

HAS_CUDA = torch.cuda.is_available() and K.has_kernel("heun_step", "cuda")
if os.environ.get("VDMPP_REQUIRE_CUDA") == "1" and not HAS_CUDA:  # the nox `gpu` session
    raise RuntimeError(
        "VDMPP_REQUIRE_CUDA=1 but CUDA kernels cannot run here: "
        f"torch.cuda.is_available()={torch.cuda.is_available()}, "
        f"CUDA kernel registered={K.has_kernel('heun_step', 'cuda')}"
    )

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA kernels"),
        ],
    ),
]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU and the CUDA build")


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param
