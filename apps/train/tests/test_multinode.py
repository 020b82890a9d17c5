"""Multi-node launch paths, exercised as far as one machine allows (issue 14 item 5): 2 gloo
CPU ranks through the README's torchrun command and through the environment an ``srun`` job
step gives each task (no torchrun), both into the same entry point ``python -m vdmpp.train``.

Not exercised here: more than one host, NCCL/GPUs, SLURM itself (sbatch/srun/scontrol), the
c10d rendezvous across nodes and requeue after preemption — see the README."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vdmpp.train.checkpoint import find_latest
from vdmpp.train.trainer import dist_env

ROOT = Path(__file__).resolve().parents[3]
_CLEAN = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_LOCALID",
    "SLURM_STEP_ID",
)


def _sets(small: list[str], out, *extra: str) -> list[str]:
    base = [s for s in small if not s.startswith("log.progress")]  # default: true
    return [
        a for s in [*base, "steps=2", "log.every=1", f"out={out}", *extra] for a in ("--set", s)
    ]


def _check_two_rank_run(out: str, err: str, run) -> None:
    results = out.splitlines()
    assert len(results) == 1, out  # one result line per run, not per rank
    result = json.loads(results[0])
    assert result["status"] == "done" and result["step"] == 2, result
    assert "\r" not in out and "\r" not in err  # piped: no progress bar
    log = (run / "log.txt").read_text()
    assert "\r" not in log
    rows = log.splitlines()
    assert "start-up summary" in rows[0]
    assert "world       2 rank(s) x 1 accumulation step(s) x per-device batch 4" in log
    assert log.count("start-up summary") == 1  # rank 0 only
    assert "rank 1" not in err  # rank 1 had nothing to warn about; its INFO lines stay quiet
    _, state = find_latest(run / "checkpoints")
    assert state["world_size"] == 2 and state["step"] == 2
    st = json.loads((run / "status.json").read_text())
    assert st["status"] == "done" and st["exit_code"] == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_gloo_ranks_print_one_result_line(cli_env, small, tmp_path):
    run = tmp_path / "run"
    env = {k: v for k, v in cli_env.items() if k not in _CLEAN}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "vdmpp.train",
            "digits",
            *_sets(small, run),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    _check_two_rank_run(r.stdout, r.stderr, run)


def test_srun_style_environment_two_ranks(cli_env, small, tmp_path):
    """What ``srun --ntasks=2 python -m vdmpp.train ...`` gives each task: SLURM_PROCID,
    SLURM_STEP_NUM_TASKS, SLURM_LOCALID (+ MASTER_ADDR/PORT from the job script)."""
    run = tmp_path / "run"
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {k: v for k, v in cli_env.items() if k not in _CLEAN}
        env.update(
            SLURM_PROCID=str(rank),
            SLURM_LOCALID=str(rank),
            SLURM_NTASKS="2",
            SLURM_STEP_NUM_TASKS="2",
            SLURM_STEP_ID="0",
            SLURM_JOB_ID="4242",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "vdmpp.train", "digits", *_sets(small, run)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=400))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    assert outs[1][0] == "", outs[1][0]  # rank 1 prints no result line
    _check_two_rank_run(outs[0][0] + outs[1][0], outs[0][1] + outs[1][1], run)


def test_the_slurm_script_runs_two_ranks_with_stand_ins(cli_env, small, tmp_path):
    """apps/train/slurm/train.sbatch run by bash, with srun (runs its command once: one node)
    and scontrol (the node list is this host) stood in for; torchrun, its c10d rendezvous and
    vdmpp-train are the real ones. Arguments with spaces and braces reach vdmpp-train intact."""
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        '#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n'
    )
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 127.0.0.1\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    run = tmp_path / "run"
    env = {k: v for k, v in cli_env.items() if k not in _CLEAN}
    env.update(
        PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env.get("PATH", "")]),
        SLURM_JOB_NODELIST="node[1]",
        SLURM_NNODES="1",
        SLURM_GPUS_ON_NODE="2",
        SLURM_JOB_ID="4242",
        MASTER_PORT=str(_free_port()),
    )
    r = subprocess.run(
        [
            "bash",
            str(ROOT / "apps" / "train" / "slurm" / "train.sbatch"),
            "digits",
            *_sets(small, run),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    _check_two_rank_run(r.stdout, r.stderr, run)
    assert "--resume: no loadable checkpoint" in (run / "log.txt").read_text()


def test_srun_environment_without_master_addr_is_a_one_line_error(cli_env, small, tmp_path):
    from .conftest import run_cli

    env = {k: v for k, v in cli_env.items() if k not in _CLEAN}
    env.update(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_ID="0")
    r = run_cli(["digits", *_sets(small, tmp_path / "run")], env)
    assert r.returncode == 2 and r.stdout == ""
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "MASTER_ADDR and MASTER_PORT not set" in err[0], r.stderr


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, (0, 1, 0)),
        ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, (1, 4, 1)),  # torchrun
        (
            {
                "SLURM_PROCID": "5",
                "SLURM_LOCALID": "1",
                "SLURM_STEP_NUM_TASKS": "8",
                "SLURM_NTASKS": "16",
                "SLURM_STEP_ID": "0",
            },
            (5, 8, 1),
        ),  # srun task
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}, (0, 1, 0)),  # the batch script: not a rank
        (
            {
                "SLURM_PROCID": "3",
                "SLURM_STEP_NUM_TASKS": "4",
                "SLURM_STEP_ID": "0",
                "RANK": "0",
                "WORLD_SIZE": "2",
                "LOCAL_RANK": "0",
            },
            (0, 2, 0),
        ),  # torchrun in srun
    ],
)
def test_dist_env(monkeypatch, env, expected):
    # dist_env copies srun's variables to RANK/WORLD_SIZE/LOCAL_RANK: give it a private environ
    fake = {k: v for k, v in os.environ.items() if k not in _CLEAN}
    fake.update(env)
    monkeypatch.setattr(os, "environ", fake)
    assert dist_env() == expected
    if "SLURM_STEP_ID" in env and "WORLD_SIZE" not in env:
        assert (fake["RANK"], fake["WORLD_SIZE"], fake["LOCAL_RANK"]) == tuple(map(str, expected))
