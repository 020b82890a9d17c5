"""`vdmpp-train shards` as a dataset tool: class folders, plain folders, CIFAR-10/100 python
tarballs, .npz; parallel and deterministic; skipped inputs reported; the manifest that training
validates. All inputs are generated here, in the real layouts, at 8×8 (CIFAR at its 32×32)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image

from vdmpp.train import shards as S
from vdmpp.train.cli import main
from vdmpp.train.config import ConfigError
from vdmpp.train.data import expand_source, probe


def read_shards(out: Path) -> list[tuple[str, np.ndarray, int | None]]:
    """(key, uint8 [H, W, C], label or None) of every sample, read with tarfile + PIL only."""
    meta = json.loads((out / "dataset.json").read_text())
    samples = []
    for e in meta["files"]:
        pngs, cls = {}, {}
        with tarfile.open(out / e["name"]) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                data = tar.extractfile(m).read()
                if ext == "png":
                    with Image.open(io.BytesIO(data)) as im:
                        a = np.asarray(im)
                    pngs[key] = a[..., None] if a.ndim == 2 else a
                else:
                    cls[key] = int(data.decode())
        assert len(pngs) == e["count"]
        samples += [(k, pngs[k], cls.get(k)) for k in sorted(pngs)]
    assert len(samples) == meta["count"]
    return samples


def _as_set(images, labels) -> list[tuple[bytes, int | None]]:
    return sorted(
        (np.ascontiguousarray(a).tobytes(), None if y is None else int(y))
        for a, y in zip(images, labels)
    )


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)


# --- class folders, plain folders, skipped inputs ---------------------------------------------
def _class_tree(root: Path, rng) -> dict[str, list[np.ndarray]]:
    made: dict[str, list[np.ndarray]] = {}
    for cls, n in (("cat", 3), ("dog", 2), ("zebra", 4)):
        made[cls] = []
        for i in range(n):
            a = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            _save(root / cls / ("deep" if i == 2 else "") / f"{i}.png", a)
            made[cls].append(a)
    return made


def test_shards_class_folders_labels_and_skipped_inputs(tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    made = _class_tree(tmp_path / "src", rng)
    (tmp_path / "src" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (tmp_path / "src" / "dog" / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(tmp_path / "src" / "cat" / "w16.png")
    grey = rng.integers(0, 256, (8, 8), dtype=np.uint8)  # grey in a colour set: replicated
    Image.fromarray(grey).save(tmp_path / "src" / "zebra" / "g.png")
    made["zebra"].append(np.repeat(grey[..., None], 3, axis=2))

    rc = main(
        [
            "shards",
            str(tmp_path / "src"),
            str(tmp_path / "out"),
            "--resolution",
            "8",
            "--shard-size",
            "4",
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    out = tmp_path / "out"
    meta = json.loads((out / "dataset.json").read_text())
    assert json.loads(cap.out) == {k: v for k, v in meta.items() if k != "files"}
    assert meta["classes"] == ["cat", "dog", "zebra"] and meta["num_classes"] == 3
    assert json.loads((out / "labels.json").read_text()) == {"cat": 0, "dog": 1, "zebra": 2}
    assert meta["class_counts"] == [3, 2, 5] and meta["count"] == 10
    # 13 inputs in parts of 4 (4, 4, 4, 1); the 3 skipped ones are missing from their parts
    assert sum(e["count"] for e in meta["files"]) == 10 and len(meta["files"]) in (3, 4)
    assert (meta["resolution"], meta["channels"], meta["source"]["kind"]) == (8, 3, "class-folders")
    # the 3 bad inputs: counted, named (first few) on stderr, all listed in skipped.txt
    assert meta["skipped"]["count"] == 3
    warn = cap.err.strip()
    assert warn.count("\n") == 0 and "skipped 3 input(s)" in warn, warn
    listed = (out / "skipped.txt").read_text().splitlines()
    reasons = {Path(x.split("\t")[0]).name: x.split("\t")[1] for x in listed}
    assert set(reasons) == {"broken.png", "cut.jpg", "w16.png"}
    assert "not a readable image" in reasons["broken.png"]
    assert "wrong mode I;16" in reasons["w16.png"]
    # pixels and labels: exactly the source images, each under its folder's label
    got = read_shards(out)
    want = [(a, i) for i, c in enumerate(meta["classes"]) for a in made[c]]
    assert _as_set([g for _, g, _ in got], [y for *_, y in got]) == _as_set(*zip(*want))
    # each shard's manifest entry is its real size and sha256
    for e in meta["files"]:
        data = (out / e["name"]).read_bytes()
        assert e["bytes"] == len(data) and e["sha256"] == hashlib.sha256(data).hexdigest()
    assert not list(out.glob(".*tmp")) and not (out / ".incomplete").exists()


def test_shards_plain_folder_is_unlabeled_and_centre_cropped(tmp_path) -> None:
    rng = np.random.default_rng(1)
    src = tmp_path / "flat"
    tall = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)  # H 12, W 10
    _save(src / "a.png", tall)
    _save(src / "sub" / "b.jpg", rng.integers(0, 256, (10, 12, 3), dtype=np.uint8))
    _save(src / ".hidden" / "c.png", tall)  # dot-folders are not data
    meta = S.write_shards(src, tmp_path / "o", resolution=6, workers=1)
    assert meta["classes"] is None and meta["count"] == 2 and meta["source"]["kind"] == "folder"
    got = read_shards(tmp_path / "o")
    assert all(y is None for *_, y in got) and all(a.shape == (6, 6, 3) for _, a, _ in got)
    # EDM's center-crop: rows (12 - 10) // 2 = 1 .. 11 of the tall image, then Lanczos to 6×6
    ref = np.asarray(Image.fromarray(tall[1:11]).resize((6, 6), Image.Resampling.LANCZOS))
    assert any((a == ref).all() for _, a, _ in got)
    # --labels folders on the same folder: labels from its sub-folders only ('sub')
    meta = S.write_shards(src, tmp_path / "o2", resolution=6, labels="folders")
    assert meta["classes"] == ["sub"] and meta["count"] == 1


def test_shards_all_inputs_unusable_is_one_line_exit_2(tmp_path, capsys) -> None:
    (tmp_path / "src" / "cat").mkdir(parents=True)
    for n in ("a.png", "b.png"):
        (tmp_path / "src" / "cat" / n).write_bytes(b"garbage")
    rc = main(["shards", str(tmp_path / "src"), str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "no usable image among 2" in err, err
    assert not (tmp_path / "out" / "dataset.json").exists()


# --- CIFAR python tarballs --------------------------------------------------------------------
class _Py2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle wrote CIFAR's batches: protocol 2, ``bytes`` as py2 ``str``
    opcodes (SHORT_BINSTRING/BINSTRING), numpy's functions under ``numpy.core``."""

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        head = (
            pickle.SHORT_BINSTRING + bytes([n])
            if n < 256
            else pickle.BINSTRING + n.to_bytes(4, "little")
        )
        self.write(head + obj)
        self.memoize(obj)

    def save_global(self, obj, name=None) -> None:
        mod = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{mod}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)

    dispatch[bytes] = save_bytes
    dispatch[type] = save_global
    dispatch[type(len)] = save_global


def _py2_dumps(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _cifar_tar(path: Path, members: dict[str, dict], protocol: int | str) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            data = _py2_dumps(obj) if protocol == "py2" else pickle.dumps(obj, protocol=protocol)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _cifar_rows(rng, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)  # R plane, G plane, B plane (32×32)


def _nhwc_from_rows(rows: np.ndarray) -> np.ndarray:
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def test_shards_cifar10_tarball(tmp_path) -> None:
    rng = np.random.default_rng(2)
    names = [f"class{i}".encode() for i in range(10)]
    batches = {
        f"data_batch_{i}": (_cifar_rows(rng, 3), [int(x) for x in rng.integers(0, 10, 3)])
        for i in range(1, 6)
    }
    test = (_cifar_rows(rng, 4), [9, 0, 3, 3])
    members = {
        f"cifar-10-batches-py/{k}": {
            b"batch_label": k.encode(),
            b"labels": lab,
            b"data": d,
            b"filenames": [b"x.png"] * len(lab),
        }
        for k, (d, lab) in {**batches, "test_batch": test}.items()
    }
    members["cifar-10-batches-py/batches.meta"] = {b"label_names": names, b"num_vis": 3072}
    tgz = tmp_path / "cifar-10-python.tar.gz"
    _cifar_tar(tgz, members, protocol="py2")  # as the real files: Python 2 pickles
    assert b"cnumpy.core.multiarray\n_reconstruct" in _py2_dumps(
        members["cifar-10-batches-py/test_batch"]
    )

    meta = S.write_shards(tgz, tmp_path / "train", resolution=32, maxcount=4, workers=1)
    assert (meta["count"], meta["shards"], meta["num_classes"]) == (15, 4, 10)
    assert meta["classes"] == [n.decode() for n in names] and meta["source"]["kind"] == "cifar10"
    got = read_shards(tmp_path / "train")
    src = np.concatenate([_nhwc_from_rows(d) for d, _ in batches.values()])
    labels = [y for _, lab in batches.values() for y in lab]
    assert _as_set([a for _, a, _ in got], [y for *_, y in got]) == _as_set(src, labels)

    meta = S.write_shards(tgz, tmp_path / "test", resolution=32, split="test")
    got = read_shards(tmp_path / "test")
    assert meta["count"] == 4 and meta["source"]["split"] == "test"
    assert _as_set([a for _, a, _ in got], [y for *_, y in got]) == _as_set(
        _nhwc_from_rows(test[0]), test[1]
    )
    # and resized: 32 → 8 (centre crop is the whole square; Lanczos)
    meta = S.write_shards(tgz, tmp_path / "t8", resolution=8, split="test")
    assert meta["resolution"] == 8 and all(
        a.shape == (8, 8, 3) for _, a, _ in read_shards(tmp_path / "t8")
    )


def test_shards_cifar100_tarball_fine_labels(tmp_path) -> None:
    rng = np.random.default_rng(3)
    train = _cifar_rows(rng, 6)
    fine = [99, 0, 57, 57, 12, 3]
    members = {
        "cifar-100-python/train": {
            b"data": train,
            b"fine_labels": fine,
            b"coarse_labels": [y // 5 for y in fine],
        },
        "cifar-100-python/test": {
            b"data": _cifar_rows(rng, 2),
            b"fine_labels": [1, 2],
            b"coarse_labels": [0, 0],
        },
        "cifar-100-python/meta": {
            b"fine_label_names": [f"f{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"c{i}".encode() for i in range(20)],
        },
    }
    tgz = tmp_path / "cifar-100-python.tar.gz"
    _cifar_tar(tgz, members, protocol=pickle.HIGHEST_PROTOCOL)
    meta = S.write_shards(tgz, tmp_path / "o", workers=1)  # resolution: the source's (32)
    assert (meta["num_classes"], meta["resolution"], meta["source"]["kind"]) == (
        100,
        32,
        "cifar100",
    )
    assert meta["classes"][57] == "f57"
    got = read_shards(tmp_path / "o")
    assert _as_set([a for _, a, _ in got], [y for *_, y in got]) == _as_set(
        _nhwc_from_rows(train), fine
    )


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", ["data_batch_1", "batches.meta"])
def test_shards_hostile_pickle_is_refused_without_running(tmp_path, capsys, where) -> None:
    marker = tmp_path / "pwned"
    rng = np.random.default_rng(4)
    members = {
        f"cifar-10-batches-py/{k}": {b"data": _cifar_rows(rng, 2), b"labels": [0, 1]}
        for k in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    }
    members["cifar-10-batches-py/batches.meta"] = {b"label_names": [b"a", b"b"]}
    members[f"cifar-10-batches-py/{where}"][b"x"] = _Evil(marker)
    tgz = tmp_path / "cifar-10-python.tar.gz"
    _cifar_tar(tgz, members, protocol=2)
    rc = main(["shards", str(tgz), str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "Traceback" not in err, err
    assert "refused to load global posix.system" in err and where in err, err
    assert not marker.exists()  # nothing ran
    # the reader is the only unpickling path: the same bytes through pickle would run it
    with pytest.raises(ConfigError, match="refused"):
        S._unpickle_batch(pickle.dumps({"a": _Evil(marker)}), "x")
    assert not marker.exists()


# --- npz ----------------------------------------------------------------------------------------
def test_shards_npz_nhwc_and_nchw_give_identical_shards(tmp_path) -> None:
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (11, 8, 8, 3), dtype=np.uint8)
    y = rng.integers(0, 4, 11)
    np.savez(tmp_path / "nhwc.npz", images=x, labels=y)
    np.savez(tmp_path / "nchw.npz", x=x.transpose(0, 3, 1, 2), y=y)
    a = S.write_shards(tmp_path / "nhwc.npz", tmp_path / "a", maxcount=5)
    b = S.write_shards(tmp_path / "nchw.npz", tmp_path / "b", maxcount=5)
    assert a["files"] == b["files"] and a["count"] == 11 and a["num_classes"] == int(y.max()) + 1
    got = read_shards(tmp_path / "a")
    assert _as_set([g for _, g, _ in got], [lab for *_, lab in got]) == _as_set(x, y)
    grey = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)  # [N, H, W]: 1 channel, unlabeled
    np.savez(tmp_path / "g.npz", images=grey)
    m = S.write_shards(tmp_path / "g.npz", tmp_path / "g")
    assert (m["channels"], m["classes"]) == (1, None)
    assert _as_set([g for _, g, _ in read_shards(tmp_path / "g")], [None] * 3) == _as_set(
        grey[..., None], [None] * 3
    )


# --- parallel, deterministic, atomic ----------------------------------------------------------
def test_shards_workers_1_and_2_write_identical_bytes(tmp_path) -> None:
    rng = np.random.default_rng(6)
    _class_tree(tmp_path / "src", rng)
    for i in range(6):
        _save(
            tmp_path / "src" / "dog" / f"x{i}.jpg",
            rng.integers(0, 256, (12, 10, 3), dtype=np.uint8),
        )
    (tmp_path / "src" / "cat" / "bad.png").write_bytes(b"nope")
    one = S.write_shards(tmp_path / "src", tmp_path / "w1", resolution=8, maxcount=3, workers=1)
    two = S.write_shards(tmp_path / "src", tmp_path / "w2", resolution=8, maxcount=3, workers=2)
    assert one["files"] == two["files"] and one["shards"] >= 5
    assert one["skipped"]["count"] == two["skipped"]["count"] == 1
    for e in one["files"]:
        assert (tmp_path / "w1" / e["name"]).read_bytes() == (
            tmp_path / "w2" / e["name"]
        ).read_bytes()


def test_shards_interrupted_write_leaves_no_manifest_and_training_refuses(
    tmp_path, capsys, monkeypatch
) -> None:
    rng = np.random.default_rng(7)
    np.savez(
        tmp_path / "x.npz",
        images=rng.integers(0, 256, (9, 8, 8, 1), dtype=np.uint8),
        labels=np.arange(9) % 3,
    )
    out = tmp_path / "out"
    S.write_shards(tmp_path / "x.npz", out, maxcount=3)  # a good earlier write
    real, calls = S._write_part, []

    def dies_on_third(part):
        calls.append(part.index)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed mid-run
        return real(part)

    monkeypatch.setattr(S, "_write_part", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        S.write_shards(tmp_path / "x.npz", out, maxcount=3)
    assert not (out / "dataset.json").exists() and (out / ".incomplete").exists()
    calls.clear()  # the same through the CLI (Ctrl-C): one line, exit 130
    assert (
        main(
            [
                "shards",
                str(tmp_path / "x.npz"),
                str(out),
                "--shard-size",
                "3",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 130
    )
    assert "has no manifest" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"interrupted.*vdmpp-train shards SRC"):
        probe(expand_source(str(out)), 8, 1, 3)
    monkeypatch.setattr(S, "_write_part", real)
    meta = S.write_shards(tmp_path / "x.npz", out, maxcount=3)  # the rerun completes and cleans
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [e["name"] for e in meta["files"]] + ["dataset.json", "labels.json"]
    )
    probe(expand_source(str(out)), 8, 1, 3)


def test_shards_progress_lines_without_a_tty(tmp_path, capsys, monkeypatch) -> None:
    np.savez(tmp_path / "x.npz", images=np.zeros((6, 8, 8, 1), np.uint8))
    monkeypatch.setattr(S, "PROGRESS_EVERY_S", 0.0)  # a line per shard written
    S.write_shards(tmp_path / "x.npz", tmp_path / "o", maxcount=2, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and "shards: 6/6 images (100%)" in err, err
    assert err.count("shards: ") >= 3  # one per shard written, then the final line
    S.write_shards(tmp_path / "x.npz", tmp_path / "o", maxcount=2, progress=False)
    assert capsys.readouterr().err == ""


# --- training validates the manifest -----------------------------------------------------------
def _sets(*s: str) -> list[str]:
    return [a for x in s for a in ("--set", x)]


def test_shards_training_validates_the_manifest(small, tmp_path, capsys) -> None:
    rng = np.random.default_rng(8)
    _class_tree(tmp_path / "src", rng)
    data = tmp_path / "shards"
    assert (
        main(
            [
                "shards",
                str(tmp_path / "src"),
                str(data),
                "--resolution",
                "8",
                "--shard-size",
                "3",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    cfg = [
        *small,
        f"data.source={data}",
        "data.channels=3",
        "data.num_classes=3",
        "data.shuffle_buffer=4",
        "steps=3",
    ]

    assert main(["digits", *_sets(*cfg, f"out={tmp_path / 'run'}")]) == 0, capsys.readouterr()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 3

    def refused(*extra: str) -> str:
        rc = main(["digits", *_sets(*cfg, *extra, f"out={tmp_path / 'r-x'}")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.count("\n") == 0 and "Traceback" not in err, (rc, err)
        return err

    assert "data.resolution = 16 but" in refused("data.resolution=16")
    assert "--resolution 16" in refused("data.resolution=16")  # how to rewrite them
    assert "data.channels = 1 but" in refused("data.channels=1")
    assert "has 3 classes" in refused("data.num_classes=10")

    first = data / "shard-000000.tar"
    good = first.read_bytes()
    first.write_bytes(good[:-512])  # truncated
    assert "shard-000000.tar: " in refused() and "bytes but dataset.json says" in refused()
    flipped = bytearray(good)
    flipped[700] ^= 0xFF  # same size, one byte changed: sha256 (auto: data ≤ 1 GiB)
    first.write_bytes(bytes(flipped))
    assert "sha256 differs" in refused()
    assert main(["shards", str(data), "--verify"]) == 2
    assert "sha256 differs" in capsys.readouterr().err
    first.unlink()
    assert "shard-000000.tar is listed in dataset.json but missing" in refused()
    first.write_bytes(good)
    (data / "shard-000099.tar").write_bytes(good)
    assert "shard-000099.tar is not listed" in refused()
    (data / "shard-000099.tar").unlink()
    assert main(["shards", str(data), "--verify"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 9
    # a tampered manifest is refused too
    manifest = data / "dataset.json"
    text = manifest.read_text()
    m = json.loads(text)
    m["files"][1]["sha256"] = "0" * 64
    manifest.write_text(json.dumps(m))
    assert "shard-000001.tar: sha256 differs" in refused()
    m = json.loads(text)
    m["files"][0]["name"] = "../elsewhere.tar"
    manifest.write_text(json.dumps(m))
    assert "must name .tar files inside" in refused()
    manifest.write_text(text[: len(text) // 2])  # torn
    assert "unreadable manifest" in refused()
    manifest.write_text(text)
    assert main(["shards", str(data), "--verify"]) == 0


def test_shards_size_only_mode_and_missing_folder_hint(tmp_path, monkeypatch) -> None:
    np.savez(tmp_path / "x.npz", images=np.zeros((4, 8, 8, 1), np.uint8))
    S.write_shards(tmp_path / "x.npz", tmp_path / "o")
    f = tmp_path / "o" / "shard-000000.tar"
    b = bytearray(f.read_bytes())
    b[600] ^= 1
    f.write_bytes(bytes(b))
    monkeypatch.setenv("VDMPP_VERIFY_SHARDS", "0")  # sizes only: the flip goes unnoticed
    probe(expand_source(str(tmp_path / "o")), 8, 1, None)
    monkeypatch.setenv("VDMPP_VERIFY_SHARDS", "1")
    with pytest.raises(ConfigError, match="sha256"):
        probe(expand_source(str(tmp_path / "o")), 8, 1, None)
    with pytest.raises(ConfigError, match=r"vdmpp-train shards SRC .*nowhere --resolution 8"):
        expand_source(str(tmp_path / "nowhere"), resolution=8)


def test_shards_training_on_cifar_and_npz_shards(small, tmp_path, capsys) -> None:
    """CIFAR-10-style tarball and .npz → shards at 8×8 → 2 training steps each; the manifest's
    classes/channels are checked against the config before the first step."""
    rng = np.random.default_rng(9)
    members = {
        f"cifar-10-batches-py/{k}": {
            b"data": _cifar_rows(rng, 4),
            b"labels": [int(v) for v in rng.integers(0, 10, 4)],
        }
        for k in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    }
    members["cifar-10-batches-py/batches.meta"] = {b"label_names": [b"n"] * 10}
    _cifar_tar(tmp_path / "c.tar.gz", members, protocol="py2")
    np.savez(
        tmp_path / "g.npz",
        x=rng.integers(0, 256, (12, 1, 10, 10), dtype=np.uint8),
        y=np.arange(12) % 10,
    )
    for src, ch in (("c.tar.gz", 3), ("g.npz", 1)):
        data = tmp_path / f"shards-{src}"
        assert (
            main(
                [
                    "shards",
                    str(tmp_path / src),
                    str(data),
                    "--resolution",
                    "8",
                    "--shard-size",
                    "8",
                    "--workers",
                    "1",
                    "--no-progress",
                ]
            )
            == 0
        )
        cfg = [
            *small,
            f"data.source={data}",
            f"data.channels={ch}",
            "data.num_classes=10",
            "data.shuffle_buffer=4",
            "steps=2",
        ]
        assert main(["digits", *_sets(*cfg, f"out={tmp_path / f'run-{src}'}")]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 2
        rc = main(["digits", *_sets(*cfg, f"data.channels={4 - ch}", f"out={tmp_path / 'x'}")])
        assert rc == 2 and f"holds {ch}-channel images" in capsys.readouterr().err
