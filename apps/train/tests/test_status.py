"""Honest outcomes (issue 14): the result line, the exit code and RUN/status.json agree on
done / preempted / stopped-nonfinite / failed, and consumers refuse a run that is not done.
(Preemption by a signal, exit 75, is exercised in faults/test_faults_signals.py.)"""

from __future__ import annotations

import json
import os

import pytest

from vdmpp.train import status as S
from vdmpp.train.cli import main


def _argv(small: list[str], *extra: str) -> list[str]:
    return ["digits", *(a for s in [*small, *extra] for a in ("--set", s))]


def _result(capsys) -> dict:
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1, lines  # exactly one result line
    return json.loads(lines[0])


def test_nonfinite_stop_is_stopped_nonfinite_everywhere(small, tmp_path, monkeypatch, capsys):
    from vdmpp.train import objective

    calls = {"n": 0}
    real = objective.Objective.forward

    def flaky(self, model, x, labels, generator):
        loss, lam, mse = real(self, model, x, labels, generator)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 2 else loss), lam, mse

    monkeypatch.setattr(objective.Objective, "forward", flaky)
    run = tmp_path / "run"
    rc = main(_argv(small, "steps=50", "nan_patience=3", f"out={run}"))
    result = _result(capsys)
    assert rc == S.EXIT_CODES["stopped-nonfinite"] == 4
    assert result["status"] == "stopped-nonfinite" and result["exit_code"] == 4
    assert result["step"] == 5 and result["nonfinite"] == 3 and "non-finite" in result["error"]
    st = S.read_status(run)
    assert st["status"] == "stopped-nonfinite" and st["exit_code"] == 4 and st["step"] == 5
    assert "non-finite" in (run / "log.txt").read_text().splitlines()[-2]  # ERROR, then result
    with pytest.raises(S.StatusError, match="stopped-nonfinite at step 5/50, not done"):
        S.require_done(run)
    # a config error (checkpoints exist, no --resume) starts no run and leaves the status alone
    monkeypatch.setattr(objective.Objective, "forward", real)
    rc = main(_argv(small, "steps=50", f"out={run}"))
    assert rc == 2 and capsys.readouterr().out == ""
    assert S.read_status(run)["status"] == "stopped-nonfinite"


def test_a_crash_is_failed_with_traceback_in_log(small, tmp_path, monkeypatch, capsys):
    from vdmpp.train.trainer import Trainer

    real = Trainer.train_step
    calls = {"n": 0}

    def boom(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom: injected")
        return real(self, *a, **kw)

    monkeypatch.setattr(Trainer, "train_step", boom)
    run = tmp_path / "run"
    rc = main(_argv(small, "steps=10", f"out={run}"))
    result = _result(capsys)
    assert rc == S.EXIT_CODES["failed"] == 3
    assert result["status"] == "failed" and result["step"] == 2
    assert result["error"] == "RuntimeError: boom: injected"
    assert S.read_status(run)["status"] == "failed"
    log = (run / "log.txt").read_text()
    assert "Traceback" in log and "boom: injected" in log
    assert json.loads(log.splitlines()[-1].split("result: ", 1)[1]) == result


def test_status_is_running_while_training(small, tmp_path):
    import logging

    from vdmpp.train import config as C
    from vdmpp.train import log as runlog
    from vdmpp.train.trainer import Trainer

    run = tmp_path / "run"
    trainer = Trainer(C.load("digits", [*small, "steps=3", f"out='{run}'"]))
    try:
        st = S.read_status(run)
        assert st["status"] == "running" and st["pid"] == os.getpid() and st["exit_code"] is None
        with pytest.raises(S.StatusError, match="running at step 0/3"):
            S.require_done(run / "export")
    finally:
        trainer.close()
        runlog.close(logging.getLogger("vdmpp.train"))


@pytest.mark.parametrize("status", ["preempted", "stopped-nonfinite", "failed", "running"])
def test_require_done_refuses_unfinished_runs(tmp_path, status):
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "export" / "ema.safetensors").write_bytes(b"")
    S.write_status(run, status, step=7, steps=20)
    for path in (run, run / "export", run / "export" / "ema.safetensors"):
        with pytest.raises(S.StatusError, match=f"{status} at step 7/20, not done.*partial"):
            S.require_done(path)
        assert S.require_done(path, allow_partial=True)["status"] == status
    S.write_status(run, "done", step=20, steps=20)
    assert S.require_done(run / "export")["status"] == "done"


def test_status_file_is_atomic_and_checked(tmp_path):
    run = tmp_path / "run"
    S.write_status(run, "done", step=1)
    assert sorted(p.name for p in run.iterdir()) == ["status.json"]  # no temp file left
    with pytest.raises(ValueError, match="unknown run status"):
        S.write_status(run, "finished")
    # a torn or foreign file is never taken for "done"
    (run / "status.json").write_text('{"status": "do')
    with pytest.raises(S.StatusError, match="unreadable"):
        S.require_done(run)
    # a run directory without status.json (checkpoints only): refused; a bare export: passes
    (run / "status.json").unlink()
    (run / "checkpoints").mkdir()
    with pytest.raises(S.StatusError, match=r"no status\.json"):
        S.require_done(run)
    bare = tmp_path / "copied-export"
    bare.mkdir()
    assert S.require_done(bare) is None


def test_exit_codes_are_distinct_and_documented():
    codes = [*S.EXIT_CODES.values(), S.EXIT_CONFIG]
    assert len(set(codes)) == len(codes) and S.EXIT_CODES["done"] == 0
    assert set(S.EXIT_CODES) == set(S.STATUSES)
    from vdmpp.train import errors  # the one exit-code table (status.py reads it)

    assert S.EXIT_CODES is errors.EXIT_CODES
    for name, code in S.EXIT_CODES.items():
        assert f"``{name}``" in errors.__doc__ and f" {code} " in errors.__doc__
