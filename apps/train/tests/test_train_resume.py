"""Exact resume after SIGKILL (deterministic CPU mode) and crash-safe checkpoint writing."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from vdmpp.train.checkpoint import (
    CheckpointError,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    prune,
    save_atomic,
)


def _launch(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vdmpp.train", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize("label_dropout", [0.0, 0.1])
def test_train_exact_resume_after_sigkill(cli_env, small, tmp_path, label_dropout) -> None:
    """40 steps straight == 20 steps, SIGKILL, --resume to 40: identical weights, bit for bit.

    With label dropout (issue 22) the mask is drawn from the step's seeded generator, so the
    resumed run drops the same labels as the uninterrupted one."""
    common = [*small, "deterministic=true", "steps=40", "checkpoint.every=5", "checkpoint.keep=20"]
    common += ["data.augment_flip=true", "data.shuffle_buffer=64"]  # exercise the stream's RNG
    common += [f"objective.label_dropout={label_dropout}"]

    def args(out: Path) -> list[str]:
        return ["digits", *(a for s in [*common, f"out={out}"] for a in ("--set", s))]

    straight = _launch(args(tmp_path / "a"), cli_env)
    killed = _launch(args(tmp_path / "b"), cli_env)
    try:
        deadline = time.time() + 240
        while not list_checkpoints(tmp_path / "b" / "checkpoints") or (
            list_checkpoints(tmp_path / "b" / "checkpoints")[-1][0] < 20
        ):
            assert killed.poll() is None, killed.communicate()[1][-3000:]
            assert time.time() < deadline
            time.sleep(0.05)
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=60)
        last = list_checkpoints(tmp_path / "b" / "checkpoints")[-1][0]
        assert 20 <= last < 40
        _, err = straight.communicate(timeout=300)
        assert straight.returncode == 0, err[-3000:]
    finally:
        for p in (straight, killed):
            if p.poll() is None:
                p.kill()
    resumed = _launch([*args(tmp_path / "b"), "--resume"], cli_env)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert "resumed from" in err

    _, a = find_latest(tmp_path / "a" / "checkpoints")
    _, b = find_latest(tmp_path / "b" / "checkpoints")
    assert a["step"] == b["step"] == 40
    for part in ("model", "ema", "schedule"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert a["data"]["positions"] == b["data"]["positions"]
    meta = json.loads((tmp_path / "b" / "export" / "model.json").read_text())
    assert meta["label_dropout"] == label_dropout


_WRITER = textwrap.dedent(
    """
    import sys, torch
    from vdmpp.train.checkpoint import FORMAT, checkpoint_path, prune, save_atomic
    d = sys.argv[1]
    step = int(sys.argv[2])
    big = torch.randn(4_000_000)  # 16 MB: writing takes long enough to be interrupted
    print("ready", flush=True)
    while True:
        step += 1
        state = {"format": FORMAT, "step": step, "model": {"w": big + step}, "ema": {},
                 "optimizer": {}}
        save_atomic(state, checkpoint_path(d, step))
        prune(d, 2)
    """
)


@pytest.mark.slow
def test_train_sigkill_while_writing_never_breaks_the_latest_checkpoint(cli_env, tmp_path):
    d = tmp_path / "ckpts"
    step = 0
    for delay in (0.05, 0.2, 0.35, 0.5, 0.8, 1.1):
        p = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(d), str(step)],
            env=cli_env,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert p.stdout.readline().strip() == "ready"
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        found = find_latest(d)
        if found is None:  # killed before the first checkpoint completed
            assert step == 0
            continue
        _, state = found
        assert state["step"] == list_checkpoints(d)[-1][0]  # the newest file is readable
        assert torch.equal(state["model"]["w"][:3], state["model"]["w"][:3])
        step = state["step"]
    assert step > 0
    leftovers = list(d.glob(".*.tmp"))
    prune(d, 2)  # stale temp files of dead writers are cleaned up
    assert not list(d.glob(".*.tmp")) or leftovers == []


def test_train_truncated_or_foreign_checkpoints_are_skipped_or_refused(tmp_path) -> None:
    d = tmp_path / "checkpoints"
    good = {"format": "vdmpp-train-checkpoint", "step": 1, "model": {}, "ema": {}, "optimizer": {}}
    save_atomic(good, d / "ckpt-000000001.pt")
    save_atomic({**good, "step": 2}, d / "ckpt-000000002.pt")
    data = (d / "ckpt-000000002.pt").read_bytes()
    (d / "ckpt-000000002.pt").write_bytes(data[: len(data) // 2])  # torn write from elsewhere
    with pytest.warns(UserWarning, match="unreadable"):
        _, state = find_latest(d)
    assert state["step"] == 1

    class Payload:  # an arbitrary pickled object: must never be unpickled
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "vdmpp-train-checkpoint", "model": Payload()}, evil)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(evil)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"step": 1}))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw)
    torch.save({"step": 3}, tmp_path / "other.pt")  # loadable, but not ours
    with pytest.raises(CheckpointError, match="not a vdmpp-train checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_train_resume_with_a_pickle_checkpoint_is_refused(cli, small, tmp_path) -> None:
    ck = tmp_path / "run" / "checkpoints"
    ck.mkdir(parents=True)

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save(
        {
            "format": "vdmpp-train-checkpoint",
            "step": 5,
            "model": Payload(),
            "ema": {},
            "optimizer": {},
        },
        ck / "ckpt-000000005.pt",
    )
    args = [
        "digits",
        "--resume",
        *(a for s in [*small, f"out={tmp_path / 'run'}", "steps=2"] for a in ("--set", s)),
    ]
    r = cli(args)
    assert "pwned" not in r.stdout
    assert "skipping unreadable checkpoint" in r.stderr and "weights_only" in r.stderr
    assert r.returncode == 0  # started from scratch instead
