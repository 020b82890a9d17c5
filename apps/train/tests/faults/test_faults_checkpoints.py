"""Corrupt, truncated and foreign checkpoints: skipped with a warning, the newest *loadable* one
is resumed, and pruning never deletes a loadable checkpoint in favour of an unreadable one."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch

from vdmpp.train.checkpoint import (
    FORMAT,
    checkpoint_path,
    find_latest,
    list_checkpoints,
    prune,
    save_atomic,
)


def _ckpt(step: int) -> dict:
    return {
        "format": FORMAT,
        "step": step,
        "model": {"w": torch.full((3,), float(step))},
        "ema": {},
        "optimizer": {},
    }


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def _hostile(d: Path, good_steps: list[int]) -> None:
    """Good checkpoints at ``good_steps`` and four bad ones with higher steps."""
    for s in good_steps:
        save_atomic(_ckpt(s), checkpoint_path(d, s))
    src = checkpoint_path(d, good_steps[-1]).read_bytes()
    checkpoint_path(d, 900).write_bytes(src[: len(src) // 2])  # truncated
    checkpoint_path(d, 901).write_bytes(b"garbage")
    torch.save({"format": "someone-else", "step": 902}, checkpoint_path(d, 902))  # foreign
    with open(checkpoint_path(d, 903), "wb") as f:
        pickle.dump({"format": FORMAT, "x": _Evil()}, f)  # a pickle: never executed


def test_faults_find_latest_skips_unreadable_newer_checkpoints(tmp_path, capsys) -> None:
    _hostile(tmp_path, [10, 20])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        path, state = find_latest(tmp_path)
    assert path == checkpoint_path(tmp_path, 20) and state["step"] == 20
    skipped = [str(x.message) for x in w if "skipping unreadable checkpoint" in str(x.message)]
    assert len(skipped) == 4, [str(x.message)[:200] for x in w]
    assert "pwned" not in capsys.readouterr().out


def test_faults_prune_never_keeps_garbage_instead_of_a_loadable_checkpoint(tmp_path) -> None:
    _hostile(tmp_path, [10, 20, 30])
    gone = prune(tmp_path, keep=1)
    left = [s for s, _ in list_checkpoints(tmp_path)]
    assert 30 in left and 10 not in left and 20 not in left  # the newest loadable one stays
    assert {p.name for p in gone} == {"ckpt-000000010.pt", "ckpt-000000020.pt"}
    assert find_latest(tmp_path, warn=lambda m: None)[1]["step"] == 30
    prune(tmp_path, keep=2)  # fewer loadable than keep: nothing loadable goes
    assert find_latest(tmp_path, warn=lambda m: None)[1]["step"] == 30


def test_faults_resume_past_unreadable_checkpoints_and_keep_loadable_ones(cli, small, tmp_path):
    run = tmp_path / "run"

    def sets(steps: int) -> list[str]:
        s = [*small, f"steps={steps}", "checkpoint.every=5", "checkpoint.keep=1", f"out={run}"]
        return [a for x in s for a in ("--set", x)]

    r = cli(["digits", *sets(10)])
    assert r.returncode == 0, r.stderr[-3000:]
    d = run / "checkpoints"
    good = checkpoint_path(d, 10).read_bytes()
    checkpoint_path(d, 15).write_bytes(good[: len(good) // 3])  # a torn copy, higher step
    checkpoint_path(d, 999).write_bytes(b"not a checkpoint")
    r = cli(["digits", *sets(20), "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("skipping unreadable checkpoint") == 2
    assert "resumed from" in r.stderr and "ckpt-000000010.pt at step 10" in r.stderr
    # keep=1: the step-20 checkpoint survives pruning next to the garbage at step 999
    assert [s for s, _ in list_checkpoints(d)] == [20, 999]  # the torn 15 was rewritten, pruned
    assert find_latest(d, warn=lambda m: None)[1]["step"] == 20
