"""The export pair (ema.safetensors + model.json) is replaced atomically: a process killed at any
instant of a write leaves the previous complete pair or the new one, temp files are cleaned, and
``--resume`` rewrites an export that a kill after the final checkpoint left missing."""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from vdmpp.train.checkpoint import find_latest, list_checkpoints, load_checkpoint
from vdmpp.train.export import ExportError, load_exported, read_meta, write_export

from .conftest import SOAK, metrics_steps

TINY = {
    "model_channels": 16,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "attention_resolutions": [],
    "head_channels": 16,
    "in_channels": 1,
    "resolution": 8,
    "num_classes": 10,
}
_OS_CALLS = ("replace", "rename", "symlink", "fsync", "unlink", "rmdir", "mkdir", "open")


def _meta(step: int) -> dict:
    return {
        "model": {"name": "tiny", "overrides": TINY},
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
        "step": step,
    }


def _state(model: torch.nn.Module, step: int) -> dict:
    return {k: torch.full_like(v, float(step)) for k, v in model.state_dict().items()}


def _write_and_die_at(d: Path, model, step: int, n: int) -> bool:
    """In a forked child, run write_export and _exit at the n-th filesystem call; True if the
    write finished before call n (n is past its last call)."""
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        count = [0]
        for name in _OS_CALLS:
            real = getattr(os, name)

            def wrapped(*a, _real=real, **k):
                count[0] += 1
                if count[0] == n:
                    os._exit(9)  # SIGKILL-like: no cleanup, no finally blocks
                return _real(*a, **k)

            setattr(os, name, wrapped)
        try:
            write_export(d, _state(model, step), _meta(step))
        except BaseException:
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, 9), code
    return code == 0


def _consistent_step(d: Path) -> int:
    model, meta = load_exported(d)
    step = meta["step"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, torch.full_like(v, float(step))), (k, step)
    return step


def test_faults_export_killed_at_every_filesystem_call_is_never_mixed(tmp_path) -> None:
    from vdmpp.train.export import build_model

    model = build_model({"format": "vdmpp-model", "version": 1, **_meta(0)})
    d = tmp_path / "run" / "export"
    write_export(d, _state(model, 1), _meta(1))
    step, n, seen = 1, 1, set()
    while True:
        done = _write_and_die_at(d, model, step + 1, n)
        got = _consistent_step(d)  # loads, and weights are the step model.json names
        assert got in (step, step + 1)
        seen.add(got)
        if done:
            break
        n += 1
    assert n > 5 and seen == {1, 2}  # killed before and after the switch
    # the next successful write leaves no temp files nor old generations behind but one
    write_export(d, _state(model, 3), _meta(3))
    assert _consistent_step(d) == 3
    left = sorted(p.name for p in d.parent.iterdir())
    assert not [x for x in left if x.endswith("tmp") or x.endswith("legacy")], left
    assert len([x for x in left if x.startswith(".export.")]) <= 2, left


def test_faults_export_over_the_old_in_place_layout(tmp_path) -> None:
    from vdmpp.train.export import build_model

    model = build_model({"format": "vdmpp-model", "version": 1, **_meta(0)})
    d = tmp_path / "export"
    d.mkdir()
    (d / ".ema.safetensors.999999999.tmp").write_bytes(b"left by a killed 0.1 writer")
    write_export(d, _state(model, 4), _meta(4))
    assert _consistent_step(d) == 4 and d.is_symlink()
    assert not list(tmp_path.glob(".export.*legacy"))


def test_faults_resume_repairs_an_export_lost_after_the_final_checkpoint(cli, small, tmp_path):
    run = tmp_path / "run"
    args = [*small, "steps=6", "checkpoint.every=3", f"out={run}"]
    sets = [a for s in args for a in ("--set", s)]
    r = cli(["digits", *sets])
    assert r.returncode == 0, r.stderr[-3000:]
    # a kill after the final checkpoint, before the export: the export is still step 3's
    ck3 = load_checkpoint(run / "checkpoints" / "ckpt-000000003.pt")
    meta = read_meta(run / "export")
    write_export(run / "export", ck3["ema"], {**meta, "step": 3})
    assert read_meta(run / "export")["step"] == 3
    r = cli(["digits", *sets, "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "export was missing or stale" in r.stderr
    model, meta = load_exported(run)
    _, last = find_latest(run / "checkpoints")
    assert meta["step"] == last["step"] == 6
    for k, v in model.state_dict().items():
        assert torch.equal(v, last["ema"][k])
    # and with no export at all
    os.unlink(run / "export")
    for p in run.glob(".export.*"):
        shutil.rmtree(p)
    with pytest.raises(ExportError):
        load_exported(run)
    r = cli(["digits", *sets, "--resume"])
    assert r.returncode == 0 and load_exported(run)[1]["step"] == 6, r.stderr[-3000:]


@pytest.mark.parametrize("kills", [pytest.param(40, marks=pytest.mark.slow) if SOAK else 3])
def test_faults_sigkill_loop_during_checkpoint_and_export_writes(
    launch, train_argv, tmp_path, kills
) -> None:
    """Train with a checkpoint + export every step; SIGKILL the group at random instants and
    resume: the export always loads and equals the EMA of the checkpoint of its step; the
    newest checkpoint always loads; the finished run leaves no temp files."""
    run = tmp_path / "run"
    rng = random.Random(1234)
    sets = ["steps=100000", "checkpoint.every=1", "checkpoint.keep=100000", "log.every=1"]
    for i in range(kills):
        p = launch(train_argv(run, *sets) + (["--resume"] if i else []))
        before = len(metrics_steps(run))
        p.wait_until(lambda b=before: len(metrics_steps(run)) > b)
        time.sleep(rng.uniform(0.0, 0.6))
        p.kill_group(signal.SIGKILL)
        p.finish()
        _, last = find_latest(run / "checkpoints")
        model, meta = load_exported(run)
        ck = load_checkpoint(run / "checkpoints" / f"ckpt-{meta['step']:09d}.pt")
        for k, v in model.state_dict().items():
            assert torch.equal(v, ck["ema"][k]), (i, k)
        assert meta["step"] in (last["step"], last["step"] - 1)
    final = list_checkpoints(run / "checkpoints")[-1][0] + 2
    p = launch([*train_argv(run, f"steps={final}", "checkpoint.every=1"), "--resume"])
    rc, _, err = p.finish(timeout=180)
    assert rc == 0, err[-3000:]
    assert load_exported(run)[1]["step"] == final
    stray = [x for x in run.rglob("*") if x.name.endswith("tmp") or x.name.endswith("legacy")]
    assert not stray, stray
