"""Metrics: FID of a set with itself ≈ 0, growing with noise; offline Inception weights; errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from vdmpp.eval import metrics as M
from vdmpp.eval._compat import import_torch_fidelity, import_torchvision
from vdmpp.eval.data import digits, load_images
from vdmpp.eval.model import EvalError


def _noised(x: np.ndarray, std: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(x + rng.normal(0, std, x.shape), 0, 255).astype(np.uint8)


def test_torchvision_imports_on_this_torch():
    tv = import_torchvision()
    assert hasattr(tv, "__version__")
    assert hasattr(import_torch_fidelity(), "calculate_metrics")


@pytest.mark.slow
def test_digits_frechet_distance_self_zero_and_grows_with_noise():
    x, _ = digits("test")
    self_fd = M.compute_metrics(x, x, extractor="digits", metrics=("fid",))["fid"]
    assert abs(self_fd) < 1e-6
    fds = [
        M.compute_metrics(_noised(x, s), x, extractor="digits", metrics=("fid",))["fid"]
        for s in (8, 24, 64)
    ]
    assert 0 < fds[0] < fds[1] < fds[2], fds
    # precision/recall of a set against itself are 1; KID and IS run
    m = M.compute_metrics(x, x, extractor="digits", metrics=("prc", "kid", "isc"), kid_subsets=5)
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    assert np.isfinite(m["kid_mean"]) and m["isc_mean"] > 1


def _random_inception_state() -> dict[str, torch.Tensor]:
    """torch-fidelity's inception-v3-compat with random weights (its loader bypassed once)."""
    import_torch_fidelity()
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    mp = pytest.MonkeyPatch()
    mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
    mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
    try:
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        mp.undo()
    state = net.state_dict()
    for k, v in state.items():  # He init, so features survive ~50 layers (PyTorch's default
        if k.endswith("conv.weight"):  # shrinks them to ~0 and every FID would read 0)
            torch.nn.init.kaiming_normal_(v, nonlinearity="relu")
    return state


@pytest.mark.slow
def test_offline_inception_weights_end_to_end(tmp_path, monkeypatch):
    """A random-weight Inception saved as a plain state dict (the format torch-fidelity's
    ``feature_extractor_weights_path`` takes: ``torch.save(state_dict)``) runs FID/KID/PR/IS."""
    path = tmp_path / "inception.pth"
    torch.save(_random_inception_state(), path)
    x, _ = digits("test")
    x = x[:16]
    y = _noised(x, 64)
    m = M.compute_metrics(
        x, x, weights=path, metrics=("fid", "kid", "prc", "isc"), cuda=False, kid_subsets=3
    )
    assert abs(m["fid"]) < 1e-3 and m["precision"] == 1.0
    monkeypatch.setenv("VDMPP_INCEPTION_WEIGHTS", str(path))  # the env var route
    m2 = M.compute_metrics(y, x, metrics=("fid",), cuda=False)
    assert m2["fid"] > m["fid"] + 1e-6


def test_missing_inception_weights_message(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(EvalError) as e:
        M.inception_weights(tmp_path / "nope.pth")
    msg = str(e.value)
    assert "nope.pth does not exist" in msg and M.INCEPTION_URL in msg
    assert "--inception-weights" in msg and "VDMPP_INCEPTION_WEIGHTS" in msg
    assert M.inception_weights(None, required=False) is None  # nothing anywhere: skip quietly
    with pytest.raises(EvalError, match="Inception weights not found"):
        M.inception_weights(None)


def test_pickled_inception_weights_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"fc.weight": Evil()}, f)
    with pytest.raises(EvalError, match="refusing to unpickle"):
        M.inception_weights(path)
    bad = tmp_path / "other.pth"
    torch.save({"w": torch.zeros(1)}, bad)
    with pytest.raises(EvalError, match="not torch-fidelity's Inception"):
        M.inception_weights(bad)


def test_missing_reference_data_is_a_clear_error(tmp_path):
    with pytest.raises(EvalError, match="no such data"):
        load_images(tmp_path / "missing")
    with pytest.raises(EvalError, match=r"no \.tar shards"):
        load_images(str(tmp_path))
    bad = tmp_path / "x.npz"
    np.savez(bad, other=np.zeros(3))
    with pytest.raises(EvalError, match="'images'"):
        load_images(bad)
    with pytest.raises(EvalError, match="split"):
        load_images("digits:validation")


def test_shards_roundtrip(tmp_path):
    """Shards written by vdmpp-train are read back image for image."""
    from vdmpp.train.data import write_shards

    write_shards("digits", tmp_path / "shards", resolution=8, maxcount=500)
    images, labels = load_images(str(tmp_path / "shards"))
    ref, ref_labels = digits("train", 8)  # `vdmpp-train shards digits` writes the train split
    assert images.shape == ref.shape
    order = np.lexsort(images.reshape(len(images), -1).T)
    order_ref = np.lexsort(ref.reshape(len(ref), -1).T)
    np.testing.assert_array_equal(images[order], ref[order_ref])
    assert sorted(labels.tolist()) == sorted(ref_labels.tolist())


def _serve(monkeypatch, tmp_path, payload: bytes, prefix: str) -> Path:
    """Point the download at a local file:// URL; the hub cache at tmp_path/hub."""
    src = tmp_path / "served.pth"
    src.write_bytes(payload)
    monkeypatch.setattr(M, "INCEPTION_URL", src.as_uri())
    monkeypatch.setattr(M, "INCEPTION_SHA256_PREFIX", prefix)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv("VDMPP_OFFLINE")
    return tmp_path / "hub" / "checkpoints" / M.INCEPTION_FILE


def test_inception_weights_downloaded_when_online(tmp_path, monkeypatch):
    import hashlib
    import io

    state = {k: torch.randn(2, 2) for k in M._INCEPTION_KEYS}
    buf = io.BytesIO()
    torch.save(state, buf)
    blob = buf.getvalue()
    dst = _serve(monkeypatch, tmp_path, blob, hashlib.sha256(blob).hexdigest()[:8])
    safe = M.inception_weights(None)  # nothing local: fetched into torch hub's cache
    assert dst.read_bytes() == blob
    assert torch.load(safe, weights_only=True).keys() == state.keys()
    assert [f.name for f in dst.parent.iterdir()] == [dst.name]  # no partial file left
    assert M.inception_weights(None, required=False) == safe  # now found locally


def test_inception_download_refused_on_digest_mismatch_or_offline(tmp_path, monkeypatch):
    dst = _serve(monkeypatch, tmp_path, b"not the weights", "6726825d")
    with pytest.raises(EvalError, match="does not start with 6726825d"):
        M.inception_weights(None)
    assert not dst.parent.exists() or not any(dst.parent.iterdir())  # nothing half-written
    monkeypatch.setattr(M, "INCEPTION_URL", "http://inception.invalid/w.pth")
    with pytest.raises(EvalError, match=r"Inception weights not found.*URLError"):
        M.inception_weights(None)  # unreachable host: the offline message, with the reason

    def never(*a, **k):
        raise AssertionError("VDMPP_OFFLINE=1 must not touch the network")

    import urllib.request

    monkeypatch.setattr(urllib.request, "urlopen", never)
    monkeypatch.setenv("VDMPP_OFFLINE", "1")
    with pytest.raises(EvalError, match="VDMPP_OFFLINE is set"):
        M.inception_weights(None)
    assert not dst.exists()
