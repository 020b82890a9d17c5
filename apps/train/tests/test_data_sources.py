"""The parts of ``vdmpp.train.data`` on their own: each source's record iterator, the one
``.npz`` reader and its refusals, the transforms, and the writer putting exactly the records
into the shards (key k = the k-th item of the seeded shuffle)."""

from __future__ import annotations

import io
import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from vdmpp.train.config import ConfigError
from vdmpp.train.data import decode_sample, write_shards
from vdmpp.train.data import sources as Src
from vdmpp.train.data import transform as T


def _save(path: Path, img: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _rgb(rng, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _written(out: Path) -> dict[int, tuple[np.ndarray, int | None]]:
    """{key: (uint8 [H, W, C], label)} of every sample in the shards under ``out``, as the
    training stream decodes them."""
    meta = json.loads((out / "dataset.json").read_text())
    res, ch, ncls = meta["resolution"], meta["channels"], meta["num_classes"]
    got = {}
    for e in meta["files"]:
        for sample in wds.tarfile_samples([{"url": str(out / e["name"])}]):
            chw, label = decode_sample(sample, res, ch, ncls)
            got[int(sample["__key__"])] = (chw.transpose(1, 2, 0), None if ncls is None else label)
    assert len(got) == meta["count"]
    return got


def _expect(source: Src.Source, seed: int, resolution: int, channels: int, forced: bool):
    """What the writer must write for ``source``: {key: (image, label)} of the usable records."""
    order = list(range(len(source)))
    random.Random(seed).shuffle(order)
    recs = source.subset(order).records(channels, forced)
    return {
        k: (T.fit_array(r.image, resolution), r.label)
        for k, r in enumerate(recs)
        if r.image is not None
    }


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (a[k][0] == b[k][0]).all() and a[k][1] == b[k][1] for k in a
    )


# --- .npz: the one reader ----------------------------------------------------------------------
def test_npz_layouts_and_value_ranges(tmp_path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    np.savez(tmp_path / "nchw.npz", x=x.transpose(0, 3, 1, 2), y=(np.arange(5) % 2)[:, None])
    images, labels = Src.load_npz(tmp_path / "nchw.npz")
    assert images.dtype == np.uint8 and (images == x).all()
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 0, 1, 0]  # [N, 1] → [N]
    f = rng.random((2, 4, 4, 1)).astype(np.float32)
    np.savez(tmp_path / "pm1.npz", images=f * 2 - 1)
    np.savez(tmp_path / "01.npz", images=f)
    want = np.round(f * 255).astype(np.uint8)
    for name in ("pm1.npz", "01.npz"):
        got, lab = Src.load_npz(tmp_path / name)
        assert lab is None and np.abs(got.astype(int) - want).max() <= 1
    np.savez(tmp_path / "grey.npz", arr_0=x[..., 0], arr_1=np.arange(5))
    got, lab = Src.load_npz(tmp_path / "grey.npz")
    assert got.shape == (5, 6, 7, 1) and lab.tolist() == list(range(5))
    s = Src.open_source(tmp_path / "grey.npz")
    assert (s.kind, s.classes, s.split, len(s)) == ("npz", [str(i) for i in range(5)], None, 5)
    assert [r.label for r in s.records()] == list(range(5))
    assert all((r.image == x[i, ..., :1]).all() for i, r in enumerate(s.records()))
    # channels on request: grey replicated, colour → luma (PIL's L)
    rgb = next(Src.open_source(tmp_path / "nchw.npz").records(1)).image
    assert (
        rgb.shape == (6, 7, 1)
        and (rgb[..., 0] == np.asarray(Image.fromarray(x[0]).convert("L"))).all()
    )
    assert (next(s.records(3)).image == np.repeat(x[0, ..., :1], 3, axis=2)).all()


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"other": np.zeros(3)}, r"no 'images' \(or 'x', 'arr_0'\) array; has \['other'\]"),
        ({"images": np.array([{"a": 1}], dtype=object)}, "pickled object arrays are refused"),
        ({"images": np.zeros((2, 4, 4, 5), np.uint8)}, "need 1 or 3 channels"),
        ({"images": np.zeros((2, 1, 4, 4, 3), np.uint8)}, r"must be \[N, H, W, C\]"),
        ({"images": np.zeros((2, 4, 4), bool)}, "images must be numbers"),
        ({"images": np.zeros((2, 4, 4)), "labels": np.zeros(2)}, "labels integers"),
        ({"images": np.zeros((2, 4, 4)), "labels": np.array([0, -1])}, "2 integers >= 0"),
        ({"images": np.zeros((2, 4, 4)), "labels": np.arange(3)}, "2 integers >= 0"),
    ],
)
def test_npz_refusals_are_one_line(tmp_path, arrays, message) -> None:
    p = tmp_path / "d.npz"
    np.savez(p, **arrays)
    with pytest.raises(ConfigError, match=message) as e:
        Src.load_npz(p)
    assert "\n" not in str(e.value) and str(p) in str(e.value)


def test_npz_torn_or_not_an_archive(tmp_path) -> None:
    np.savez(tmp_path / "d.npz", images=np.zeros((4, 8, 8, 1), np.uint8))
    data = (tmp_path / "d.npz").read_bytes()
    (tmp_path / "torn.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all\n" * 4)
    for name in ("torn.npz", "junk.npz"):
        with pytest.raises(ConfigError, match=r"not a readable \.npz") as e:
            Src.load_npz(tmp_path / name)
        assert "\n" not in str(e.value)


# --- digits, CIFAR -------------------------------------------------------------------------------
def test_digits_records_are_digits_images() -> None:
    images, labels = Src.digits_images(12, "test")
    s = Src.open_source("digits:test", resolution=12)
    assert (s.kind, s.split, s.classes, len(s)) == (
        "digits",
        "test",
        [str(i) for i in range(10)],
        360,
    )
    recs = list(s.records())
    assert all((r.image == images[i]).all() and r.label == labels[i] for i, r in enumerate(recs))
    assert Src.open_source("digits", split="all").peek() == (16, 1)


def _cifar_folder(root: Path, rng, hostile: bool = False) -> np.ndarray:
    rows = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    root.mkdir(parents=True)
    for k in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {b"data": rows, b"labels": [2, 0, 1]}
        if hostile and k == "test_batch":
            batch[b"x"] = print  # a global the reader must refuse
        (root / k).write_bytes(pickle.dumps(batch, protocol=2))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a", b"b", b"c"]}))
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def test_cifar_folder_records(tmp_path) -> None:
    want = _cifar_folder(tmp_path / "cifar-10-batches-py", np.random.default_rng(1))
    s = Src.open_source(tmp_path, split="test")  # the folder above the batches
    assert (s.kind, s.split, s.classes, len(s)) == ("cifar10", "test", ["a", "b", "c"], 3)
    recs = list(s.records())
    assert [r.label for r in recs] == [2, 0, 1]
    assert all((r.image == want[i]).all() for i, r in enumerate(recs))
    assert len(Src.open_source(tmp_path)) == 15  # train: five batches
    _cifar_folder(tmp_path / "evil" / "cifar-10-batches-py", np.random.default_rng(2), True)
    with pytest.raises(
        ConfigError, match=r"test_batch: .*refused to load global __builtin__\.print"
    ):
        Src.open_source(tmp_path / "evil", split="test")


# --- image folders ------------------------------------------------------------------------------
def _tree(root: Path, rng) -> dict[str, np.ndarray]:
    made = {"a/rgb.png": _rgb(rng, 9, 11), "b/grey.png": rng.integers(0, 256, (8, 8), np.uint8)}
    _save(root / "a" / "rgb.png", Image.fromarray(made["a/rgb.png"]))
    _save(root / "b" / "grey.png", Image.fromarray(made["b/grey.png"]))
    pal = Image.fromarray(_rgb(rng, 10, 10)).quantize(8)
    _save(root / "b" / "pal.png", pal)
    made["b/pal.png"] = np.asarray(pal.convert("RGB"))
    _save(root / "a" / "w16.png", Image.fromarray(np.full((8, 8), 40000, np.uint16)))
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return made


def test_folder_records_channels_and_skips(tmp_path) -> None:
    made = _tree(tmp_path / "t", np.random.default_rng(3))
    s = Src.open_source(tmp_path / "t")
    assert (s.kind, s.classes) == ("class-folders", ["a", "b"])
    names = [Path(f).relative_to(tmp_path / "t").as_posix() for f in s.files]
    assert names == ["a/broken.png", "a/rgb.png", "a/w16.png", "b/grey.png", "b/pal.png"]
    assert s.peek() == (9, 3)  # the first readable image (sorted order): a/rgb.png, 9×11
    native = {Path(r.name).relative_to(tmp_path / "t").as_posix(): r for r in s.records()}
    assert "not a readable image" in native["a/broken.png"].why
    assert native["a/w16.png"].image is None and "wrong mode I;16" in native["a/w16.png"].why
    assert (native["a/rgb.png"].image == made["a/rgb.png"]).all()
    assert native["b/grey.png"].image.shape == (8, 8, 1)  # its own channels
    assert (native["b/pal.png"].image == made["b/pal.png"]).all()
    assert [r.label for r in native.values()] == [0, 0, 0, 1, 1]
    colour = list(s.records(3))
    assert (colour[3].image == np.repeat(made["b/grey.png"][..., None], 3, axis=2)).all()
    grey = list(s.records(1))  # colour in a grey set: skipped unless forced
    assert grey[1].image is None and "a colour image in a 1-channel set" in grey[1].why
    forced = list(s.records(1, forced=True))
    assert (
        forced[1].image[..., 0] == np.asarray(Image.fromarray(made["a/rgb.png"]).convert("L"))
    ).all()
    assert s.first_failures() == [
        (s.files[0], native["a/broken.png"].why),
        (s.files[2], native["a/w16.png"].why),
    ]
    flat = Src.open_source(tmp_path / "t", labels="none")
    assert flat.kind == "folder" and flat.classes is None and set(flat.labels) == {None}


def test_subsets_pickle_and_keep_their_order(tmp_path) -> None:
    _tree(tmp_path / "t", np.random.default_rng(4))
    np.savez(tmp_path / "x.npz", images=np.arange(4 * 2 * 2).reshape(4, 2, 2, 1).astype(np.uint8))
    for s in (Src.open_source(tmp_path / "t"), Src.open_source(tmp_path / "x.npz")):
        sub = pickle.loads(pickle.dumps(s.subset([3, 1])))
        full = list(s.records(3, True))
        for got, want in zip(sub.records(3, True), [full[3], full[1]]):
            assert got.name == want.name or got.image is not None
            assert (got.image is None) == (want.image is None) and got.label == want.label
            if got.image is not None:
                assert (got.image == want.image).all()


def test_open_source_refusals(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no such file or folder"):
        Src.open_source(tmp_path / "nowhere")
    (tmp_path / "d").mkdir()
    with pytest.raises(ConfigError, match="--split applies to CIFAR tarballs and 'digits'"):
        Src.open_source(tmp_path / "d", split="test")
    with pytest.raises(ConfigError, match="no images found"):
        Src.open_source(tmp_path / "d")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ConfigError, match="is not a folder, a CIFAR python tarball"):
        Src.open_source(tmp_path / "f.txt")


# --- transforms --------------------------------------------------------------------------------
def test_transform_centre_crop_resize_and_png() -> None:
    rng = np.random.default_rng(5)
    tall = _rgb(rng, 12, 10)
    want = np.asarray(Image.fromarray(tall[1:11]).resize((6, 6), Image.Resampling.LANCZOS))
    assert (T.fit_array(tall, 6) == want).all()
    sq = tall[:6, :6]
    assert T.fit_array(sq, 6) is sq  # already the size: untouched
    g = rng.integers(0, 256, (4, 4, 1), dtype=np.uint8)
    assert T.to_channels(g, 1) is g and (T.to_channels(g, 3) == np.repeat(g, 3, axis=2)).all()
    assert T.png_bytes(tall) == T.png_bytes(tall.copy())
    with Image.open(io.BytesIO(T.png_bytes(g))) as im:
        assert im.mode == "L" and (np.asarray(im) == g[..., 0]).all()
    with pytest.raises(T.Skip, match="wrong mode F"):
        T.convert_mode(Image.new("F", (2, 2)), 3, False)
    assert T.mode_channels("LA") == 1 and T.mode_channels("CMYK") == 3
    assert T.mode_channels("I;16") is None


# --- the writer writes exactly the records ----------------------------------------------------
@pytest.mark.parametrize("kind", ["folder", "npz", "digits", "cifar"])
def test_writer_writes_the_records_under_their_shuffled_keys(tmp_path, kind) -> None:
    rng = np.random.default_rng(6)
    if kind == "folder":
        _tree(tmp_path / "src", rng)
        src, kw = tmp_path / "src", {"resolution": 6}
    elif kind == "npz":
        np.savez(
            tmp_path / "x.npz",
            x=rng.integers(0, 256, (7, 3, 9, 8), dtype=np.uint8),
            y=np.arange(7) % 3,
        )
        src, kw = tmp_path / "x.npz", {"channels": 1}
    elif kind == "digits":
        src, kw = "digits:test", {"resolution": 8}
    else:
        _cifar_folder(tmp_path / "c" / "cifar-10-batches-py", rng)
        src, kw = tmp_path / "c", {"resolution": 8, "split": "test"}
    meta = write_shards(src, tmp_path / "out", maxcount=3, seed=5, **kw)
    source = Src.open_source(src, kw.get("split"), "auto", kw.get("resolution"))
    res, ch = meta["resolution"], meta["channels"]
    want = _expect(source, 5, res, ch, "channels" in kw)
    assert _same(_written(tmp_path / "out"), want) and meta["count"] == len(want)
    assert meta["source"]["kind"] == source.kind and meta["classes"] == source.classes
