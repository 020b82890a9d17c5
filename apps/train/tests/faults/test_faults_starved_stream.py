"""A data stream that can never fill a batch fails fast on every rank with a message naming the
slot and its shards (it used to spin at 100 % CPU, ignoring SIGTERM, while the other ranks waited
in all-reduce); and a stop signal breaks a step that is stuck waiting for data."""

from __future__ import annotations

import json
import re
import shutil
import signal
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from vdmpp.train.checkpoint import list_checkpoints
from vdmpp.train.data import write_shards

from .conftest import metrics_steps


def _shards(tmp: Path, bad: str) -> Path:
    """shard-000000.tar: good 8×8 digits; shard-000001.tar: ``bad`` (empty/labels/size)."""
    root = tmp / f"shards-{bad}"
    write_shards("digits", root, maxcount=5000, resolution=8)
    bad_tar = root / "shard-000001.tar"
    if bad == "empty":
        tarfile.open(bad_tar, "w").close()
    else:
        side = 16 if bad == "size" else 8
        labels = np.full(40, 12 if bad == "labels" else 3, np.int64)
        rng = np.random.default_rng(0)
        npz = tmp / f"{bad}.npz"
        np.savez(
            npz, images=rng.integers(0, 255, (40, side, side, 1), dtype=np.uint8), labels=labels
        )
        write_shards(npz, tmp / f"w-{bad}", maxcount=5000)
        shutil.copy(tmp / f"w-{bad}" / "shard-000000.tar", bad_tar)
    (root / "dataset.json").unlink()  # a hand-assembled folder: its manifest lists 1 shard
    return root


@pytest.mark.parametrize(("bad", "workers"), [("empty", 0), ("labels", 2), ("size", 0)])
def test_faults_slot_that_cannot_fill_a_batch_fails_fast(cli, small, tmp_path, bad, workers):
    # global batch 8 = 2 slots of 4: slot 0 reads the good shard, slot 1 the bad one
    src = _shards(tmp_path, bad)
    sets = [
        *small,
        f"data.source={src}",
        "batch.per_device=4",
        f"data.workers={workers}",
        "steps=100000",
        f"out={tmp_path / 'run'}",
    ]
    t0 = time.time()
    r = cli(["digits", *(a for s in sets for a in ("--set", s))], timeout=120)
    assert r.returncode == 3, r.stderr[-3000:]
    assert time.time() - t0 < 60
    assert "slot 1" in r.stderr and "can never fill a batch" in r.stderr
    assert "shard-000001.tar" in r.stderr and "shard-000000.tar" not in r.stderr
    assert "Traceback" not in r.stderr
    why = {"empty": "no samples", "labels": "label 12 outside [0, 10)", "size": "16×16"}[bad]
    assert why in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_faults_starved_slot_stops_every_rank(launch, train_argv, tmp_path) -> None:
    """2 gloo ranks: rank 1's only shard is empty → both ranks exit 3 at once (no 30-min hang)."""
    src = _shards(tmp_path, "empty")
    p = launch(train_argv(tmp_path / "run", f"data.source={src}", "steps=100000", ranks=2))
    rc, _, err = p.finish(timeout=180)
    assert rc != 0
    assert err.count("can never fill a batch") >= 2, err[-3000:]  # printed by each rank
    assert "slot 1" in err and "shard-000001.tar" in err
    # no traceback from vdmpp (log.txt's summary names the config file under vdmpp/train/)
    assert not re.search(r'File "[^"]*/vdmpp/train/', err), err[-3000:]


def test_faults_sigterm_breaks_a_stalled_data_wait(launch, cli_env, small, tmp_path) -> None:
    """The stream stalls after 3 batches; SIGTERM → checkpoint at that step within the grace."""
    run = tmp_path / "run"
    sets = [*small, "steps=100000", "log.every=1", f"out={run}"]
    script = textwrap.dedent(f"""
        import sys, time
        import vdmpp.train.loaders as T
        real = T.make_loader
        def stalling(spec, workers):
            it = real(spec, workers)
            def gen():
                for i, b in enumerate(it):
                    if i == 3:
                        time.sleep(3600)  # a hung filesystem
                    yield b
            return gen()
        T.make_loader = stalling
        from vdmpp.train.cli import main
        sys.exit(main({["digits", *(a for s in sets for a in ("--set", s))]!r}))
    """)
    env = {**cli_env, "VDMPP_SIGNAL_GRACE_S": "1"}
    p = launch([sys.executable, "-c", script], env=env)
    p.wait_until(lambda: 3 in metrics_steps(run))
    time.sleep(1.0)
    t0 = time.time()
    p.kill_group(signal.SIGTERM)
    rc, out, err = p.finish(timeout=60)
    assert rc == 75, err[-3000:]  # preempted
    assert time.time() - t0 < 30
    assert json.loads(out.strip().splitlines()[-1])["status"] == "preempted"
    assert "waiting for data" in err
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [3]
