"""Shards: writing from digits / .npz / image folders, corrupt members, size checks, replay."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vdmpp.train import config as C
from vdmpp.train.data import ShardStream, StreamSpec, expand_source, probe, write_shards
from vdmpp.train.trainer import train


def _spec(urls, **kw) -> StreamSpec:
    base = dict(
        urls=urls,
        slot=0,
        num_slots=1,
        batch_size=16,
        resolution=8,
        channels=1,
        num_classes=10,
        seed=0,
        shuffle_buffer=32,
    )
    return StreamSpec(**{**base, **kw})


def _take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_train_shards_from_digits_npz_and_folder(tmp_path) -> None:
    meta = write_shards("digits", tmp_path / "d", maxcount=500, resolution=8)
    assert meta["count"] == 1437 and meta["shards"] == 3 and meta["num_classes"] == 10  # train
    assert write_shards("digits:test", tmp_path / "t", maxcount=500, resolution=8)["count"] == 360
    assert write_shards("digits:all", tmp_path / "a", maxcount=2000, resolution=8)["count"] == 1797
    assert json.loads((tmp_path / "d" / "dataset.json").read_text())["resolution"] == 8
    b = _take(ShardStream(_spec(expand_source(str(tmp_path / "d")))), 1)[0]
    assert b["image"].shape == (16, 1, 8, 8) and b["label"].max() < 10

    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "x.npz",
        images=rng.integers(0, 256, (20, 3, 12, 12), dtype=np.uint8),
        labels=np.arange(20) % 4,
    )
    meta = write_shards(tmp_path / "x.npz", tmp_path / "n", maxcount=8, resolution=8)
    assert (meta["count"], meta["shards"], meta["num_classes"], meta["channels"]) == (20, 3, 4, 3)
    assert meta["resolution"] == 8

    for cls in ("cat", "dog"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)).save(
                tmp_path / "img" / cls / f"{i}.png"
            )
    meta = write_shards(tmp_path / "img", tmp_path / "f", resolution=8)
    assert meta["classes"] == ["cat", "dog"] and meta["count"] == 6 and meta["resolution"] == 8
    spec = _spec(expand_source(str(tmp_path / "f")), channels=3, num_classes=2, batch_size=4)
    assert _take(ShardStream(spec), 2)[1]["image"].shape == (4, 3, 8, 8)
    with pytest.raises(C.ConfigError):
        write_shards(tmp_path / "missing", tmp_path / "m")


def _corrupt_copy(src: Path, dst: Path, bad_keys: int) -> None:
    """Copy a shard, replacing the PNG bytes of the first ``bad_keys`` samples with garbage."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        n = 0
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            if m.name.endswith(".png") and n < bad_keys:
                data, n = b"\x89PNG garbage" + data[:10], n + 1
            m.size = len(data)
            tout.addfile(m, io.BytesIO(data))


@pytest.mark.slow
def test_train_corrupt_members_are_skipped_and_counted(small, tmp_path) -> None:
    write_shards("digits", tmp_path / "good", maxcount=400, resolution=8)
    (tmp_path / "bad").mkdir()
    for p in sorted((tmp_path / "good").glob("*.tar")):
        _corrupt_copy(p, tmp_path / "bad" / p.name, bad_keys=5)
    (tmp_path / "bad" / "shard-000005.tar").write_bytes(b"this is not a tar file at all")
    urls = expand_source(str(tmp_path / "bad"))
    batches = _take(ShardStream(_spec(urls, batch_size=50)), 30)
    assert batches[-1]["corrupt"] > 0
    assert all(b["image"].shape == (50, 1, 8, 8) for b in batches)
    # and in a training run: reported in the metrics, never fatal
    cfg = C.load(
        "digits",
        [
            *small,
            f"data.source={tmp_path / 'bad'}",
            "steps=10",
            f"out={tmp_path / 'run'}",
            "data.shuffle_buffer=8",
        ],
    )
    assert train(cfg)["status"] == "done"
    m = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert m[-1]["corrupt_samples"] > 0


def test_train_wrong_image_size_is_a_clear_error_before_training(small, tmp_path) -> None:
    write_shards("digits", tmp_path / "s16", maxcount=1000, resolution=16)
    cfg = C.load("digits", [*small, f"data.source={tmp_path / 's16'}", f"out={tmp_path / 'r'}"])
    with pytest.raises(C.ConfigError, match=r"data.resolution = 8 but .* holds 16×16"):
        train(cfg)
    assert not (tmp_path / "r" / "checkpoints").exists()
    with pytest.raises(C.ConfigError, match=r"no \.tar shards"):
        expand_source(str(tmp_path))
    with pytest.raises(C.ConfigError, match="missing"):
        expand_source(str(tmp_path / "s16" / "shard-{000000..000009}.tar"))
    with pytest.raises(C.ConfigError, match="holds 16×16"):
        probe(expand_source(str(tmp_path / "s16")), 8, 1, 10)


def test_train_stream_replay_and_worker_split(tmp_path) -> None:
    urls = expand_source(
        str(write_shards("digits", tmp_path / "d", maxcount=300, resolution=8) and tmp_path / "d")
    )
    full = _take(ShardStream(_spec(urls, flip=True)), 6)
    pos = full[2]["pos"]
    tail = _take(ShardStream(_spec(urls, flip=True, skip={0: pos})), 3)
    for a, b in zip(full[3:], tail):
        assert (a["image"] == b["image"]).all() and (a["label"] == b["label"]).all()
    # different slots read disjoint shard subsets
    s0 = ShardStream(_spec(urls, slot=0, num_slots=2))._urls(0, 1)
    s1 = ShardStream(_spec(urls, slot=1, num_slots=2))._urls(0, 1)
    assert s0 and s1 and not set(s0) & set(s1) and set(s0) | set(s1) == set(urls)
