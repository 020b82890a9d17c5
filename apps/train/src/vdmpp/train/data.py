"""WebDataset shards: writing them (image folder, .npz, digits) and streaming them for training.

A shard is a tar of samples ``<key>.png`` (8-bit L or RGB) + ``<key>.cls`` (the class index as
text); nothing is pickled, and reading decodes only PNG and integers.

Streams. The global batch of a step is cut into ``slots`` micro-batches (world size ×
gradient-accumulation steps); slot k has its own data stream (and its own noise, see
``trainer``), so a run's numbers depend on the global batch and micro-batch size, not on how the
slots are spread over processes: 2 ranks × 1 micro-batch equals 1 rank × 2 accumulated ones.
Within a slot, the shard list is split by slot and then by DataLoader worker (when there are
enough shards), shards are drawn with replacement (resampled, an endless stream), samples pass a
shuffle buffer, and every random choice comes from a ``random.Random`` seeded by
(seed, slot, worker, segment). Undecodable samples are skipped and counted.

Position. Each batch carries how many shuffled samples its worker has consumed; restarting the
stream with ``skip`` set to that count replays it exactly (without decoding the skipped images).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .config import ConfigError

__all__ = [
    "ShardStream",
    "StreamSpec",
    "StreamStarved",
    "digits_images",
    "expand_source",
    "make_loader",
    "probe",
    "shutdown_loader",
    "write_shards",
]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts, the same in every process and Python run."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# --- sources -------------------------------------------------------------------------------------
DIGITS_SPLITS = ("train", "test", "all")


def digits_images(resolution: int = 16, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (1797 8×8 images, 10 classes) as uint8 [N, res, res, 1].

    Pixel values 0..16 are scaled to 0..255, upscaled by the largest integer factor that fits
    (nearest neighbour, so strokes stay crisp) and zero-padded to the centre.

    The split (the one definition every vdmpp app uses): every 5th image (i % 5 == 0, 360
    images) is ``test``, the other 1437 are ``train``; training uses ``train`` so that
    vdmpp-eval's bits/dim and metrics on ``test`` are held out.
    """
    from sklearn.datasets import load_digits

    if resolution < 8:
        raise ConfigError(f"digits need a resolution >= 8, got {resolution}")
    if split not in DIGITS_SPLITS:
        raise ConfigError(f"digits split must be one of {DIGITS_SPLITS}, got {split!r}")
    d = load_digits()
    if split != "all":
        keep = (np.arange(len(d.target)) % 5 == 0) == (split == "test")
        d.images, d.target = d.images[keep], d.target[keep]
    img = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    f = resolution // 8
    img = img.repeat(f, axis=1).repeat(f, axis=2)
    pad = resolution - 8 * f
    lo = pad // 2
    img = np.pad(img, ((0, 0), (lo, pad - lo), (lo, pad - lo)))
    return img[..., None], d.target.astype(np.int64)


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            ik = next((k for k in ("images", "x", "arr_0") if k in keys), None)
            if ik is None:
                raise ConfigError(
                    f"{path}: no 'images' (or 'x', 'arr_0') array; has {sorted(keys)}"
                )
            images = z[ik]
            lk = next((k for k in ("labels", "y", "arr_1") if k in keys), None)
            labels = z[lk] if lk else None
    except ConfigError:
        raise
    except Exception as e:  # object arrays (pickles, refused), torn zips, not an npz at all
        raise ConfigError(f"{path}: not a readable .npz of numeric arrays (pickled object "
                          f"arrays are refused): {str(e).splitlines()[0][:200]}") from None
    if images.dtype.kind not in "uif" or (labels is not None and labels.dtype.kind not in "ui"):
        raise ConfigError(f"{path}: images must be numbers and labels integers, got "
                          f"{images.dtype} / {None if labels is None else labels.dtype}")
    if labels is not None:
        labels = labels.astype(np.int64)
        if labels.ndim != 1 or len(labels) != len(images) or (len(labels) and labels.min() < 0):
            raise ConfigError(f"{path}: labels must be {len(images)} integers >= 0, got "
                              f"shape {labels.shape}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ConfigError(f"{path}: images must be [N, H, W, C] or [N, C, H, W]: {images.shape}")
    if images.shape[-1] not in (1, 3) and images.shape[1] in (1, 3):
        images = images.transpose(0, 2, 3, 1)
    if images.dtype != np.uint8:
        if images.min() >= -1.0 and images.max() <= 1.0 and images.min() < 0:
            images = (images + 1.0) * 127.5  # [-1, 1] floats
        elif images.max() <= 1.0:
            images = images * 255.0
        images = np.round(images).clip(0, 255).astype(np.uint8)
    return images, labels


def _folder_items(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ConfigError(f"{root}: expected one sub-folder per class, found none")
    items = [
        (f, i)
        for i, c in enumerate(classes)
        for f in sorted((root / c).rglob("*"))
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not items:
        raise ConfigError(f"{root}: no images found in the class sub-folders")
    return items, classes


def _resize(img: Image.Image, resolution: int | None) -> Image.Image:
    if resolution is None or img.size == (resolution, resolution):
        return img
    w, h = img.size  # centre crop to a square, then resize (ADM's preprocessing, simplified)
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return img.resize((resolution, resolution), Image.Resampling.BICUBIC)


def _png(arr: np.ndarray) -> bytes:
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_shards(
    src: str | Path,
    out: str | Path,
    *,
    maxcount: int = 1000,
    resolution: int | None = None,
    seed: int = 0,
    verbose: bool = False,
) -> dict[str, Any]:
    """Write shuffled WebDataset shards ``OUT/shard-NNNNNN.tar`` and ``OUT/dataset.json``.

    ``src``: ``"digits"`` (built in; its ``train`` split, or ``digits:test`` / ``digits:all``),
    an ``.npz`` (``images`` uint8 [N, H, W, C] or [N, C, H, W], optional ``labels``), or a
    folder with one sub-folder per class. ``resolution`` resizes
    (centre crop + bicubic) folder and npz images, and sets the digits' padded size (default 16).
    """
    if maxcount < 1:
        raise ConfigError(f"maxcount must be >= 1, got {maxcount}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    classes: list[str] | None
    name, _, split = str(src).partition(":")
    if name == "digits" and not Path(str(src)).exists():
        images, labels = digits_images(resolution or 16, split or "train")
        classes = [str(i) for i in range(10)]
        order = list(range(len(images)))
        rng.shuffle(order)
        items = ((images[i], int(labels[i])) for i in order)
        count = len(order)
    else:
        path = Path(src)
        if path.suffix == ".npz" and path.is_file():
            images, labels_opt = _load_npz(path)
            classes = None if labels_opt is None else [str(i) for i in range(labels_opt.max() + 1)]
            order = list(range(len(images)))
            rng.shuffle(order)

            def gen() -> Iterator[tuple[np.ndarray, int | None]]:
                for i in order:
                    arr = images[i]
                    if resolution is not None:
                        img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
                        arr = np.asarray(_resize(img, resolution))
                        arr = arr[..., None] if arr.ndim == 2 else arr
                    yield arr, None if labels_opt is None else int(labels_opt[i])

            items = gen()
            count = len(order)
        elif path.is_dir():
            files, classes = _folder_items(path)
            rng.shuffle(files)

            def gen() -> Iterator[tuple[np.ndarray, int | None]]:
                for f, label in files:
                    try:
                        with Image.open(f) as im:
                            im = _resize(im.convert("L" if im.mode == "L" else "RGB"), resolution)
                            arr = np.asarray(im)
                    except (OSError, ValueError, Image.DecompressionBombError) as e:
                        raise ConfigError(f"shards: {f}: not a readable image ({e}); remove "
                                          "or replace it") from None
                    yield (arr[..., None] if arr.ndim == 2 else arr), label

            items = gen()
            count = len(files)
        else:
            raise ConfigError(f"shards: {src!r} is not 'digits', an .npz file or a folder")
    sizes: set[tuple[int, ...]] = set()
    pattern = str(out / "shard-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=int(verbose)) as sink:
        for i, (arr, label) in enumerate(items):
            sizes.add(arr.shape)
            sample = {"__key__": f"{i:09d}", "png": _png(arr)}
            if label is not None:
                sample["cls"] = str(label)
            sink.write(sample)
        nshards = sink.shard
    (h, w, c), *_ = sorted(sizes) if sizes else [(0, 0, 0)]
    meta = {
        "count": count,
        "shards": nshards,
        "pattern": f"shard-{{000000..{nshards - 1:06d}}}.tar",
        "classes": classes,
        "num_classes": None if classes is None else len(classes),
        "resolution": h if len(sizes) == 1 and h == w else None,
        "channels": c,
        "seed": seed,
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# --- reading -------------------------------------------------------------------------------------
def expand_source(source: str) -> list[str]:
    """Shard paths from a directory (``*.tar`` inside) or a brace pattern ``a-{000..009}.tar``."""
    path = Path(source)
    if path.is_dir():
        urls = sorted(str(p) for p in path.glob("*.tar"))
    else:
        urls = list(wds.shardlists.expand_urls(source))
        missing = [u for u in urls if "://" not in u and not Path(u).exists()]
        if missing:
            raise ConfigError(f"data.source: {len(missing)} shard(s) missing, e.g. {missing[0]}")
    if not urls:
        raise ConfigError(f"data.source = {source!r}: no .tar shards found")
    return urls


def decode_sample(
    sample: dict[str, Any], resolution: int, channels: int, num_classes: int | None
) -> tuple[np.ndarray, int]:
    """(uint8 [C, H, W], label) from a raw sample; raises on anything unexpected."""
    data = sample.get("png")
    if data is None:
        raise ValueError(f"sample {sample.get('__key__')!r} has no .png member")
    with Image.open(io.BytesIO(data)) as im:
        if im.format != "PNG":
            raise ValueError(f"not a PNG ({im.format})")
        if im.size != (resolution, resolution):
            raise ValueError(f"image is {im.size[0]}×{im.size[1]}, expected {resolution}²")
        arr = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    label = -1
    if num_classes is not None:
        raw = sample.get("cls")
        if raw is None:
            raise ValueError("no .cls member")
        label = int(raw.decode("ascii").strip())
        if not 0 <= label < num_classes:
            raise ValueError(f"label {label} outside [0, {num_classes})")
    return np.ascontiguousarray(arr), label


def probe(urls: list[str], resolution: int, channels: int, num_classes: int | None) -> None:
    """Decode the first good sample of the first shard; raise ConfigError on a size mismatch."""
    for url in urls[:3]:
        for sample in wds.tarfile_samples([{"url": url}], handler=wds.ignore_and_continue):
            try:
                with Image.open(io.BytesIO(sample["png"])) as im:
                    size = im.size
            except Exception:
                continue
            if size != (resolution, resolution):
                raise ConfigError(
                    f"data.resolution = {resolution} but {url} holds {size[0]}×{size[1]} images "
                    f"(rewrite the shards with `vdmpp-train shards SRC OUT --resolution "
                    f"{resolution}` or set data.resolution = {size[0]})"
                )
            if num_classes is not None and "cls" not in sample:
                raise ConfigError(
                    f"data.num_classes = {num_classes} but {url} has no .cls labels "
                    "(set data.num_classes = \"none\" for unconditional training)"
                )
            return
    raise ConfigError(f"data.source: no decodable PNG sample in {urls[:3]}")


class StreamStarved(RuntimeError):
    """No shard of a stream can ever give a usable sample: the batch can never be filled."""


class _Starvation:
    """Notices when a stream can never fill a batch (instead of spinning on it forever).

    A shard is hopeless once it has been read to its end and it held no sample, or every one of
    its samples failed to decode (corrupt, wrong size, label outside ``num_classes``). A shard
    that gave one good sample is fine for ever. When every shard of the stream is hopeless,
    :class:`StreamStarved` names the slot, the shards and the first reason of each.
    """

    def __init__(self, urls: list[str], where: str) -> None:
        self.urls, self.where = set(urls), where
        self.size: dict[str, int] = {}
        self.failed: dict[str, set[str]] = {}
        self.why: dict[str, str] = {}
        self.fine: set[str] = set()
        self.hopeless: set[str] = set()

    def reason(self, url: str, why: str) -> None:
        self.why.setdefault(url, why)

    def read(self, url: str, keys: set[str]) -> None:
        if url not in self.size:
            self.size[url] = len(keys)
            if not keys:
                self.reason(url, "no samples (empty or unreadable tar)")
            self._check(url)

    def bad(self, url: str, key: str, exc: BaseException) -> None:
        if url in self.fine:
            return
        self.failed.setdefault(url, set()).add(key)
        self.reason(url, f"{exc}")
        self._check(url)

    def good(self, url: str) -> None:
        if url not in self.fine:
            self.fine.add(url)
            self.failed.pop(url, None)

    def _check(self, url: str) -> None:
        n = self.size.get(url)
        if url in self.fine or n is None or len(self.failed.get(url, ())) < n:
            return
        self.hopeless.add(url)
        if self.hopeless >= self.urls:
            shown = sorted(self.urls)[:4]
            more = f" (+{len(self.urls) - len(shown)} more)" if len(self.urls) > len(shown) else ""
            raise StreamStarved(
                f"data stream of {self.where} can never fill a batch: none of its "
                f"{len(self.urls)} shard(s) holds a usable sample: "
                + "; ".join(f"{u}: {self.why.get(u, 'no usable sample')}" for u in shown)
                + more
            )


@dataclass
class StreamSpec:
    urls: list[str]
    slot: int
    num_slots: int
    batch_size: int
    resolution: int
    channels: int
    num_classes: int | None
    seed: int
    segment: int = 0  # 0 for a fresh or replayed stream; the resume step for "reseed"
    flip: bool = False
    shuffle_buffer: int = 1000
    skip: dict[int, int] = field(default_factory=dict)  # worker → samples to replay silently
    role_offset: int = 0  # worker j plays stream (j + role_offset) % workers (exact replay)


class ShardStream(IterableDataset):
    """An endless stream of micro-batches for one slot (see module docstring)."""

    def __init__(self, spec: StreamSpec) -> None:
        super().__init__()
        self.spec = spec

    def _urls(self, worker: int, workers: int) -> list[str]:
        s = self.spec
        urls = s.urls[s.slot :: s.num_slots] if len(s.urls) >= s.num_slots else s.urls
        return urls[worker::workers] if len(urls) >= workers else urls

    def __iter__(self) -> Iterator[dict[str, Any]]:
        s = self.spec
        info = get_worker_info()
        nw = info.num_workers if info is not None else 1
        wid = ((info.id if info is not None else 0) + s.role_offset) % nw
        urls = self._urls(wid, nw)
        rng = random.Random(stable_seed("stream", s.seed, s.slot, wid, s.segment))
        errors = [0]
        starve = _Starvation(urls, f"slot {s.slot}" + (f", worker {wid}" if nw > 1 else ""))
        current = [""]

        def handler(exc: BaseException) -> bool:
            errors[0] += 1
            starve.reason(current[0], f"{type(exc).__name__}: {exc}")
            return True

        def raw() -> Iterator[dict[str, Any]]:
            while True:
                url = current[0] = rng.choice(urls)
                keys: set[str] = set()
                for sample in wds.tarfile_samples([{"url": url}], handler=handler):
                    keys.add(str(sample.get("__key__")))
                    yield sample
                starve.read(url, keys)

        def shuffled() -> Iterator[dict[str, Any]]:
            buf: list[dict[str, Any]] = []
            for sample in raw():
                if len(buf) < s.shuffle_buffer:
                    buf.append(sample)
                    if len(buf) < min(s.shuffle_buffer, 64):
                        continue
                k = rng.randrange(len(buf))
                buf[k], sample = sample, buf[k]
                yield sample

        skip = s.skip.get(wid, 0)
        try:
            yield from self._batches(shuffled(), rng, skip, starve, wid, errors)
        except StreamStarved as e:  # the trainer stops every rank with this message
            yield {"error": str(e)}

    def _batches(self, samples: Iterator[dict[str, Any]], rng: random.Random, skip: int,
                 starve: _Starvation, wid: int, errors: list[int]) -> Iterator[dict[str, Any]]:
        s = self.spec
        pos, corrupt = 0, 0
        images: list[np.ndarray] = []
        labels: list[int] = []
        for sample in samples:
            pos += 1
            flip = rng.random() < 0.5
            if pos <= skip:
                continue
            try:
                arr, label = decode_sample(sample, s.resolution, s.channels, s.num_classes)
            except Exception as e:
                corrupt += 1
                starve.bad(str(sample.get("__url__")), str(sample.get("__key__")), e)
                continue
            starve.good(str(sample.get("__url__")))
            if s.flip and flip:
                arr = arr[:, :, ::-1]
            images.append(arr)
            labels.append(label)
            if len(images) == s.batch_size:
                yield {
                    "image": torch.from_numpy(np.stack(images)),
                    "label": torch.tensor(labels, dtype=torch.long),
                    "worker": wid,
                    "pos": pos,
                    "corrupt": corrupt + errors[0],
                }
                images, labels = [], []


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: SIGINT/SIGTERM are the trainer's to handle, not a worker's.

    torchrun, SLURM and a terminal's Ctrl-C signal the whole process group. A worker that died
    of it would make the trainer raise ("DataLoader worker ... killed by signal") instead of
    checkpointing; ignoring them, the worker lives until the trainer shuts it down
    (:func:`shutdown_loader`) or exits (the DataLoader's watchdog ends orphaned workers).
    """
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


def make_loader(spec: StreamSpec, workers: int) -> Iterator[dict[str, Any]]:
    """An iterator of micro-batches for one slot (a DataLoader when ``workers`` > 0).

    With workers, call it with SIGINT/SIGTERM ignored (the trainer does) so that the forked
    workers never see a stop signal even before ``worker_init_fn`` runs.
    """
    stream = ShardStream(spec)
    if workers == 0:
        return iter(stream)
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        persistent_workers=True,
        prefetch_factor=4,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=ignore_stop_signals,
    )
    return iter(loader)


def shutdown_loader(it: Iterator[Any], timeout: float = 10.0) -> None:
    """Stop a loader's workers now: the DataLoader's own shutdown, then SIGKILL any straggler.

    Workers ignore SIGTERM (:func:`ignore_stop_signals`), so ``Process.terminate`` would not
    end one that hangs; multiprocessing's exit handler would then wait for it forever.
    """
    workers = list(getattr(it, "_workers", []) or [])
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        with contextlib.suppress(Exception):  # best effort: the stragglers are killed below
            shutdown()
    for w in workers:
        w.join(timeout=0 if not w.is_alive() else timeout)
        if w.is_alive():
            w.kill()
            w.join(timeout=timeout)
