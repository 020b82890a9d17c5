"""A domain feature extractor for the built-in digits — NOT Inception.

Inception features mean little on 16×16 grey digits, and offline machines lack the weights. So
for ``--ref digits`` vdmpp-eval also trains (once, ~10 s on a CPU, cached) a small CNN on the
digits ``train`` split and registers it with torch-fidelity as the feature extractor
``vdmpp-digits``. Its 128-d penultimate features give a Fréchet distance ("digits FD", the FID
formula on these features; not comparable with any published FID) and its logits give the class
accuracy of class-conditional samples.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._compat import import_torch_fidelity
from .model import EvalError

__all__ = ["NAME", "DigitsNet", "classifier_path", "register", "train_classifier"]

NAME = "vdmpp-digits"
VERSION = 2
SIZE = 8  # the classifier sees every input as 8×8 grey (the digits' native size)


class DigitsNet(nn.Module):
    """uint8 [B, C, H, W] → (features [B, 128], logits [B, 10])."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    @staticmethod
    def prepare(x: Tensor) -> Tensor:
        x = x.float() / 127.5 - 1.0
        if x.shape[1] == 3:
            x = x.mean(1, keepdim=True)
        if x.shape[-2:] != (SIZE, SIZE):
            # area: undoes vdmpp-train's integer nearest-neighbour upscaling exactly
            x = F.interpolate(x, size=(SIZE, SIZE), mode="area")
        return x

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = F.relu(self.conv1(self.prepare(x)))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        feat = F.relu(self.fc1(h.flatten(1)))
        return feat, self.fc2(feat)


def _shift(x: Tensor, g: torch.Generator) -> Tensor:
    """Random ±1-pixel translations (zero fill), so samples slightly off-centre still classify."""
    dx, dy = (torch.randint(-1, 2, (2,), generator=g)).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train_classifier(steps: int = 400, seed: int = 0) -> tuple[DigitsNet, float]:
    """Train on the digits ``train`` split; return (net, accuracy on the ``test`` split)."""
    from .data import digits

    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = DigitsNet()
    xs, ys = digits("train", SIZE)
    x = torch.from_numpy(xs).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(ys)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        _, logits = net(_shift(x[idx], g))
        loss = F.cross_entropy(logits, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval().requires_grad_(False)
    xt, yt = digits("test", SIZE)
    with torch.no_grad():
        _, logits = net(torch.from_numpy(xt).permute(0, 3, 1, 2))
    acc = float((logits.argmax(1).numpy() == yt).mean())
    return net, acc


def cache_dir() -> Path:
    """``$VDMPP_CACHE`` or ``~/.cache/vdmpp`` (``$XDG_CACHE_HOME/vdmpp``)."""
    import os

    root = os.environ.get("VDMPP_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vdmpp"


def classifier_path() -> Path:
    """The cached classifier weights, trained on first use (safetensors; never a pickle)."""
    from safetensors.torch import save

    from vdmpp.train.fileio import write_atomic

    path = cache_dir() / "eval" / f"digits-classifier-v{VERSION}.safetensors"
    if not path.is_file():
        net, acc = train_classifier()
        state = {k: v.contiguous() for k, v in net.state_dict().items()}
        write_atomic(path, save(state, metadata={"test_accuracy": f"{acc:.4f}"}))
    return path


def classifier_accuracy() -> float:
    """Test-split accuracy recorded when the cached classifier was trained."""
    from safetensors import safe_open

    with safe_open(str(classifier_path()), "pt") as f:
        return float((f.metadata() or {}).get("test_accuracy", "nan"))


def _extractor_class():
    tf = import_torch_fidelity()
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class DigitsFeatureExtractor(FeatureExtractorBase):
        """torch-fidelity feature extractor ``vdmpp-digits``: features "128" and "logits"."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            from safetensors.torch import load_file

            self.net = DigitsNet()
            path = feature_extractor_weights_path or classifier_path()
            self.net.load_state_dict(load_file(str(path)))
            self.requires_grad_(False).eval()

        def forward(self, x):
            if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4):
                raise EvalError("the digits extractor takes uint8 [B, C, H, W] images")
            feat, logits = self.net(x)
            out = {"128": feat, "logits": logits}
            return tuple(out[a] for a in self.features_list)

        @staticmethod
        def get_provided_features_list():
            return "128", "logits"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"fid": "128", "kid": "128", "prc": "128", "isc": "logits"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 1, SIZE, SIZE, dtype=torch.uint8)

    return tf, DigitsFeatureExtractor


def register() -> str:
    """Register ``vdmpp-digits`` with torch-fidelity (once); return its name."""
    tf, cls = _extractor_class()
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if NAME not in FEATURE_EXTRACTORS_REGISTRY:
        tf.register_feature_extractor(NAME, cls)
    return NAME


def predict(images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class predictions of the cached digits classifier for uint8 [N, H, W, C] images."""
    from safetensors.torch import load_file

    net = DigitsNet()
    net.load_state_dict(load_file(str(classifier_path())))
    net.eval()
    preds = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(images[i : i + batch_size]).permute(0, 3, 1, 2)
            preds.append(net(x)[1].argmax(1).numpy())
    return np.concatenate(preds) if preds else np.zeros(0, np.int64)
