"""Logs a cluster user can read (issue 14): RUN/log.txt opens with the start-up summary, plain
status lines instead of a progress bar when nothing watches a terminal, rank-tagged warnings,
one result line, and the metrics rows (incl. the schedule's λ spread) the plots read."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re

import pytest
import torch

from vdmpp.train import config as C
from vdmpp.train import log as runlog
from vdmpp.train.export import load_exported
from vdmpp.train.trainer import Trainer, train

METRIC_KEYS = {
    "step",
    "wall_time",
    "elapsed_s",
    "images_per_s",
    "loss",
    "grad_norm",
    "lr",
    "nonfinite_steps",
    "corrupt_samples",
    "lambda_mean",
    "lambda_std",
    "lambda_q05",
    "lambda_q50",
    "lambda_q95",
}


def _sets(small: list[str], *extra: str) -> list[str]:
    # log.progress stays at its default (true): a bar is requested, but stdout/stderr are pipes
    base = [s for s in small if not s.startswith("log.progress")]
    return [a for s in [*base, *extra] for a in ("--set", s)]


def test_non_tty_run_has_no_carriage_returns_and_log_starts_with_summary(cli, small, tmp_path):
    run = tmp_path / "run"
    r = cli(["digits", *_sets(small, "steps=6", "log.every=2", f"out={run}")])
    assert r.returncode == 0, r.stderr[-3000:]
    log = (run / "log.txt").read_text()
    for where, text in (("stdout", r.stdout), ("stderr", r.stderr), ("log.txt", log)):
        assert "\r" not in text, f"carriage return in {where}"
    # exactly one result line, JSON, on stdout
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout
    result = json.loads(lines[0])
    assert result["status"] == "done" and result["step"] == 6 and result["exit_code"] == 0

    rows = log.splitlines()
    assert "start-up summary" in rows[0], rows[:3]
    summary = "\n".join(rows[:11])
    for needle in (
        "config ",
        "sha256 ",
        "parameters",
        "device      cpu",
        "precision fp32",
        "world       1 rank(s) x 1 accumulation step(s) x per-device batch 8",
        "versions    torch ",
        "vdmpp-train ",
        "git ",
        "config.toml",
    ):
        assert needle in summary, (needle, summary)
    # the parameter count is the model's (counted here from the export, independently)
    ema, _meta = load_exported(run / "export")
    n = sum(p.numel() for p in ema.state_dict().values())
    assert f"{n:,} parameters" in summary, summary
    # the config hash is the resolved config's
    import hashlib

    digest = hashlib.sha256((run / "config.toml").read_bytes()).hexdigest()[:16]
    assert f"sha256 {digest}" in summary
    # one plain status line per log interval, then the result as the last line
    status = [x for x in rows if re.search(r" step \d+/6 \|", x)]
    assert [int(re.search(r"step (\d+)/6", x).group(1)) for x in status] == [2, 4, 6]
    for key in ("img/s", "loss ", "grad norm ", "lr ", "ETA "):
        assert all(key in x for x in status), (key, status)
    assert rows[-1].endswith("result: " + lines[0])
    # the same lines reached stderr (rank 0 logs INFO there) with no progress bar
    assert "step 4/6 |" in r.stderr and "it/s" not in r.stderr


def test_metrics_rows_carry_the_cluster_fields(cli, small, tmp_path):
    run = tmp_path / "run"
    r = cli(["digits", *_sets(small, "steps=4", "log.every=2", f"out={run}")])
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs] == [2, 4]
    for rec in recs:
        assert rec.keys() >= METRIC_KEYS, METRIC_KEYS - rec.keys()
        assert rec["images_per_s"] > 0 and rec["nonfinite_steps"] == 0
        assert rec["corrupt_samples"] == 0
        assert rec["lambda_q05"] < rec["lambda_q50"] < rec["lambda_q95"]
    assert recs[0]["wall_time"] <= recs[1]["wall_time"]


@pytest.mark.parametrize("schedule", ["cosine", "edm_training"])
def test_lambda_spread_is_the_schedules_density_moments(small, tmp_path, schedule):
    """The spread in metrics.jsonl (quadrature over t) against p(λ) integrated over λ."""
    cfg = C.load(
        "digits",
        [
            *small,
            "objective.adaptive=false",
            f"objective.schedule='{schedule}'",
            f"out='{tmp_path / 'run'}'",
        ],
    )
    trainer = Trainer(cfg)
    try:
        got = trainer.lambda_spread()
        sched = trainer.objective.schedule
        lo, hi = float(sched.logsnr_min), float(sched.logsnr_max)
        lam = torch.linspace(lo, hi, 200001, dtype=torch.float64)
        p = sched.pdf(lam).double()
        dl = lam[1] - lam[0]
        mass = torch.trapezoid(p, dx=dl)
        mean = torch.trapezoid(lam * p, dx=dl) / mass
        std = torch.sqrt(torch.trapezoid((lam - mean) ** 2 * p, dx=dl) / mass)
        cdf = torch.cumulative_trapezoid(p, dx=dl) / mass
        q = {a: float(lam[1:][torch.searchsorted(cdf, a)]) for a in (0.05, 0.5, 0.95)}
        assert abs(float(mass) - 1.0) < 1e-3  # p is a density on [lo, hi]
        assert got["lambda_mean"] == pytest.approx(float(mean), abs=0.02)
        assert got["lambda_std"] == pytest.approx(float(std), rel=5e-3)
        for a, k in ((0.05, "lambda_q05"), (0.5, "lambda_q50"), (0.95, "lambda_q95")):
            assert got[k] == pytest.approx(q[a], abs=0.02), (k, got[k], q[a])
    finally:
        trainer.close()
        runlog.close(logging.getLogger("vdmpp.train"))


def test_progress_bar_only_on_a_terminal(tmp_path):
    assert not runlog.progress_allowed(True, io.StringIO())  # a pipe or file: never a bar
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            assert runlog.progress_allowed(True, tty)
            assert not runlog.progress_allowed(False, tty)  # log.progress = false
    finally:
        os.close(master)
        os.close(slave)


def test_warnings_name_their_rank_and_other_ranks_are_quiet():
    out = io.StringIO()
    logger = runlog.configure("train", rank=1, stream=out)
    try:
        logger.info("rank 1 status line")
        logger.warning("disk almost full")
        logger.error("data stream starved")
    finally:
        runlog.close(logger)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines  # INFO of ranks > 0 is not printed
    assert "[vdmpp-train rank 1] WARNING: disk almost full" in lines[0]
    assert "[vdmpp-train rank 1] ERROR: data stream starved" in lines[1]
    out0 = io.StringIO()
    logger = runlog.configure("eval", rank=0, stream=out0, buffer=False)
    try:
        logger.info("a\rb")
    finally:
        runlog.close(logger)
    assert re.fullmatch(r"\d\d:\d\d:\d\d \[vdmpp-eval\] ab\n", out0.getvalue())
    out0 = io.StringIO()
    logger = runlog.configure("train", rank=0, stream=out0)
    try:
        logger.warning("rank 0 warns too")
    finally:
        runlog.close(logger)
    assert "[vdmpp-train rank 0] WARNING: rank 0 warns too" in out0.getvalue()


def test_log_txt_appends_a_new_summary_on_resume(cli, small, tmp_path):
    run = tmp_path / "run"
    first = cli(["digits", *_sets(small, "steps=2", "log.every=1", f"out={run}")])
    assert first.returncode == 0, first.stderr[-3000:]
    again = cli(["digits", *_sets(small, "steps=3", "log.every=1", f"out={run}"), "--resume"])
    assert again.returncode == 0, again.stderr[-3000:]
    rows = (run / "log.txt").read_text().splitlines()
    starts = [i for i, x in enumerate(rows) if "start-up summary" in x]
    assert len(starts) == 2 and starts[0] == 0
    after = rows[starts[1] :]
    assert "  run         resumed from" in after[2], after[:3]
    # logged before the file opened, written right after the summary (11 lines)
    assert next(i for i, x in enumerate(after) if "INFO resumed from" in x) == 11, after[:13]
    last = json.loads(rows[-1].split("result: ", 1)[1])
    assert last == {
        "status": "done",
        "step": 3,
        "out": str(run),
        "nonfinite": 0,
        "steps": 3,
        "exit_code": 0,
    }


def _tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_tensorboard_scalars_match_metrics_jsonl(small, tmp_path):
    pytest.importorskip("tensorboard", reason="pip install 'vdmpp-train[tensorboard]' (CI has it)")
    run = tmp_path / "run"
    cfg = C.load(
        "digits", [*small, "steps=4", "log.every=2", "log.tensorboard=true", f"out='{run}'"]
    )
    assert train(cfg)["status"] == "done"
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    scalars = _tensorboard_scalars(run / "tensorboard")
    for key in ("loss", "grad_norm", "lr", "images_per_s", "lambda_std", "nonfinite_steps"):
        assert [s for s, _ in scalars[key]] == [2, 4], key
        for (_, v), rec in zip(scalars[key], recs):
            assert v == pytest.approx(rec[key], rel=1e-6), key  # float32 in the event file


def test_tensorboard_missing_says_how_to_install(small, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import → ImportError
    run = tmp_path / "run"
    cfg = C.load("digits", [*small, "steps=1", "log.tensorboard=true", f"out='{run}'"])
    assert train(cfg)["status"] == "done"
    err = capsys.readouterr().err
    warn = [x for x in err.splitlines() if "WARNING" in x]
    assert len(warn) == 1, err  # one line, naming the extra to install
    assert "tensorboard package is not installed" in warn[0]
    assert "pip install 'vdmpp-train[tensorboard]'" in warn[0]
    assert not (run / "tensorboard").exists()
    assert "pip install 'vdmpp-train[tensorboard]'" in (run / "log.txt").read_text()


def test_eta_format():
    assert runlog.eta(5) == "5s"
    assert runlog.eta(184) == "3m04s"
    assert runlog.eta(2 * 3600 + 3 * 60) == "2h03m"
    assert runlog.eta(86400 + 7200 + 180) == "1d02h03m"
    assert runlog.eta(math.inf) == "?" and runlog.eta(math.nan) == "?"
