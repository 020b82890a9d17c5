"""Unit tests of the run's parts built alone (issue 20): EMA, the metrics rows, CheckpointIO,
atomic files, the rank/device environment, the TOML round trip and one train step.

No subprocess and no full training run: each part is built from toy inputs (or, for the step,
from the small digits config) and checked against an independent computation.
"""

from __future__ import annotations

import json
import math
import os
import random
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vdmpp.train import config as C
from vdmpp.train import distributed, fileio
from vdmpp.train.checkpoint import REQUIRED, CheckpointIO, list_checkpoints, load_checkpoint
from vdmpp.train.distributed import DeviceError, dist_env, resolve_device
from vdmpp.train.ema import EMA
from vdmpp.train.errors import ConfigError
from vdmpp.train.fileio import clean_stale_temps, write_atomic
from vdmpp.train.metrics import LossBins, MetricsLog
from vdmpp.train.toml_io import config_diff, dumps
from vdmpp.train.trainer import Trainer


# --- EMA ---------------------------------------------------------------------------------------
def test_ema_beta_from_halflife_in_images() -> None:
    m = nn.Linear(2, 2)
    for batch, half in [(32, 5000.0), (2048, 50e6), (8, 8.0)]:
        ema = EMA(m, batch_images=batch, halflife_images=half)
        assert ema.beta == 0.5 ** (batch / half)
        # half-life: after half/batch steps the weight of the start is one half
        assert ema.beta ** (half / batch) == pytest.approx(0.5, rel=1e-12)
    assert EMA(m, batch_images=32, decay=0.999).beta == 0.999


def test_ema_towards_a_constant_target_is_geometric() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 4).double()
    ema = EMA(model, batch_images=16, halflife_images=100.0)
    theta0 = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():  # the trained model jumps to θ* and stays there
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 3)
    target = [p.detach().clone() for p in model.parameters()]
    assert not any(torch.equal(a, b) for a, b in zip(theta0, target, strict=True))
    beta = ema.beta
    for k in range(1, 41):
        ema.update(model, k)
        for e, t0, ts in zip(ema.module.parameters(), theta0, target, strict=True):
            expected = ts + beta**k * (t0 - ts)
            torch.testing.assert_close(e, expected, rtol=1e-13, atol=1e-13)
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert not ema.module.training


def test_ema_copies_buffers_and_round_trips_its_state() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).double()
    ema = EMA(model, batch_images=8, decay=0.9)
    with torch.no_grad():
        model[1].running_mean.fill_(2.5)
        model[1].num_batches_tracked.fill_(7)
        model[0].weight.add_(1.0)
    ema.update(model, 1)
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)  # copied, not averaged
    assert int(ema.module[1].num_batches_tracked) == 7
    w_ema = ema.module[0].weight.detach().clone()
    assert not torch.equal(w_ema, model[0].weight)  # averaged, not copied

    other = EMA(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).double(), batch_images=8)
    other.load_state_dict(ema.state_dict())
    for k, v in ema.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    # the state is a copy of the averaged weights: later updates of one do not move the other
    ema.update(model, 2)
    assert torch.equal(other.module[0].weight, w_ema)


# --- LossBins / MetricsLog ---------------------------------------------------------------------
class _Sched:
    def __init__(self, lo, hi) -> None:
        self.logsnr_min, self.logsnr_max = lo, hi


def _bin(lam: float, lo: float, hi: float, n: int) -> int:
    return min(max(math.floor((lam - lo) / (hi - lo) * n), 0), n - 1)


@pytest.mark.parametrize("tensor_ends", [False, True])
def test_loss_bins_index_matches_floor_and_clamps_the_ends(tensor_ends) -> None:
    lo, hi, n = -15.0, 15.0, 7
    ends = (torch.tensor(lo), torch.tensor(hi)) if tensor_ends else (lo, hi)
    bins = LossBins(_Sched(*ends), n, torch.device("cpu"))
    rng = np.random.default_rng(0)
    lam = [*rng.uniform(-20, 20, 200).tolist(), lo, hi, -1e9, 1e9, lo + 1e-9, hi - 1e-9]
    loss = rng.uniform(0, 1, len(lam)).tolist()
    bins.add(torch.tensor(lam, dtype=torch.float32), torch.tensor(loss, dtype=torch.float64))
    lam32 = torch.tensor(lam, dtype=torch.float32).double().tolist()  # what the bins saw
    want_sum, want_n = [0.0] * n, [0] * n
    for lv, lossv in zip(lam32, loss, strict=True):
        k = _bin(lv, lo, hi, n)
        want_sum[k] += lossv
        want_n[k] += 1
    assert bins.acc[1].tolist() == want_n
    assert bins.acc[0].tolist() == pytest.approx(want_sum, rel=1e-12)
    assert want_n[0] > 1 and want_n[-1] > 1  # the clamped ends were exercised


def test_loss_bins_nonfinite_losses_count_but_add_nothing() -> None:
    bins = LossBins(_Sched(-10.0, 10.0), 4, torch.device("cpu"))
    lam = torch.tensor([-9.0, -9.0, -1.0, 1.0, 9.0, 9.0])
    loss = torch.tensor([1.0, math.nan, 2.0, math.inf, 3.0, -math.inf], dtype=torch.float64)
    bins.add(lam, loss)
    assert bins.acc[1].tolist() == [2, 1, 1, 2]
    assert bins.acc[0].tolist() == [1.0, 2.0, 0.0, 3.0]


def _step(loss, gn, ok, n_bins=4, k=0):
    b = torch.zeros(2, n_bins, dtype=torch.float64)
    b[0, k], b[1, k] = (loss if ok else 0.0), 1.0
    return {"loss": loss, "grad_norm": gn, "ok": ok, "bins": b}


def _extra(images):
    return {
        "images": images,
        "nonfinite_steps": 1,
        "corrupt_samples": 0,
        "lambda_std": 3.0,
        "lambda_mean": 0.0,
    }


def test_metrics_log_writes_one_row_of_window_means_and_resets(tmp_path) -> None:
    log = MetricsLog(tmp_path, main=True, every=3, bins=4, tensorboard=False)
    assert [log.due(s, False) for s in (1, 2, 3, 6, 7)] == [False, False, True, True, False]
    assert log.due(7, True)
    for m in (
        _step(1.0, 10.0, True, k=0),
        _step(math.nan, math.nan, False),
        _step(3.0, 20.0, True, k=2),
    ):
        log.add(m, images=8)
    lines: list[str] = []
    sched = _Sched(-8.0, 8.0)
    rec = log.write(
        3, 10, lr=1e-3, bins=log.bins, extra=_extra(24), schedule=sched, log=lines.append
    )
    assert rec is not None
    assert rec["loss"] == 2.0 and rec["grad_norm"] == 15.0  # over the 2 ok steps only
    assert rec["images_per_s"] > 0 and rec["images"] == 24 and rec["step"] == 3
    assert rec["loss_per_logsnr_bin"]["edges"] == pytest.approx([-8, -4, 0, 4, 8])
    # bin 0: one ok step (1.0); bin 2: one ok step (3.0); the non-finite step's bin (0) counts
    assert rec["loss_per_logsnr_bin"]["loss"] == [0.5, None, 3.0, None]
    assert len(lines) == 1 and lines[0].startswith("step 3/10")
    assert log.n == log.steps == log.imgs == 0 and log.bins is None  # window reset

    log.add(_step(5.0, 1.0, True, k=3), images=8)
    rec2 = log.write(
        4, 10, lr=1e-3, bins=log.bins, extra=_extra(32), schedule=sched, log=lines.append
    )
    assert rec2["loss"] == 5.0 and rec2["grad_norm"] == 1.0
    log.close()
    rows = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 4]
    assert rows[0]["loss"] == 2.0 and rows[1]["loss"] == 5.0


def test_metrics_log_other_ranks_write_nothing(tmp_path) -> None:
    log = MetricsLog(tmp_path, main=False, every=1, bins=4, tensorboard=True)
    log.add(_step(1.0, 1.0, True), images=8)
    lines: list[str] = []
    out = log.write(
        1, 2, lr=1.0, bins=log.bins, extra=_extra(8), schedule=_Sched(-1, 1), log=lines.append
    )
    assert out is None and lines == []
    assert log.steps == 0 and log.bins is None  # the window is still reset
    log.close()
    assert list(tmp_path.iterdir()) == []


# --- CheckpointIO ------------------------------------------------------------------------------
class _Counter:
    def __init__(self, v: int = 0) -> None:
        self.value = v

    def state_dict(self) -> int:
        return self.value

    def load_state_dict(self, v: int) -> None:
        self.value = int(v)


def _parts(seed: int):
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    ema = EMA(model, batch_images=4, decay=0.5)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).square().sum().backward()
    opt.step()
    ema.update(model)
    return {"model": model, "ema": ema, "optimizer": opt, "counter": _Counter(seed + 1)}


def test_checkpoint_io_round_trip_and_rng(tmp_path) -> None:
    parts = _parts(0)
    io = CheckpointIO(tmp_path, keep=3, parts=parts)
    state = io.state(5, config="x = 1", world_size=1)
    after_save = (torch.rand(4), np.random.rand(3), random.random())
    path = io.save(state)
    assert path.name == "ckpt-000000005.pt"
    found = io.latest()
    assert found is not None and found[0] == path
    loaded = found[1]
    assert loaded["step"] == 5 and loaded["config"] == "x = 1" and loaded["counter"] == 1

    fresh = _parts(1)  # other weights, other optimizer state, other counter
    torch.rand(100)  # move every generator on
    np.random.rand(10)
    random.random()
    CheckpointIO(tmp_path, keep=3, parts=fresh).restore(loaded)
    after_restore = (torch.rand(4), np.random.rand(3), random.random())
    assert torch.equal(after_restore[0], after_save[0])
    assert np.array_equal(after_restore[1], after_save[1])
    assert after_restore[2] == after_save[2]
    for k, v in parts["model"].state_dict().items():
        assert torch.equal(fresh["model"].state_dict()[k], v)
    for k, v in parts["ema"].state_dict().items():
        assert torch.equal(fresh["ema"].state_dict()[k], v)
    o_a, o_b = parts["optimizer"].state_dict(), fresh["optimizer"].state_dict()
    for i in o_a["state"]:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(o_a["state"][i][k], o_b["state"][i][k]), (i, k)
    assert fresh["counter"].value == 1


def test_checkpoint_io_missing_optional_part_keeps_fresh_state_required_raises(tmp_path) -> None:
    io = CheckpointIO(tmp_path, keep=3, parts=_parts(0))
    old = io.state(1)
    del old["counter"]  # an older checkpoint, written before this part existed
    fresh = _parts(1)
    CheckpointIO(tmp_path, keep=3, parts=fresh).restore(old)
    assert fresh["counter"].value == 2  # fresh state kept
    assert torch.equal(fresh["model"].weight, _parts(0)["model"].weight)  # the rest restored
    for key in ("model", "ema", "optimizer"):
        assert key in REQUIRED
        broken = io.state(1)
        del broken[key]
        with pytest.raises(KeyError):
            CheckpointIO(tmp_path, keep=3, parts=_parts(1)).restore(broken)


def test_checkpoint_io_prune_keeps_the_newest(tmp_path) -> None:
    io = CheckpointIO(tmp_path, keep=2, parts=_parts(0))
    for step in (1, 2, 3, 4, 5):
        io.save(io.state(step))
        assert len(list_checkpoints(tmp_path)) == min(step, 2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert load_checkpoint(list_checkpoints(tmp_path)[-1][1])["step"] == 5
    assert not list(tmp_path.glob(".*.tmp"))


# --- fileio ------------------------------------------------------------------------------------
def test_write_atomic_keeps_the_old_file_when_the_writer_raises(tmp_path) -> None:
    path = tmp_path / "status.json"
    write_atomic(path, b"old")

    def writer(f) -> None:
        f.write(b"new but only half")
        f.flush()
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        write_atomic(path, writer)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]  # no temp left
    write_atomic(path, "néw")
    assert path.read_text(encoding="utf-8") == "néw"


def test_write_atomic_fsyncs_the_file_before_replace_and_the_dir_after(tmp_path, monkeypatch):
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        return real_fsync(fd)

    def replace(a, b):
        events.append("replace")
        return real_replace(a, b)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    monkeypatch.setattr(fileio.os, "replace", replace)
    fileio.write_json_atomic(tmp_path / "a.json", {"x": 1})
    assert events == ["fsync-file", "replace", "fsync-dir"]
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}


def test_clean_stale_temps_removes_only_dead_writers(tmp_path) -> None:
    pid_file = Path("/proc/sys/kernel/pid_max")
    pid_max = int(pid_file.read_text()) if pid_file.is_file() else 4194304
    dead = pid_max + 1  # no process can have this id
    assert not fileio.pid_alive(dead)
    mine = tmp_path / f".config.toml.{os.getpid()}.tmp"
    parent = tmp_path / f".status.json.{os.getppid()}.tmp"  # alive, and not this process
    stale = tmp_path / f".config.toml.{dead}.tmp"
    keep = tmp_path / "config.toml"
    for p in (mine, parent, stale, keep):
        p.write_text("x")
    gone = clean_stale_temps(tmp_path)
    assert gone == [stale]
    assert mine.exists() and parent.exists() and keep.exists() and not stale.exists()


# --- distributed -------------------------------------------------------------------------------
_RANK_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "SLURM_PROCID",
    "SLURM_STEP_ID",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
)


@pytest.fixture
def clean_env(monkeypatch):
    for k in _RANK_VARS:  # setenv first, so that monkeypatch restores (or removes) each one
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    return monkeypatch


def test_dist_env_reads_srun_tasks_of_a_job_step(clean_env) -> None:
    for k, v in dict(
        SLURM_PROCID="1", SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="2", SLURM_LOCALID="1"
    ).items():
        clean_env.setenv(k, v)
    assert dist_env() == (1, 2, 1)
    # copied to torchrun's names, where init_process_group("env://") looks
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == (
        "1",
        "2",
        "1",
    )


def test_dist_env_batch_script_is_not_a_rank(clean_env) -> None:
    for k, v in dict(SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_LOCALID="1").items():
        clean_env.setenv(k, v)
    assert dist_env() == (0, 1, 0)
    assert "WORLD_SIZE" not in os.environ


def test_dist_env_prefers_torchrun_and_falls_back_to_ntasks(clean_env) -> None:
    for k, v in dict(SLURM_PROCID="3", SLURM_STEP_ID="0", SLURM_NTASKS="4").items():
        clean_env.setenv(k, v)
    assert dist_env() == (3, 4, 0)
    clean_env.setenv("WORLD_SIZE", "8")
    clean_env.setenv("RANK", "5")
    clean_env.setenv("LOCAL_RANK", "1")
    assert dist_env() == (5, 8, 1)  # torchrun's variables win over srun's


def test_resolve_device_errors_name_the_fix(monkeypatch) -> None:
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"no CUDA device.*use device = 'cpu'") as e:
        resolve_device("cuda:1", what="config: device =", use="device = 'cpu'")
    assert isinstance(e.value, ConfigError)  # exit code 2: a config error, no run
    with pytest.raises(DeviceError, match=r"not a device; use cpu, cuda, cuda:N, mps or auto"):
        resolve_device("gpu")


# --- toml_io -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(C.builtin_configs()))
def test_dumps_then_load_round_trips_every_shipped_config(name, tmp_path) -> None:
    sets = ["objective.label_dropout=0.1", "model.overrides.dropout=0.25", "out='a \"b\"/c'"]
    cfg = C.load(name, sets if C.load(name).data.num_classes else sets[1:])
    path = tmp_path / "config.toml"
    path.write_text(dumps(cfg), encoding="utf-8")
    back = C.load(path)
    assert back == cfg
    assert dumps(back) == dumps(cfg)


def test_config_diff_names_the_changed_keys() -> None:
    a = C.load("digits")
    b = C.load("digits", ["optimizer.lr=1e-3", "objective.label_dropout=0.1", "steps=7"])
    assert config_diff(dumps(a), b) == "differs in objective.label_dropout, optimizer.lr"
    assert config_diff(dumps(a), a) == "same model keys"  # steps is not a model key
    assert config_diff(None, a) == "no config saved in the checkpoint"
    assert config_diff("[model\n", a) == "its saved config does not parse"


# --- one train step ----------------------------------------------------------------------------
def _trainer(tmp_path, small, name: str, *sets: str) -> Trainer:
    return Trainer(C.load("digits", [*small, "steps=3", f"out='{tmp_path / name}'", *sets]))


def test_train_step_is_finite_counts_and_is_deterministic(tmp_path, small) -> None:
    torch.set_num_threads(1)
    trainers = [_trainer(tmp_path, small, n) for n in ("a", "b")]
    other = _trainer(tmp_path, small, "c", "seed=1")
    try:
        init = {k: v.clone() for k, v in trainers[0].model.state_dict().items()}
        ms = [t.train_step() for t in (*trainers, other)]
        for t, m in zip((*trainers, other), ms, strict=True):
            assert t.step == 1 and m["ok"] and not m["stop"]
            assert math.isfinite(m["loss"]) and m["loss"] > 0
            assert math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
            assert m["bins"][1].sum().item() == t.global_batch  # every example in one λ bin
        assert ms[0]["loss"] == ms[1]["loss"] and ms[0]["grad_norm"] == ms[1]["grad_norm"]
        a, b, c = (t.model.state_dict() for t in (*trainers, other))
        assert any(not torch.equal(a[k], init[k]) for k in a)  # the step moved the weights
        for k in a:
            assert torch.equal(a[k], b[k]), k  # bit-identical
        ea, eb = (t.ema.state_dict() for t in trainers)
        assert all(torch.equal(ea[k], eb[k]) for k in ea)
        sa, sb = (t.objective.schedule.state_dict() for t in trainers)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert any(not torch.equal(a[k], c[k]) for k in a)  # another seed: another step
    finally:
        for t in (*trainers, other):
            t.close()
