"""Hostile files for vdmpp-eval: a poisoned Inception cache is never returned unverified and no
feature-extractor weights file is ever unpickled (torch-fidelity asks for weights_only=False)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from vdmpp.eval import metrics as M
from vdmpp.eval.model import EvalError


class _Payload:
    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates the marker file when unpickled


def _fake_inception(path) -> dict:
    state = {k: torch.randn(4, 3) for k in M._INCEPTION_KEYS}
    torch.save(state, path)
    return state


def test_eval_poisoned_inception_cache_is_rebuilt_not_used(tmp_path) -> None:
    src = tmp_path / "inception.pth"
    state = _fake_inception(src)
    safe = M.inception_weights(src)
    marker = tmp_path / "pwned"
    with open(safe, "wb") as f:  # someone with write access to $VDMPP_CACHE swaps the file
        pickle.dump({"Conv2d_1a_3x3.conv.weight": _Payload(marker)}, f)
    again = M.inception_weights(src)
    got = torch.load(again, weights_only=True)  # what we hand to torch-fidelity is clean
    assert got.keys() == state.keys()
    for k in state:
        assert torch.equal(got[k], state[k])
    # a torn cache file is rebuilt too
    again.write_bytes(again.read_bytes()[:100])
    assert torch.load(M.inception_weights(src), weights_only=True).keys() == state.keys()
    assert not marker.exists()


def test_eval_feature_extractor_weights_are_never_unpickled(tmp_path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"Conv2d_1a_3x3.conv.weight": _Payload(marker)}, f)
    images = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(EvalError, match="unpickle"):
        M.extract_features(images, M.INCEPTION, ["2048"], weights=evil, cuda=False)
    assert not marker.exists(), "torch-fidelity unpickled the weights file"
