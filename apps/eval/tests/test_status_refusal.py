"""Results are reported only for finished runs (issue 14 item 3): ``sample``/``metrics``/``bpd``
refuse a run whose ``status.json`` is not ``done`` (one line, exit 2) unless
``--allow-partial``; a preempted quickstart exits non-zero and prints no numbers. And the eval
commands write no ``\\r`` when stderr is not a terminal."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vdmpp.eval.cli import main
from vdmpp.train.status import write_status

from .conftest import write_tiny_export

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def preempted_run(tmp_path):
    run = tmp_path / "run"
    write_tiny_export(run / "export")
    write_status(run, "preempted", step=3, steps=10, out=str(run))
    return run


def _one_line_refusal(capsys, rc: int) -> str:
    cap = capsys.readouterr()
    assert rc == 2 and cap.out == "", cap.out
    err = cap.err.strip().splitlines()
    assert len(err) == 1, cap.err
    assert "preempted at step 3/10, not done" in err[0] and "--allow-partial" in err[0]
    return err[0]


@pytest.mark.parametrize("where", ["run", "export", "file"])
def test_bpd_refuses_a_preempted_run(preempted_run, capsys, where):
    path = {
        "run": preempted_run,
        "export": preempted_run / "export",
        "file": preempted_run / "export" / "ema.safetensors",
    }[where]
    rc = main(["bpd", str(path), "--data", "digits:test", "--limit", "4", "--device", "cpu"])
    _one_line_refusal(capsys, rc)


def test_allow_partial_reports_with_a_warning(preempted_run, capsys):
    rc = main(
        [
            "bpd",
            str(preempted_run),
            "--data",
            "digits:test",
            "--limit",
            "4",
            "--device",
            "cpu",
            "--no-progress",
            "--allow-partial",
        ]
    )
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert json.loads(cap.out)["images"] == 4
    assert "WARNING" in cap.err and "preempted (--allow-partial)" in cap.err


def test_sample_and_metrics_refuse_a_preempted_run(preempted_run, tmp_path, capsys):
    out = tmp_path / "samples"
    rc = main(
        ["sample", str(preempted_run), "--seeds", "0-3", "--out", str(out), "--device", "cpu"]
    )
    _one_line_refusal(capsys, rc)
    assert not out.exists()  # refused before any work
    rc = main(["metrics", str(preempted_run), "--ref", "digits", "--num", "4", "--device", "cpu"])
    _one_line_refusal(capsys, rc)
    # samples drawn with --allow-partial: metrics on them refuses too (sample.json names the run)
    rc = main(
        [
            "sample",
            str(preempted_run / "export"),
            "--seeds",
            "0-3",
            "--steps",
            "2",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
            "--allow-partial",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    rc = main(["metrics", str(out), "--ref", "digits", "--device", "cpu"])
    _one_line_refusal(capsys, rc)


def test_a_done_run_passes_and_eval_logs_plain_lines(tmp_path):
    run = tmp_path / "run"
    write_tiny_export(run / "export")
    write_status(run, "done", step=10, steps=10)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "vdmpp.eval",
            "sample",
            str(run),
            "--seeds",
            "0-7",
            "--steps",
            "2",
            "--batch",
            "4",
            "--chunk",
            "4",
            "--out",
            str(tmp_path / "s"),
            "--device",
            "cpu",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "\r" not in r.stdout and "\r" not in r.stderr  # no tqdm bar into a pipe
    assert json.loads(r.stdout)["images"] == 8
    lines = r.stderr.strip().splitlines()
    # start, the progress line (plain, in place of a bar), end
    assert len(lines) == 3 and all("[vdmpp-eval] sample: " in x for x in lines), r.stderr
    assert "sample: 8/8 img (100%)" in lines[1] and "drew 8 images" in lines[2]


# --- the quickstart ------------------------------------------------------------------------------
_SMALL = [
    "data.resolution=8",
    "batch.global=8",
    "log.every=1",
    "optimizer.warmup_images=0",
    "model.overrides={model_channels=16, channel_mult=[1, 2], num_res_blocks=1, "
    "attention_resolutions=[], head_channels=16}",
]


def test_preempted_quickstart_exits_nonzero_and_prints_no_metrics(tmp_path):
    """The real trainer (tiny model) under scripts/quickstart.sh, SIGTERM after its first
    logged step — as SLURM preempts a job. vdmpp-eval must never be called."""
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    out = tmp_path / "qs"
    sets = " ".join(f"--set '{s}'" for s in _SMALL)
    (bin_dir / "vdmpp-train").write_text(f"""#!/usr/bin/env bash
"{sys.executable}" -m vdmpp.train "$@" {sets} &
pid=$!
while [[ ! -s "{out}/run/metrics.jsonl" ]] && kill -0 $pid 2>/dev/null; do sleep 0.1; done
kill -TERM $pid
wait $pid
""")
    marker = tmp_path / "eval-called"
    (bin_dir / "vdmpp-eval").write_text(f"#!/bin/sh\ntouch '{marker}'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}"
        f"{os.environ.get('PATH', '')}",
        "PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
        "VDMPP_QUICKSTART_OUT": str(out),
        "VDMPP_QUICKSTART_STEPS": "100000",
        "VDMPP_QUICKSTART_ALLOW_SYSTEM": "1",
        "OMP_NUM_THREADS": "1",
    }
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "quickstart.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert r.returncode == 75, r.stdout[-2000:] + r.stderr[-3000:]
    status = json.loads((out / "run" / "status.json").read_text())
    assert status["status"] == "preempted" and status["step"] >= 1
    assert f"training preempted at step {status['step']}/100000" in r.stderr, r.stderr[-2000:]
    assert "no results to report" in r.stderr
    for word in ("bits/dim", "Fréchet", "accuracy", "quickstart — done", "4/6", "5/6"):
        assert word not in r.stdout, word
    assert not marker.exists()  # no sampling, no metrics, no plots of a partial run
