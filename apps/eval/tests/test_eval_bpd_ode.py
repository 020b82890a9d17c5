"""``vdmpp-eval bpd --method ode|both``: the PF-ODE bits/dim end to end on a tiny export, its
dequantized conversion against an independent closed form, resume after an interruption, and
the refusals (bad method, tolerances, a changed setting, no torchdiffeq)."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch

from vdmpp.eval import commands
from vdmpp.eval import ode as O
from vdmpp.eval.cli import main
from vdmpp.eval.data import load_images
from vdmpp.eval.model import EvalError, from_uint8

from .conftest import TINY

pytest.importorskip("torchdiffeq")

# a small σ range and loose tolerances keep each ODE solve to ~30 evaluations of a micro UNet
FAST = {
    "rtol": 1e-2,
    "atol": 1e-2,
    "divergence": "hutchinson",
    "sigma_min": 0.01,
    "sigma_max": 2.0,
    "device": "cpu",
    "progress": False,
}
MICRO = {**TINY, "model_channels": 8, "channel_mult": [1], "head_channels": 8}


def _micro_export(directory, fill: bool):
    """A micro export; ``fill``: its zero-initialized layers (the output conv among them)
    filled with small noise, so that the denoiser is not D(x; σ) = x."""
    from vdmpp.train.export import build_model, write_export

    meta = {
        "model": {"name": "tiny", "overrides": MICRO},
        "parameterization": "eps",
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
        torch.manual_seed(0)
        state = build_model({"format": "vdmpp-model", "version": 1, **meta}).state_dict()
    if fill:
        g = torch.Generator().manual_seed(1)
        state = {
            k: torch.randn(v.shape, generator=g) * 0.01
            if v.is_floating_point() and not v.any()
            else v
            for k, v in state.items()
        }
    return write_export(directory, state, meta)


@pytest.fixture(scope="module")
def live_export(tmp_path_factory):
    return _micro_export(tmp_path_factory.mktemp("live") / "export", fill=True)


@pytest.fixture(scope="module")
def identity_export(tmp_path_factory):
    return _micro_export(tmp_path_factory.mktemp("identity") / "export", fill=False)


def _ode(export, out, **kw):
    args = {**FAST, "data": "digits", "method": "ode", "limit": 4, "ode_batch": 2, **kw}
    return commands.bpd(export, out=out, **args)


def test_ode_end_to_end_finite_with_nfe(live_export, tmp_path):
    r = _ode(live_export, tmp_path / "ode")
    assert r["method"] == "ode" and r["images"] == 4 and r["dims"] == 64
    assert math.isfinite(r["bpd"]) and r["stderr"] > 0 and r["nfe_mean"] > 0
    assert r["divergence"] == "hutchinson" and r["resumed_images"] == 0
    assert (r["sigma_min"], r["sigma_max"]) == (0.01, 2.0)
    assert "uniform" in r["dequantization"] and "upper bound" in r["bound"]
    assert sorted(p.name for p in (tmp_path / "ode" / "ode").iterdir()) == [
        "batch-00000000-00000001.npz",
        "batch-00000002-00000003.npz",
    ]
    json.dumps(r)  # the CLI prints it


def test_bits_per_dim_against_closed_form(identity_export, tmp_path):
    """The export's output layer is zero: ε̂ = 0, so D(x; σ) = x, the PF-ODE does not
    move and log p(x + u) = log N(x + u; 0, σ_max² I) exactly. With |u| ≤ Δ/2 ≪ σ_max the
    bits/dim is, to ~1e-6, −(log N(x; 0, σ_max²) + d log Δ)/(d ln 2), computed here from the
    images alone."""
    r = _ode(identity_export, tmp_path / "o", sigma_max=80.0, ode_batch=4)
    images, _ = load_images("digits", 8)
    x = from_uint8(images[:4]).double().reshape(4, -1)
    d, s, delta = 64, 80.0, 2 / 255
    log_p = -0.5 * d * math.log(2 * math.pi * s * s) - (x * x).sum(1) / (2 * s * s)
    want = (-(log_p + d * math.log(delta)) / (d * math.log(2))).numpy()
    got = [np.load(p)["bpd"] for p in sorted((tmp_path / "o" / "ode").glob("*.npz"))]
    np.testing.assert_allclose(np.concatenate(got), want, atol=1e-5)
    assert r["bpd"] == pytest.approx(want.mean(), abs=1e-5)
    # the conversion alone: nats → bits/dim with the 8-bit bin width
    nats = np.array([-100.0, 20.0])
    np.testing.assert_allclose(
        O.bits_per_dim_of_nats(nats, 64, delta), -nats / (64 * math.log(2)) + math.log2(127.5)
    )


def test_resume_after_interruption_equals_uninterrupted(live_export, tmp_path, monkeypatch):
    whole = _ode(live_export, tmp_path / "whole")
    real, calls = O._one_batch, []

    def dies_after_one(*a, **kw):
        if calls:
            raise KeyboardInterrupt  # killed during the second batch
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(O, "_one_batch", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        _ode(live_export, tmp_path / "cut")
    assert len(list((tmp_path / "cut" / "ode").glob("*.npz"))) == 1
    monkeypatch.setattr(O, "_one_batch", real)
    again = _ode(live_export, tmp_path / "cut")
    assert again["resumed_images"] == 2
    for k in ("bpd", "stderr", "nfe_mean", "nats_mean"):
        assert again[k] == whole[k], k
    with pytest.raises(EvalError, match=r"other settings.*rtol"):
        _ode(live_export, tmp_path / "cut", rtol=5e-3)


def test_both_side_by_side(live_export, tmp_path, capsys):
    rc = main(
        [
            "bpd",
            str(live_export),
            "--data",
            "digits",
            "--method",
            "both",
            "--count",
            "4",
            "--ode-batch",
            "4",
            "--draws",
            "2",
            "--rtol",
            "1e-2",
            "--atol",
            "1e-2",
            "--sigma-min",
            "0.01",
            "--sigma-max",
            "2",
            "--divergence",
            "hutchinson",
            "--out",
            str(tmp_path / "b"),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    r = json.loads(cap.out)
    assert r["method"] == "both" and r["vlb"]["images"] == r["ode"]["images"] == 4
    assert math.isfinite(r["vlb"]["bpd"]) and math.isfinite(r["ode"]["bpd"])
    assert r["ode"]["nfe_mean"] > 0
    assert r["ode_minus_vlb"]["mean"] == pytest.approx(r["ode"]["bpd"] - r["vlb"]["bpd"])


def test_default_sigmas_and_divergence():
    meta = {"logsnr_min": -15.0, "logsnr_max": 15.0, "channels": 1, "resolution": 8}
    assert O.default_sigmas(meta) == (0.002, 80.0)
    narrow = {**meta, "logsnr_min": -6.0, "logsnr_max": 10.0}
    assert O.default_sigmas(narrow) == pytest.approx((math.exp(-5), math.exp(3)))
    s = O.ODESettings().check().resolved(meta)
    assert s.divergence == "exact" and (s.sigma_min, s.sigma_max) == (0.002, 80.0)
    big = O.ODESettings().resolved({**meta, "channels": 3, "resolution": 32})
    assert big.divergence == "hutchinson"


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"method": "sde"}, "--method 'sde'"),
        ({"method": "ode", "rtol": 0.0}, "--rtol must be a positive"),
        ({"method": "ode", "atol": -1.0}, "--atol must be a positive"),
        ({"method": "ode", "sigma_min": 1.0, "sigma_max": 0.5}, "--sigma-min < --sigma-max"),
        ({"method": "both", "divergence": "trace"}, "--divergence 'trace'"),
        ({"method": "ode", "ode_batch": 0}, "--batch must be >= 1"),
    ],
)
def test_refusals(export_dir, kw, match):
    with pytest.raises(EvalError, match=match):
        commands.bpd(export_dir, data="digits", device="cpu", progress=False, **kw)


def test_cli_refusals_are_one_line(export_dir, capsys, monkeypatch):
    rc = main(["bpd", str(export_dir), "--data", "digits", "--method", "ode", "--rtol", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "--rtol must be a positive" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setitem(sys.modules, "torchdiffeq", None)  # as if it were not installed
    rc = main(["bpd", str(export_dir), "--data", "digits", "--method", "both", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "pip install 'vdmpp-samplers[likelihood]'" in err
    with pytest.raises(SystemExit) as e:  # argparse refuses an unknown method
        main(["bpd", str(export_dir), "--data", "digits", "--method", "sde"])
    assert e.value.code == 2
