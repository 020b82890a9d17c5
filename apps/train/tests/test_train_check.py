"""``vdmpp-train --check`` is a real dry run: every start-up check of a run, nothing written.

Each failure case: exit 2, exactly one line on stderr naming the key and the fix, no traceback,
and the working directory and the run directory untouched.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vdmpp.train.cli import main


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*"))


def _check(args: list[str], tmp_path: Path, monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.chdir(tmp_path)
    rc = main(["digits", "--check", "--set", f"out={tmp_path / 'run'}", *args])
    out, err = capsys.readouterr()
    assert _files(tmp_path) == [], "--check wrote files"
    return rc, out, err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_check_prints_the_summary_and_writes_nothing(tmp_path, monkeypatch, capsys) -> None:
    rc, out, err = _check(["--set", "batch.per_device=8"], tmp_path, monkeypatch, capsys)
    assert rc == 0, err
    for key in (
        "parameters",
        "per-device 8",
        "accumulation 4",
        "world size 1",
        "λ range",
        "[-15, 15]",
        "Sigmoid(bias=0.0)",
        "v head",
        "adaptive (100 bins",
        "digits (built in)",
    ):
        assert key in out, (key, out)
    assert len(out.strip().splitlines()) <= 24  # one screen
    # the parameter count is the model's
    from vdmpp.train import config as C
    from vdmpp.train.objective import build_net

    n = sum(p.numel() for p in build_net(C.load("digits")).parameters())
    assert f"{n / 1e6:.2f}M parameters" in out


def test_check_world_size_changes_the_split(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    rc, out, err = _check([], tmp_path, monkeypatch, capsys)
    assert rc == 0, err
    assert "per-device 8 × accumulation 1 × world size 4" in out
    monkeypatch.setenv("WORLD_SIZE", "3")  # 32 is not divisible by 3
    rc, out, err = _check([], tmp_path, monkeypatch, capsys)
    assert rc == 2 and "world size 3" in _one_line(err)


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["objective.weighting=sigmod"], ["objective.weighting", "'sigmoid'"]),
        (["objective.weighting_args={bais=1.0}"], ["weighting_args.bais", "'bias'"]),
        (
            ["objective.adaptive=false", "objective.schedule_args={shfit=1.0}"],
            ["schedule_args.shfit", "'shift'"],
        ),
        (["objective.schedule=cosin"], ["objective.schedule", "'cosine'"]),
        (["objective.parameterization=flow"], ["parameterization", "flow_ot"]),
        (["objective.adaptive=true", "objective.schedule=learned"], ["adaptive = false"]),
        (
            ["objective.adaptive=false", "objective.schedule_args={logsnr_min=-5.0}"],
            ["objective.logsnr_min"],
        ),
        (["model.name=tiyn"], ["model.name", "'tiny'"]),
        (["data.source=missing/shards"], ["vdmpp-train shards SRC missing/shards --resolution 8"]),
        (["data.channels=3"], ["data.channels = 1"]),
        (["batch.global=30", "batch.per_device=8"], ["batch.per_device"]),
    ],
    ids=lambda v: v[0] if isinstance(v, list) and v and "=" in v[0] else None,
)
def test_check_refuses_with_one_line(args, expect, tmp_path, monkeypatch, capsys) -> None:
    sets = [a for s in args for a in ("--set", s)]
    rc, out, err = _check(sets, tmp_path, monkeypatch, capsys)
    line = _one_line(err)
    assert rc == 2 and out == "", (rc, out)
    assert line.startswith("vdmpp-train: error: ")
    for e in expect:
        assert e in line, (e, line)


def test_check_unavailable_device(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, _, err = _check(["--set", "device=cuda"], tmp_path, monkeypatch, capsys)
    line = _one_line(err)
    assert rc == 2 and "device = 'cuda'" in line and "device = 'cpu'" in line


def test_check_probes_real_shards(tmp_path, monkeypatch, capsys) -> None:
    """Shards of the wrong resolution are found by --check (one decoded sample), not at step 1."""
    from vdmpp.train.data import write_shards

    shards = tmp_path.parent / f"{tmp_path.name}-shards"
    write_shards("digits", shards, maxcount=500, resolution=16)
    rc, out, err = _check(
        ["--set", f"data.source={shards}", "--set", "data.resolution=16"],
        tmp_path,
        monkeypatch,
        capsys,
    )
    assert rc == 0 and "first sample decodes" in out, err
    rc, out, err = _check(["--set", f"data.source={shards}"], tmp_path, monkeypatch, capsys)
    assert rc == 2 and "--resolution 8" in _one_line(err)


def test_check_refuses_existing_run_without_resume(tmp_path, monkeypatch, capsys) -> None:
    run = tmp_path.parent / f"{tmp_path.name}-run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "ckpt-000000010.pt").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert main(["digits", "--check", "--set", f"out={run}"]) == 2
    assert "--resume" in _one_line(capsys.readouterr().err)


def test_check_subprocess_has_no_traceback(cli, tmp_path) -> None:
    r = cli(["digits", "--check", "--set", "objective.weighting=sigmod"], cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert _one_line(r.stderr).startswith("vdmpp-train: error:")
    assert _files(tmp_path) == []
