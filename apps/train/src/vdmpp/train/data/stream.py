"""WebDataset shards: streaming them for training (:mod:`.writer` writes them and their manifest).

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

from ..errors import ConfigError
from .manifest import shards_command, validate_manifests
from .sources import SRC_KINDS

__all__ = [
    "ShardStream",
    "StreamSpec",
    "StreamStarved",
    "decode_sample",
    "expand_source",
    "ignore_stop_signals",
    "make_loader",
    "probe",
    "shutdown_loader",
    "stable_seed",
]


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts, the same in every process and Python run."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# --- reading -------------------------------------------------------------------------------------
def expand_source(source: str, resolution: int | None = None) -> list[str]:
    """Shard paths from a directory (``*.tar`` inside) or a brace pattern ``a-{000..009}.tar``.

    A missing or empty source is a :class:`ConfigError` that says how to write shards (with
    ``resolution``, the exact ``vdmpp-train shards`` command).
    """
    path = Path(source)
    how = (
        f" — write shards first: {shards_command(source, resolution)} ({SRC_KINDS})"
        if resolution is not None
        else ""
    )
    if path.is_dir():
        urls = sorted(str(p) for p in path.glob("*.tar"))
    elif not path.exists() and "{" not in source and "://" not in source:
        raise ConfigError(f"data.source = {source!r}: no such shard directory{how}")
    else:
        urls = list(wds.shardlists.expand_urls(source))
        missing = [u for u in urls if "://" not in u and not Path(u).exists()]
        if missing:
            raise ConfigError(
                f"data.source: {len(missing)} shard(s) missing, e.g. {missing[0]}{how}"
            )
    if not urls:
        raise ConfigError(f"data.source = {source!r}: no .tar shards found{how}")
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
    """Validate the manifests (:func:`validate_manifests`), then decode the first good sample of
    the first shards; raise ConfigError on a size mismatch."""
    validate_manifests(urls, resolution, channels, num_classes)
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
                    '(set data.num_classes = "none" for unconditional training)'
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

    def _batches(
        self,
        samples: Iterator[dict[str, Any]],
        rng: random.Random,
        skip: int,
        starve: _Starvation,
        wid: int,
        errors: list[int],
    ) -> Iterator[dict[str, Any]]:
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
