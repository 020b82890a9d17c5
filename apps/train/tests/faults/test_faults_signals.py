"""Preemption: SIGTERM/SIGINT to the whole process group (torchrun, SLURM, Ctrl-C) with
DataLoader workers → a checkpoint at a step boundary, a clean exit, and an exact resume."""

from __future__ import annotations

import json
import os
import re
import signal

import pytest
import torch

from vdmpp.train.checkpoint import find_latest, list_checkpoints

from .conftest import metrics_steps


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_faults_group_signal_with_workers_checkpoints_and_exits_75(
    launch, train_argv, tmp_path, sig
) -> None:
    run = tmp_path / "run"
    p = launch(train_argv(run, "steps=100000", "data.workers=2", "checkpoint.every=100000"))
    p.wait_until(lambda: len(metrics_steps(run)) >= 1)
    p.kill_group(sig)  # what torchrun/SLURM/a terminal do: the workers get it too
    rc, out, err = p.finish()
    assert rc == 75, err[-3000:]  # preempted: EX_TEMPFAIL (vdmpp.train.status)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["status"] == "preempted", out
    assert json.loads((run / "status.json").read_text())["status"] == "preempted"
    (step, path), *_ = reversed(list_checkpoints(run / "checkpoints"))
    assert step == result["step"] >= 5
    assert find_latest(run / "checkpoints")[0] == path
    assert "killed by signal" not in err
    assert _group_gone(p.p.pid), "DataLoader workers outlived the trainer"


def _states_equal(a: dict, b: dict) -> None:
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    assert torch.equal(a["schedule"]["ema"], b["schedule"]["ema"])


@pytest.mark.slow
def test_faults_torchrun_group_sigterm_with_workers_resumes_bit_identically(
    launch, train_argv, tmp_path
) -> None:
    """2 gloo ranks × 2 workers, SIGTERM to the group → checkpoint; resume == uninterrupted."""
    common = [
        "deterministic=true",
        "data.workers=2",
        "checkpoint.every=100000",
        "data.shuffle_buffer=64",
        "objective.adaptive_decay=0.5",
    ]
    run = tmp_path / "pre"
    p = launch(train_argv(run, *common, "steps=100000", ranks=2))
    p.wait_until(lambda: len(metrics_steps(run)) >= 1)
    p.kill_group(signal.SIGTERM)
    _, _, err = p.finish()
    # torchrun itself ends with its SignalException traceback; the ranks must not fail
    assert "killed by signal" not in err, err[-3000:]
    assert not re.search(r'File "[^"]*/vdmpp/train/', err), err[-3000:]  # no vdmpp traceback
    assert "signal received: checkpoint at step" in err, err[-3000:]
    (step, _), *_ = reversed(list_checkpoints(run / "checkpoints"))
    assert step >= 5
    total = step + 3
    p = launch([*train_argv(run, *common, f"steps={total}", ranks=2), "--resume"])
    rc, _, err = p.finish(timeout=300)
    assert rc == 0, err[-3000:]
    ref = tmp_path / "ref"
    p = launch(train_argv(ref, *common, f"steps={total}", ranks=2))
    rc, _out, err = p.finish(timeout=300)
    assert rc == 0, err[-3000:]
    _, a = find_latest(run / "checkpoints")
    _, b = find_latest(ref / "checkpoints")
    assert a["step"] == b["step"] == total
    _states_equal(a, b)
