"""Shared fixtures: a tiny random-weight export (no training needed) and a private cache dir."""

from __future__ import annotations

import pytest
import torch

TINY = {
    "model_channels": 16,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "attention_resolutions": [],
    "head_channels": 16,
    "in_channels": 1,
    "resolution": 8,
    "num_classes": 10,
}


def write_tiny_export(directory, parameterization: str = "eps", seed: int = 0):
    from vdmpp.train.export import build_model, write_export

    meta = {
        "model": {"name": "tiny", "overrides": TINY},
        "parameterization": parameterization,
        "process": "vp",
        "sigma_data": 0.5,
        "resolution": 8,
        "channels": 1,
        "num_classes": 10,
        "data_range": [-1, 1],
        "logsnr_min": -15.0,
        "logsnr_max": 15.0,
        "schedule": {"name": "cosine"},
        "step": 0,
    }
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model({"format": "vdmpp-model", "version": 1, **meta})
    write_export(directory, model.state_dict(), meta)
    return directory


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory):
    return write_tiny_export(tmp_path_factory.mktemp("run") / "export")


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """VDMPP_CACHE for the whole session (the digits classifier is trained once)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VDMPP_CACHE", str(tmp_path_factory.mktemp("vdmpp-cache")))
    mp.delenv("VDMPP_INCEPTION_WEIGHTS", raising=False)
    mp.setenv("VDMPP_OFFLINE", "1")  # never fetch 92 MB of Inception weights from a test
    yield
    mp.undo()
