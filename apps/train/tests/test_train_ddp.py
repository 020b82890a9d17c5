"""2-process gloo DDP (torchrun on CPU) == 1 process with the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from vdmpp.train.checkpoint import find_latest


@pytest.mark.slow
def test_train_ddp_two_ranks_equal_one_process(cli, cli_env, small, tmp_path) -> None:
    # global batch 8 in micro-batches of 4: 2 ranks × 1, or 1 rank × 2 accumulated.
    common = [
        *small,
        "steps=6",
        "batch.per_device=4",
        "checkpoint.every=6",
        "log.every=3",
        "deterministic=true",
        "objective.adaptive_decay=0.5",
    ]

    def sets(out) -> list[str]:
        return [a for s in [*common, f"out={out}"] for a in ("--set", s)]

    one = cli(["digits", *sets(tmp_path / "one")])
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
            *sets(tmp_path / "two"),
        ],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    _, a = find_latest(tmp_path / "one" / "checkpoints")
    _, b = find_latest(tmp_path / "two" / "checkpoints")
    assert a["step"] == b["step"] == 6 and b["world_size"] == 2
    for part in ("model", "ema"):
        for k in a[part]:
            torch.testing.assert_close(b[part][k], a[part][k], rtol=1e-4, atol=1e-5)
    # the adaptive bins moved, agree with the single process, and agree across the ranks
    assert not torch.allclose(a["schedule"]["ema"], torch.ones(100))
    torch.testing.assert_close(b["schedule"]["ema"], a["schedule"]["ema"], rtol=1e-5, atol=1e-6)
    metrics = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [m["adaptive_rank_spread"] for m in metrics] == [0.0, 0.0]
    m1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in metrics] == pytest.approx([m["loss"] for m in m1], rel=1e-4)
