"""Bits/dim: VDM's bound with an exact model equals the analytic entropy (within its SE).

Data: every dimension independently takes one of two values v_a, v_b of the 8-bit grid, with
probabilities p, 1 − p, so −log₂P(x)/D has mean H(p)/ln 2 (H in nats). For these data the exact
denoiser is known in closed form: with z = αx + σε (VP), the posterior over the two values has
logits log π_k − (z − αv_k)²/(2σ²), x̂ = Σ_k w_k v_k and ε̂ = (z − αx̂)/σ. With the exact
ε̂ the bound is tight up to the prior mismatch at λ_min (≈ α₁², tiny) and the decoder at λ_max
(whose noise σ₀ ≪ the gap between v_a and v_b), so E[bound] = H(p)/ln 2.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from vdmpp.eval.bpd import estimate_bpd
from vdmpp.eval.cli import main
from vdmpp.schedules import vp

VA, VB, P = -1 + 2 * 64 / 255, -1 + 2 * 191 / 255, 0.3


class TwoPointEps:
    """The exact ε-prediction for the two-point data, called as model(z, logsnr, labels)."""

    def __call__(self, z, logsnr, class_labels=None):
        a, s = vp(logsnr.double())
        a, s = (v.reshape(-1, *[1] * (z.ndim - 1)) for v in (a, s))
        z = z.double()
        la = math.log(P) - (z - a * VA) ** 2 / (2 * s * s)
        lb = math.log(1 - P) - (z - a * VB) ** 2 / (2 * s * s)
        w = torch.softmax(torch.stack([la, lb]), 0)
        return (z - a * (w[0] * VA + w[1] * VB)) / s


def test_bound_matches_entropy_of_known_distribution():
    g = torch.Generator().manual_seed(0)
    x = torch.where(torch.rand(1500, 1, 4, 4, generator=g) < P, VA, VB).double()
    exact = -(P * math.log(P) + (1 - P) * math.log(1 - P)) / math.log(2)
    r = estimate_bpd(TwoPointEps(), x, logsnr_min=-15.0, logsnr_max=15.0, draws=2, seed=1)
    assert r.images == 1500 and r.draws == 2 and 0 < r.stderr < 0.1
    assert abs(r.bpd - exact) < 3 * r.stderr, (r, exact)
    assert r.prior < 1e-6 and abs(r.reconstruction) < 1e-6  # the bound is tight at the ends


def test_a_wrong_model_costs_bits():
    """Predicting ε̂ = 0 (x̂ = z/α) instead of the exact ε̂ raises the bound well above H."""
    x = torch.where(torch.rand(400, 1, 4, 4) < P, VA, VB).double()
    exact = -(P * math.log(P) + (1 - P) * math.log(1 - P)) / math.log(2)
    r = estimate_bpd(
        lambda z, lam, class_labels=None: torch.zeros_like(z), x, logsnr_min=-15.0, logsnr_max=15.0
    )
    assert r.bpd > exact + 10 * r.stderr


def test_cli_bpd_on_digits(export_dir, capsys):
    rc = main(
        [
            "bpd",
            str(export_dir),
            "--data",
            "digits",
            "--limit",
            "40",
            "--draws",
            "2",
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["images"] == 40 and res["draws"] == 2
    assert math.isfinite(res["bpd"]) and res["bpd"] > 0 and res["stderr"] > 0


def test_cli_bpd_missing_data(export_dir, tmp_path, capsys):
    rc = main(["bpd", str(export_dir), "--data", str(tmp_path / "nope.npz"), "--device", "cpu"])
    assert rc == 2 and "no such data" in capsys.readouterr().err


@pytest.mark.parametrize("resolution", [16])
def test_cli_bpd_wrong_resolution(export_dir, tmp_path, capsys, resolution):
    import numpy as np

    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((4, resolution, resolution, 1), np.uint8))
    rc = main(["bpd", str(export_dir), "--data", str(path), "--device", "cpu"])
    assert rc == 2 and "the model takes" in capsys.readouterr().err
