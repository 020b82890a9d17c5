"""Training-side EDM2 tools and in-training evaluation: power-EMA snapshots and exact resume,
uncertainty weights in checkpoints and exports, ``[eval]`` rows, world-size independence and
start-up refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from vdmpp.train.checkpoint import find_latest, list_checkpoints
from vdmpp.train.phema import load_snapshots


def _sets(*sets: str) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def _rows(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _equal_states(a, b, where="") -> None:
    """Nested dicts/lists of tensors and numbers are bit-identical."""
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _equal_states(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _equal_states(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_power_ema_and_uncertainty_resume_bit_identically(cli, small, tmp_path) -> None:
    """kind = power: snapshots every 2 steps (16 images); a run cut at step 3 and resumed ends
    bit-identical to an uninterrupted one — EMA profiles, u(λ), model and every snapshot."""
    common = [
        *small,
        "checkpoint.every=3",
        "deterministic=true",
        "ema.kind=power",
        "ema.std=[0.05, 0.1]",
        "ema.snapshot_every_images=16",
        "objective.uncertainty=true",
        "objective.label_dropout=0.1",
    ]

    def run(out, steps, *extra):
        r = cli(["digits", *_sets(*common, f"steps={steps}", f"out={out}"), *extra])
        assert r.returncode == 0, r.stderr[-3000:]

    run(tmp_path / "a", 6)
    run(tmp_path / "b", 3)
    run(tmp_path / "b", 6, "--resume")
    _, a = find_latest(tmp_path / "a" / "checkpoints")
    _, b = find_latest(tmp_path / "b" / "checkpoints")
    assert a["step"] == b["step"] == 6
    for part in ("model", "ema", "uncertainty", "optimizer"):
        _equal_states(a[part], b[part], part)
    assert a["ema"]["std"] == [0.05, 0.1] and a["ema"]["cur_nimg"] == 6 * 8
    # u(λ) was trained (zero-initialised head) and is exported for inspection
    assert any(v.abs().max() > 0 for v in a["uncertainty"].values())
    meta = json.loads((tmp_path / "a" / "export" / "model.json").read_text())
    assert meta["ema"] == {"kind": "power", "std": 0.05, "tracked_std": [0.05, 0.1]}
    assert len(meta["uncertainty"]["u"]) == len(meta["uncertainty"]["logsnr"]) == 65
    sa, sb = load_snapshots(tmp_path / "a" / "phema"), load_snapshots(tmp_path / "b" / "phema")
    assert [s.nimg for s in sa] == [s.nimg for s in sb] == [16, 32, 48]
    for x, y in zip(sa, sb):
        _equal_states(x.emas, y.emas, f"snapshot {x.nimg}")
    # the exported weights are the first tracked profile
    from vdmpp.train.export import load_exported

    model, _ = load_exported(tmp_path / "a" / "export")
    for k, v in model.state_dict().items():
        assert torch.equal(v, a["ema"]["emas"][0][k]), k


def test_eval_rows_best_json_and_keep_best(cli, small, tmp_path) -> None:
    """[eval] writes one row per interval with the metric, its time and the NFE; best.json
    names the lowest FD; keep_best keeps that checkpoint out of pruning; the FD falls."""
    run = tmp_path / "run"
    sets = [
        *small,
        "steps=90",
        "eval.every=30",
        "eval.count=64",
        "eval.steps=6",
        "eval.bpd=true",
        "eval.bpd_limit=16",
        "checkpoint.every=30",
        "checkpoint.keep=1",
        "checkpoint.keep_best=true",
        f"out={run}",
    ]
    r = cli(["digits", *_sets(*sets)])
    assert r.returncode == 0, r.stderr[-3000:]
    ev = [m for m in _rows(run) if "eval_value" in m]
    assert [m["step"] for m in ev] == [30, 60, 90]
    for m in ev:
        assert m["eval_metric"] == "digits_fd" and m["eval_count"] == 64
        assert m["eval_nfe"] == 2 * 6 - 1 and m["eval_time_s"] > 0 and m["eval_bpd"] > 0
        assert 0 <= m["eval_accuracy"] <= 1
    values = [m["eval_value"] for m in ev]
    assert values[-1] < values[0], values  # the model learns: the FD falls
    best = json.loads((run / "best.json").read_text())
    assert best["value"] == min(values) and best["step"] == ev[values.index(min(values))]["step"]
    kept = [s for s, _ in list_checkpoints(run / "checkpoints")]
    assert kept == sorted({best["step"], 90}), kept
    assert "eval at step 30: digits_fd" in (run / "log.txt").read_text()


@pytest.mark.slow
def test_eval_value_does_not_depend_on_the_world_size(cli, cli_env, small, tmp_path) -> None:
    common = [
        *small,
        "steps=4",
        "batch.per_device=4",
        "checkpoint.every=4",
        "deterministic=true",
        "eval.every=4",
        "eval.count=24",
        "eval.steps=4",
    ]
    one = cli(["digits", *_sets(*common, f"out={tmp_path / 'one'}")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "vdmpp.train",
            "digits",
            *_sets(*common, f"out={tmp_path / 'two'}"),
        ],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    (a,) = [m for m in _rows(tmp_path / "one") if "eval_value" in m]
    (b,) = [m for m in _rows(tmp_path / "two") if "eval_value" in m]
    assert b["eval_count"] == a["eval_count"] == 24
    # the models agree to DDP's reduction order (test_train_ddp); the samples then do too
    assert b["eval_value"] == pytest.approx(a["eval_value"], rel=1e-3)
    assert b["eval_accuracy"] == a["eval_accuracy"]


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["eval.metric='fid'"], "eval.fid_weights"),
        (
            [
                "eval.metric='fid'",
                "eval.fid_weights='/nonexistent/w.pth'",
                "eval.fid_reference='digits'",
            ],
            "w.pth",
        ),
        (["eval.sampler='nope'"], "eval.sampler = 'nope' is not one of"),
        (["ema.kind='power'", "ema.std=[0.5]"], "ema.std"),
        (["data.num_classes=none", "objective.label_dropout=0.1"], "label_dropout"),
    ],
)
def test_refused_at_start_up_before_any_step(cli, small, tmp_path, sets, message) -> None:
    run = tmp_path / "run"
    r = cli(["digits", *_sets(*small, "steps=3", "eval.every=1", *sets, f"out={run}")])
    assert r.returncode == 2, r.stderr[-3000:]
    assert message in r.stderr and not (run / "checkpoints").exists()
