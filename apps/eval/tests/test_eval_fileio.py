"""Every file vdmpp-eval writes is durable when the write returns (vdmpp.train.fileio): its data
are fsynced before the rename over the final name, and the directory after it; a process killed
right after a write returns leaves the whole file. And ranks/devices come from vdmpp-train's
``distributed`` module: an ``srun`` task gets the same place in the run as vdmpp-train's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vdmpp.eval import commands, runtime
from vdmpp.eval.cli import main
from vdmpp.eval.spec import SampleSpec


@pytest.fixture
def io_log(monkeypatch):
    """Record os.fsync (by the path its descriptor names) and os.replace, in call order."""
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        real_replace(src, dst, *a, **k)
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to name a descriptor's file")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def assert_durable(events: list[tuple], path: Path) -> None:
    """``path`` was renamed into place after its temp file's data were fsynced, and its
    directory was fsynced after the rename."""
    path = Path(os.path.realpath(path))
    renames = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(path)]
    assert renames, f"{path.name} was not written by a rename (not atomic): {events}"
    i = renames[-1]
    tmp = events[i][1]
    assert ("fsync", tmp) in events[:i], f"{path.name}: data not fsynced before the rename"
    assert ("fsync", str(path.parent)) in events[i + 1 :], f"{path.name}: dir not fsynced"


def test_sample_outputs_are_fsynced_before_and_after_the_rename(export_dir, tmp_path, io_log):
    out = tmp_path / "s"
    res = commands.sample(
        export_dir,
        seeds="0-5",
        out=out,
        spec=SampleSpec(steps=2),
        chunk=4,
        grid=4,
        device="cpu",
        progress=False,
    )
    assert res["done"] == 6
    written = [out / "sample.json", out / "samples.npz", *sorted((out / "chunks").glob("*.npz"))]
    assert len(written) == 4
    for path in written:
        assert_durable(io_log, path)
    assert not list(out.rglob("*.tmp"))


def test_cache_files_are_fsynced(tmp_path, monkeypatch, io_log):
    """The verified Inception copy, a downloaded Inception file, the digits classifier and the
    reference-feature cache."""
    import hashlib
    import io

    from vdmpp.eval import digits as D
    from vdmpp.eval import metrics as M

    monkeypatch.setenv("VDMPP_CACHE", str(tmp_path / "cache"))
    state = {k: torch.randn(2, 2) for k in M._INCEPTION_KEYS}
    buf = io.BytesIO()
    torch.save(state, buf)
    src = tmp_path / "served.pth"
    src.write_bytes(buf.getvalue())
    assert_durable(io_log, M.inception_weights(src))

    monkeypatch.setattr(M, "INCEPTION_URL", src.as_uri())
    monkeypatch.setattr(M, "INCEPTION_SHA256_PREFIX", hashlib.sha256(buf.getvalue()).hexdigest())
    monkeypatch.delenv("VDMPP_OFFLINE")
    dst = tmp_path / "hub" / M.INCEPTION_FILE
    assert M.download_inception(dst) == ""
    assert_durable(io_log, dst)

    def quick():  # the file, not the training, is under test
        torch.manual_seed(0)
        return D.DigitsNet().eval().requires_grad_(False), 0.5

    monkeypatch.setattr(D, "train_classifier", quick)
    assert_durable(io_log, D.classifier_path())
    images = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 1), dtype=np.uint8)
    M.compute_metrics(images, images[::-1].copy(), extractor="digits", metrics=("fid",), cuda=False)
    (feats,) = (tmp_path / "cache" / "eval" / "features").glob("*.safetensors")
    assert_durable(io_log, feats)


_KILLED_AFTER_WRITE = """
import os, signal, sys
import numpy as np
from vdmpp.eval.sampling import _write_npz, check_settings
from pathlib import Path
out = Path(sys.argv[1])
check_settings(out, {"spec": {"sampler": "heun"}, "pad": "x" * 100000})
_write_npz(out / "samples.npz", images=np.full((64, 32, 32, 3), 7, np.uint8),
           seeds=np.arange(64))
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_killed_right_after_a_write_returns_leaves_the_whole_file(tmp_path):
    r = subprocess.run(
        [sys.executable, "-c", _KILLED_AFTER_WRITE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == -signal.SIGKILL, r.stderr
    import json

    assert json.loads((tmp_path / "sample.json").read_text())["pad"] == "x" * 100000
    with np.load(tmp_path / "samples.npz") as z:
        assert z["images"].shape == (64, 32, 32, 3) and (z["images"] == 7).all()
    assert not list(tmp_path.glob(".*.tmp"))


# --- ranks and devices: the same answer as vdmpp-train's -------------------------------------
_SRUN = {
    "SLURM_PROCID": "1",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_LOCALID": "1",
}
_TORCHRUN = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_STEP_ID",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
)


def _private_environ(monkeypatch, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN}
    env.update(extra)
    monkeypatch.setattr(os, "environ", env)
    return env


@pytest.fixture
def fake_group(monkeypatch):
    """init_process_group recorded instead of run (no second process needed)."""
    import torch.distributed as dist

    calls: list[dict] = []
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(kw))
    return calls


@pytest.mark.parametrize("cuda", [False, True])
def test_srun_task_gets_trains_rank_world_and_device(monkeypatch, fake_group, cuda):
    from vdmpp.train.distributed import dist_env, resolve_device

    if cuda:  # a 2-GPU node: the rank's device is cuda:<SLURM_LOCALID>
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    ports = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    _private_environ(monkeypatch, {**_SRUN, **ports})
    d = runtime.join("auto")
    assert runtime.rank() == 1  # the logger's rank too

    _private_environ(monkeypatch, {**_SRUN, **ports})  # train's view of a fresh environment
    rank, world, local = dist_env()
    train_device = resolve_device("auto", local_rank=local)
    assert (d.rank, d.world, d.local_rank, d.device) == (rank, world, local, train_device)
    assert (rank, world, local) == (1, 2, 1)
    assert d.device == (torch.device("cuda", 1) if cuda else torch.device("cpu"))
    assert fake_group == [{"backend": "gloo"}]


def test_srun_without_master_addr_is_one_line(
    export_dir, tmp_path, monkeypatch, capsys, fake_group
):
    _private_environ(monkeypatch, dict(_SRUN))
    rc = main(
        [
            "sample",
            str(export_dir),
            "--seeds",
            "0-3",
            "--out",
            str(tmp_path / "s"),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0, err
    assert "MASTER_ADDR and MASTER_PORT not set" in err and "[vdmpp-eval" not in err
    assert fake_group == [] and not (tmp_path / "s").exists()
