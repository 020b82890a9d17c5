"""``vdmpp-eval phema``: exports reconstructed from a run's power-function EMA snapshots equal
``vdmpp.train.phema.reconstruct``; ``sample`` takes them; a damaged snapshot is one line and
no export."""

from __future__ import annotations

import json

import pytest
import torch

from vdmpp.eval import commands
from vdmpp.eval.cli import main
from vdmpp.eval.model import EvalError
from vdmpp.eval.spec import SampleSpec
from vdmpp.train.export import load_exported
from vdmpp.train.phema import PowerFunctionEMA, load_snapshots, reconstruct, save_snapshot

from .conftest import write_tiny_export

BATCH = 8


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """RUN/export (the tiny model) and RUN/phema: 6 updates of a drifting model, σ_rel 0.05 and
    0.10 tracked, a snapshot after every second update (16, 32, 48 images)."""
    run = tmp_path_factory.mktemp("phema-run")
    write_tiny_export(run / "export")
    net, _ = load_exported(run / "export")
    ema = PowerFunctionEMA(net, std=(0.05, 0.10))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for step in range(1, 7):
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            ema.update(net, step * BATCH, BATCH)
            if step % 2 == 0:
                save_snapshot(run / "phema", ema.snapshot())
    return run


def _equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k].cpu(), b[k].cpu()), k


def test_one_std_equals_reconstruct(run, tmp_path):
    r = commands.phema(run, std=[0.08], out=tmp_path / "e", progress=False)
    assert r["at_images"] == 48 and r["snapshots"] == 3 and r["step"] == 6
    assert r["exports"] == [{"std": 0.08, "out": str(tmp_path / "e")}]
    model, meta = load_exported(tmp_path / "e")
    _equal(model.state_dict(), reconstruct(load_snapshots(run / "phema"), 0.08))
    assert meta["ema"] == {
        "kind": "power",
        "std": 0.08,
        "at_images": 48,
        "snapshots": 3,
        "tracked_std": [0.05, 0.10],
    }
    run_meta = json.loads((run / "export" / "model.json").read_text())
    for k in ("model", "parameterization", "process", "resolution", "num_classes", "schedule"):
        assert meta[k] == run_meta[k], k
    assert meta["step"] == 6 and meta["weights_sha256"] != run_meta["weights_sha256"]


def test_at_images_and_several_stds(run, tmp_path):
    r = commands.phema(run, std=[0.05, 0.12], at_images=32, out=tmp_path / "x", progress=False)
    assert [e["out"] for e in r["exports"]] == [
        str(tmp_path / "x" / "std-0.050"),
        str(tmp_path / "x" / "std-0.120"),
    ]
    want = reconstruct(load_snapshots(run / "phema"), [0.05, 0.12], 32)
    for e, w in zip(r["exports"], want):
        model, meta = load_exported(e["out"])
        _equal(model.state_dict(), w)
        assert meta["ema"]["at_images"] == 32 and meta["step"] == 4
    with pytest.raises(EvalError, match="no snapshot there"):
        commands.phema(run, std=[0.05], at_images=40, out=tmp_path / "y")
    assert not (tmp_path / "y").exists()


def test_sweep_cli_and_sample(run, tmp_path, capsys):
    rc = main(["phema", str(run), "--sweep", "--out", str(tmp_path / "sw"), "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    r = json.loads(cap.out)
    names = sorted(p.name for p in (tmp_path / "sw").iterdir() if not p.name.startswith("."))
    assert names == [f"std-{s}" for s in ("0.020", "0.032", "0.050", "0.080", "0.126", "0.200")]
    assert [e["std"] for e in r["exports"]] == [0.02, 0.032, 0.05, 0.08, 0.126, 0.2]
    s = commands.sample(
        tmp_path / "sw" / "std-0.080",
        seeds="0-3",
        out=tmp_path / "samples",
        spec=SampleSpec("euler", 2),
        grid=0,
        device="cpu",
        progress=False,
    )
    assert s["images"] == 4 and (tmp_path / "samples" / "samples.npz").is_file()
    b = commands.bpd(
        tmp_path / "sw" / "std-0.200", data="digits", limit=4, device="cpu", progress=False
    )
    assert b["images"] == 4 and b["bpd"] > 0


def test_corrupt_or_missing_snapshots_are_one_line(run, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(run, bad, symlinks=True)
    snap = sorted((bad / "phema").glob("phema-*.pt"))[1]
    data = bytearray(snap.read_bytes())
    data[len(data) // 2] ^= 0xFF
    snap.write_bytes(bytes(data))
    rc = main(["phema", str(bad), "--std", "0.08", "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert snap.name in err and not (tmp_path / "e").exists()
    shutil.rmtree(bad / "phema")
    rc = main(["phema", str(bad), "--std", "0.08", "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert rc == 2 and "no post-hoc EMA snapshot" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"std": [0.5]}, "σ_rel must lie in"),
        ({"std": []}, "give --std"),
        ({"std": [0.05, 0.05]}, "repeats"),
        ({"sweep": 1}, "at least 2"),
    ],
)
def test_refusals(run, tmp_path, kw, match):
    with pytest.raises(EvalError, match=match):
        commands.phema(run, out=tmp_path / "e", **kw)


def test_out_must_be_an_export(run, tmp_path):
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    with pytest.raises(EvalError, match="not an export"):
        commands.phema(run, std=[0.08], out=tmp_path / "keep")
    assert (tmp_path / "keep" / "notes.txt").read_text() == "mine"
    with pytest.raises(EvalError, match="the run's own export"):
        commands.phema(run, std=[0.08], out=run / "export")
    commands.phema(run, std=[0.08], out=tmp_path / "e")
    commands.phema(run, std=[0.09], out=tmp_path / "e")  # an export may be replaced
    assert load_exported(tmp_path / "e")[1]["ema"]["std"] == 0.09
