"""``vdmpp-train shards``: a data set (:mod:`.sources`) → WebDataset shards + manifest, in the
manner of EDM's ``dataset_tool.py`` (Karras et al. 2022), tar shards instead of a zip.

Deterministic for a given (source, seed, shard size, resolution, channels) whatever the number
of worker processes: the items are shuffled with ``random.Random(seed)``, cut into parts of
``shard_size``, and each part is written by one worker as a tar with fixed headers
(``<key>.png`` + ``<key>.cls``, key = position in the shuffled order). Parts are written to
hidden names and renamed at the end; ``dataset.json`` (:mod:`.manifest`) is written last. An
interrupted run leaves a ``.incomplete`` marker and no manifest; rerunning it starts over.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import os
import random
import re
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..fileio import atomic_open, fsync_dir, write_atomic, write_json_atomic
from ..log import Progress
from .manifest import (
    INCOMPLETE,
    LABELS,
    MANIFEST,
    SHARD_RE,
    make_manifest,
    mp_context,
    sha256_file,
    write_labels,
    write_skipped,
)
from .sources import Source, open_source
from .transform import fit_array, png_bytes

__all__ = ["PROGRESS_EVERY_S", "default_workers", "write_shards"]

PROGRESS_EVERY_S = 10.0  # without a terminal: a plain progress line at most this often
_PART_RE = re.compile(r"\.\.?part-\d{6}\.tar(\.\d+)?(\.tmp)?")  # parts and their temp files


@dataclass
class _Part:
    """One shard's work: written by one worker process (picklable, spawn-safe)."""

    index: int
    keys: list[int]
    path: str
    resolution: int
    channels: int
    forced: bool
    source: Source


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _write_part(part: _Part) -> dict[str, Any]:
    """Decode, crop/resize and PNG-encode one part, write it as a tar; its count/size/sha256."""
    skipped: list[tuple[str, str]] = []
    count = 0
    class_counts: dict[int, int] = {}
    records = part.source.records(part.channels, part.forced)
    with (
        atomic_open(part.path, "wb") as f,
        tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for key, rec in zip(part.keys, records):
            if rec.image is None:
                skipped.append((rec.name, rec.why))
                continue
            _add(tar, f"{key:09d}.png", png_bytes(fit_array(rec.image, part.resolution)))
            if rec.label is not None:
                _add(tar, f"{key:09d}.cls", str(rec.label).encode("ascii"))
                class_counts[rec.label] = class_counts.get(rec.label, 0) + 1
            count += 1
    return {
        "index": part.index,
        "count": count,
        "bytes": os.path.getsize(part.path),
        "sha256": sha256_file(part.path),
        "skipped": skipped,
        "class_counts": class_counts,
        "path": part.path,
        "items": len(part.keys),
    }


def _run_parts(
    parts: Iterable[_Part], n_parts: int, workers: int, progress: Progress
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    if workers <= 1 or n_parts <= 1:
        for p in parts:
            results.append(_write_part(p))
            progress.update(results[-1]["items"])
        return results
    ctx = mp_context(__name__)
    with cf.ProcessPoolExecutor(max_workers=min(workers, n_parts), mp_context=ctx) as pool:
        pending: set[cf.Future[dict[str, Any]]] = set()
        it = iter(parts)
        try:
            for p in it:  # at most 2 × workers parts in flight (bounded memory for arrays)
                pending.add(pool.submit(_write_part, p))
                while len(pending) >= 2 * workers:
                    done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                    for fut in done:
                        results.append(fut.result())
                        progress.update(results[-1]["items"])
            for fut in cf.as_completed(pending):
                results.append(fut.result())
                progress.update(results[-1]["items"])
        except cf.process.BrokenProcessPool as e:
            raise ConfigError(
                f"shards: a worker process died ({e}; out of memory?); rerun with fewer --workers"
            ) from None
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
    return sorted(results, key=lambda r: r["index"])


def default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 16))


def _clean(out: Path, keep: set[str] | None) -> None:
    """Remove parts and their temp files and (unless ``keep`` is None) shards not in ``keep``."""
    for p in out.iterdir():
        stale_shard = keep is not None and SHARD_RE.fullmatch(p.name) and p.name not in keep
        if stale_shard or _PART_RE.fullmatch(p.name):
            p.unlink(missing_ok=True)


def _no_usable(n: int, skipped: list[tuple[str, str]]) -> str:
    eg = "; ".join(f"{Path(p).name}: {w}" for p, w in skipped[:3])
    return f"shards: no usable image among {n} input(s), e.g. {eg}"


def write_shards(
    src: str | Path,
    out: str | Path,
    *,
    maxcount: int = 1000,
    resolution: int | None = None,
    seed: int = 0,
    verbose: bool = False,
    workers: int = 1,
    progress: bool | None = None,
    split: str | None = None,
    labels: str = "auto",
    channels: int | None = None,
) -> dict[str, Any]:
    """Write shuffled WebDataset shards ``OUT/shard-NNNNNN.tar`` and the manifest
    ``OUT/dataset.json`` (returned); see the module docstring for the guarantees.

    ``resolution``: the side after centre crop + resize (digits: the padded size, default 16;
    others: default the first image's side). ``workers`` > 1 writes shards in that many worker
    processes (same bytes as 1). ``progress``: a bar/periodic lines on stderr (default off;
    ``verbose`` turns it on). ``split``: train/test for CIFAR and digits. ``labels``: auto,
    folders or none for image folders. ``channels``: 1 or 3 (default: the first image's).
    """
    if maxcount < 1:
        raise ConfigError(f"shard size must be >= 1, got {maxcount}")
    if resolution is not None and resolution < 1:
        raise ConfigError(f"--resolution must be >= 1, got {resolution}")
    if channels not in (None, 1, 3):
        raise ConfigError(f"--channels must be 1 or 3, got {channels}")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    out = Path(out)
    source = open_source(src, split, labels, resolution)
    n = len(source)
    if not n:
        raise ConfigError(f"shards: {src}: no images")
    peek = source.peek()
    if peek is None:
        raise ConfigError(_no_usable(n, source.first_failures()))
    res = resolution if resolution is not None else peek[0]
    chan = channels if channels is not None else peek[1]

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"shards: cannot create {out}: {e}") from None
    write_atomic(out / INCOMPLETE, "a `vdmpp-train shards` run is writing here (or was killed)\n")
    (out / MANIFEST).unlink(missing_ok=True)  # the old manifest would describe other shards
    (out / LABELS).unlink(missing_ok=True)
    _clean(out, keep=None)  # parts a killed run left behind

    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_parts = (n + maxcount - 1) // maxcount

    def parts() -> Iterable[_Part]:
        for p in range(n_parts):
            idx = order[p * maxcount : (p + 1) * maxcount]
            keys = list(range(p * maxcount, p * maxcount + len(idx)))
            path = str(out / f".part-{p:06d}.tar")
            forced = channels is not None
            yield _Part(p, keys, path, res, chan, forced, source.subset(idx))

    show = bool(verbose) if progress is None else progress
    bar = Progress(n, "images", desc="shards", enabled=show, every=PROGRESS_EVERY_S)
    try:
        results = _run_parts(parts(), n_parts, workers, bar)
    finally:
        bar.close()

    skipped = [x for r in results for x in r["skipped"]]
    entries = []
    for r in results:
        if r["count"] == 0:
            Path(r["path"]).unlink(missing_ok=True)
            continue
        name = f"shard-{len(entries):06d}.tar"
        entries.append(
            {
                "name": name,
                "count": r["count"],
                "bytes": r["bytes"],
                "sha256": r["sha256"],
                "path": r["path"],
            }
        )
    if not entries:
        _clean(out, keep=set())
        (out / INCOMPLETE).unlink(missing_ok=True)
        raise ConfigError(_no_usable(n, skipped))
    for e in entries:
        os.replace(e.pop("path"), out / e["name"])
    _clean(out, keep={e["name"] for e in entries})  # shards of an earlier, larger write
    class_counts = None
    if source.classes is not None:
        class_counts = [0] * len(source.classes)
        for r in results:
            for k, v in r["class_counts"].items():
                class_counts[k] += v
        write_labels(out, source.classes)
    write_skipped(out, skipped)
    where: dict[str, Any] = {"kind": source.kind, "path": str(src)}
    if source.split is not None:
        where["split"] = source.split
    meta = make_manifest(
        entries,
        classes=source.classes,
        class_counts=class_counts,
        resolution=res,
        channels=chan,
        source=where,
        seed=seed,
        shard_size=maxcount,
        skipped=skipped,
    )
    fsync_dir(out)  # the shards' renames first
    write_json_atomic(out / MANIFEST, meta)  # last: its presence means the shards are complete
    (out / INCOMPLETE).unlink(missing_ok=True)
    fsync_dir(out)
    return meta
