"""Sampling: image k depends on seed k only (batch size, chunking, ranks), resume, bad seeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vdmpp.eval.cli import main
from vdmpp.eval.model import EvalError, load_model
from vdmpp.eval.sampling import (
    SampleSpec,
    assemble,
    check_settings,
    generate,
    parse_seeds,
    run_shard,
    settings_record,
)

SPEC = SampleSpec(sampler="edm", steps=4, churn=10.0)  # stochastic: step noise is per seed too


def test_parse_seeds():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("7,1-2, 7") == [1, 2, 7]
    for bad, why in [
        ("-1-3", "out of range"),
        ("5-2", "empty range"),
        ("x", "cannot parse"),
        (f"0-{2**32}", "out of range"),
        ("", "cannot parse"),
    ]:
        with pytest.raises(EvalError, match=why):
            parse_seeds(bad)


@pytest.mark.parametrize("sampler", ["heun", "edm", "ddpm"])
def test_image_depends_only_on_its_seed(export_dir, sampler):
    model, meta = load_model(export_dir)
    spec = SampleSpec(sampler=sampler, steps=4, churn=10.0 if sampler == "edm" else 0.0)
    seeds = [0, 1, 2, 3, 4, 5]
    a, la, nfe = generate(model, meta, seeds, spec, batch_size=6)
    b, lb, _ = generate(model, meta, seeds, spec, batch_size=4)  # 4 + 2
    c, lc, _ = generate(model, meta, [3, 4], spec, batch_size=1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[3:5], c)
    np.testing.assert_array_equal(la, np.asarray(seeds) % 10)
    np.testing.assert_array_equal(lb, la)
    np.testing.assert_array_equal(lc, [3, 4])
    assert a.shape == (6, 8, 8, 1) and a.dtype == np.uint8
    assert nfe == {"heun": 7, "edm": 7, "ddpm": 4}[sampler]
    assert a.std() > 0


def test_one_rank_equals_two_ranks(export_dir, tmp_path):
    model, meta = load_model(export_dir)
    seeds = parse_seeds("10-16")
    one, two = tmp_path / "one", tmp_path / "two"
    run_shard(model, meta, seeds, SPEC, one, chunk=3, batch_size=4)
    s0 = run_shard(model, meta, seeds, SPEC, two, rank=0, world=2, chunk=2, batch_size=3)
    s1 = run_shard(model, meta, seeds, SPEC, two, rank=1, world=2, chunk=2, batch_size=3)
    assert s0["done"] + s1["done"] == len(seeds) and s0["done"] == 4  # chunks 0, 2 vs 1, 3
    with np.load(assemble(one, seeds, chunk=3)) as a, np.load(assemble(two, seeds, chunk=2)) as b:
        np.testing.assert_array_equal(a["images"], b["images"])
        np.testing.assert_array_equal(a["seeds"], seeds)
        np.testing.assert_array_equal(a["labels"], np.asarray(seeds) % 10)


def test_resume_skips_done_seeds(export_dir, tmp_path):
    model, meta = load_model(export_dir)
    seeds = parse_seeds("0-5")
    first = run_shard(model, meta, seeds, SPEC, tmp_path, chunk=2, batch_size=8)
    assert first == {"done": 6, "skipped": 0, "nfe": 7}
    chunks = sorted((tmp_path / "chunks").glob("*.npz"))
    assert len(chunks) == 3
    kept = {p: p.stat().st_mtime_ns for p in chunks[:2]}
    reference = np.load(chunks[2])["images"]
    chunks[2].unlink()  # "interrupted" before the last chunk
    again = run_shard(model, meta, seeds, SPEC, tmp_path, chunk=2, batch_size=8)
    assert again["done"] == 2 and again["skipped"] == 4
    assert {p: p.stat().st_mtime_ns for p in chunks[:2]} == kept  # untouched
    np.testing.assert_array_equal(np.load(chunks[2])["images"], reference)
    torn = chunks[1]
    torn.write_bytes(b"not an npz")  # a torn chunk is redone, not trusted
    assert run_shard(model, meta, seeds, SPEC, tmp_path, chunk=2)["done"] == 2


def test_other_settings_in_the_same_dir_refused(export_dir, tmp_path):
    _, meta = load_model(export_dir)
    check_settings(tmp_path, settings_record(SPEC, meta, str(export_dir)))
    check_settings(tmp_path, settings_record(SPEC, meta, str(export_dir)))  # same: fine
    other = SampleSpec(sampler="heun", steps=4)
    with pytest.raises(EvalError, match="other settings"):
        check_settings(tmp_path, settings_record(other, meta, str(export_dir)))


def test_cli_sample_writes_npz_and_grid(export_dir, tmp_path, capsys):
    out = tmp_path / "s"
    argv = [
        "sample",
        str(export_dir),
        "--sampler",
        "heun",
        "--steps",
        "3",
        "--seeds",
        "0-9",
        "--out",
        str(out),
        "--chunk",
        "4",
        "--no-progress",
    ]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["done"] == 10 and Path(res["grid"]).is_file()
    with np.load(out / "samples.npz") as z:
        assert z["images"].shape == (10, 8, 8, 1)
    assert main(argv) == 0  # resumed: nothing left to do
    assert json.loads(capsys.readouterr().out)["skipped"] == 10


@pytest.mark.parametrize("seeds, msg", [("0-99999999999", "out of range"), ("9-3", "empty")])
def test_cli_bad_seeds(export_dir, tmp_path, capsys, seeds, msg):
    rc = main(["sample", str(export_dir), "--seeds", seeds, "--out", str(tmp_path)])
    assert rc == 2 and msg in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_ranks_gloo(export_dir, tmp_path):
    """Two real processes (torchrun, gloo) give the images of one."""
    pytest.importorskip("torch.distributed.run")
    common = [
        "sample",
        str(export_dir),
        "--sampler",
        "edm",
        "--churn",
        "10",
        "--steps",
        "3",
        "--seeds",
        "0-5",
        "--chunk",
        "2",
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "vdmpp.eval",
        *common,
        "--out",
        str(tmp_path / "two"),
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    with (
        np.load(tmp_path / "one" / "samples.npz") as a,
        np.load(tmp_path / "two" / "samples.npz") as b,
    ):
        np.testing.assert_array_equal(a["images"], b["images"])
