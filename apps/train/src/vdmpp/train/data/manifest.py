"""A shard folder's manifest (``dataset.json``), ``labels.json`` and ``skipped.txt``: writing,
reading, validation against a config, sha256 checksums.

Training checks the manifest (:func:`check_manifest`): a listed shard missing, a shard the
manifest does not list, a size mismatch, or a resolution/channels/num_classes that differs from
the config is a one-line error (exit 2). Sizes are always compared (a ``stat`` per shard);
sha256 checksums are verified when the shards total at most 1 GiB, or always with
``VDMPP_VERIFY_SHARDS=1`` (``0``: sizes only); :func:`verify_shards` (``--verify``) hashes every
shard in parallel on demand. A folder with an ``.incomplete`` marker and no manifest is refused.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing as mp
import os
import re
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..fileio import write_atomic, write_json_atomic
from .transform import TRANSFORM

__all__ = [
    "FORMAT",
    "INCOMPLETE",
    "LABELS",
    "MANIFEST",
    "SHARD_RE",
    "SKIPPED",
    "VERIFY_AUTO_BYTES",
    "check_manifest",
    "make_manifest",
    "sha256_file",
    "shards_command",
    "skipped_line",
    "validate_manifests",
    "verify_shards",
    "write_labels",
    "write_skipped",
]

MANIFEST = "dataset.json"
LABELS = "labels.json"
SKIPPED = "skipped.txt"
INCOMPLETE = ".incomplete"
FORMAT = "vdmpp-shards/1"
SHARD_RE = re.compile(r"shard-\d{6}\.tar")
VERIFY_AUTO_BYTES = 1 << 30  # sha256 at every start up to this total size


def shards_command(out: str | Path, resolution: int | None) -> str:
    """The command that writes shards to ``out`` (for error messages)."""
    res = f" --resolution {resolution}" if resolution is not None else " --resolution R"
    return f"vdmpp-train shards SRC {out}{res}"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def mp_context(preload: str) -> mp.context.BaseContext:
    """Worker processes start clean: forked from a fork server that has imported ``preload``
    once (POSIX; no per-worker import of torch, shared pages), else spawned."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([preload])
        return ctx
    return mp.get_context("spawn")  # pragma: no cover - not POSIX


# --- writing ---------------------------------------------------------------------------------
def make_manifest(
    entries: list[dict[str, Any]],
    *,
    classes: list[str] | None,
    class_counts: list[int] | None,
    resolution: int,
    channels: int,
    source: dict[str, Any],
    seed: int,
    shard_size: int,
    skipped: list[tuple[str, str]],
) -> dict[str, Any]:
    """The ``dataset.json`` of shards ``entries`` ({name, count, bytes, sha256} each)."""
    return {
        "format": FORMAT,
        "count": sum(e["count"] for e in entries),
        "shards": len(entries),
        "pattern": f"shard-{{000000..{len(entries) - 1:06d}}}.tar",
        "files": entries,
        "classes": classes,
        "num_classes": None if classes is None else len(classes),
        "class_counts": class_counts,
        "resolution": resolution,
        "channels": channels,
        "transform": TRANSFORM,
        "source": source,
        "seed": seed,
        "shard_size": shard_size,
        "skipped": {"count": len(skipped), "first": [f"{p}: {w}" for p, w in skipped[:10]]},
    }


def write_labels(out: Path, classes: list[str]) -> None:
    """``labels.json``: {class name: index}."""
    write_json_atomic(out / LABELS, {c: i for i, c in enumerate(classes)})


def write_skipped(out: Path, skipped: list[tuple[str, str]]) -> None:
    """``skipped.txt`` (one ``path<TAB>why`` per line), or no such file when nothing was."""
    if skipped:
        write_atomic(out / SKIPPED, "".join(f"{p}\t{why}\n" for p, why in skipped))
    else:
        (out / SKIPPED).unlink(missing_ok=True)


def skipped_line(meta: dict[str, Any], out: str | Path) -> str | None:
    """One line naming how many inputs were skipped and the first few (None: none skipped)."""
    sk = meta.get("skipped") or {}
    if not sk.get("count"):
        return None
    first = "; ".join(sk["first"][:3])
    return (
        f"skipped {sk['count']} input(s) (unreadable, corrupt or wrong mode; all listed in "
        f"{Path(out) / SKIPPED}): {first}"
    )


# --- checking a shard folder against its manifest --------------------------------------------
def _load_manifest(root: Path) -> dict[str, Any] | None:
    path = root / MANIFEST
    if not path.is_file():
        if (root / INCOMPLETE).exists():
            raise ConfigError(
                f"{root}: a `vdmpp-train shards` run writing here was interrupted "
                f"(no {MANIFEST}); rerun it: {shards_command(root, None)}"
            )
        return None
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{path}: unreadable manifest ({e}); rewrite the shards with "
            f"{shards_command(root, None)}"
        ) from None
    return meta


def _verify_mode() -> str:
    v = os.environ.get("VDMPP_VERIFY_SHARDS", "auto").strip().lower()
    if v in ("1", "all", "true", "yes"):
        return "all"
    if v in ("0", "size", "sizes", "false", "no"):
        return "size"
    return "auto"


def _check_meta(
    root: Path,
    meta: dict[str, Any],
    resolution: int | None,
    channels: int | None,
    num_classes: int | None,
) -> None:
    mres, mch, mcls = meta.get("resolution"), meta.get("channels"), meta.get("num_classes")
    redo = shards_command(root, resolution if resolution is not None else mres)
    if resolution is not None and mres is not None and mres != resolution:
        raise ConfigError(
            f"data.resolution = {resolution} but {root} holds {mres}×{mres} images "
            f"(per its {MANIFEST}; rewrite the shards with `{redo}` or set "
            f"data.resolution = {mres})"
        )
    if channels is not None and mch is not None and mch != channels:
        raise ConfigError(
            f"data.channels = {channels} but {root} holds {mch}-channel images "
            f"(per its {MANIFEST}); set data.channels = {mch} or rewrite the "
            f"shards with `{redo} --channels {channels}`"
        )
    if num_classes is not None and "num_classes" in meta:
        if mcls is None:
            raise ConfigError(
                f"data.num_classes = {num_classes} but {root} has no labels (per "
                f'its {MANIFEST}); set data.num_classes = "none" for '
                "unconditional training"
            )
        if mcls != num_classes:
            raise ConfigError(
                f"data.num_classes = {num_classes} but {root} has {mcls} classes "
                f"(per its {MANIFEST}); set data.num_classes = {mcls}"
            )


def check_manifest(
    root: str | Path,
    urls: list[str] | None,
    resolution: int | None,
    channels: int | None,
    num_classes: int | None,
    *,
    checksums: bool | None = None,
    workers: int = 1,
) -> dict[str, Any] | None:
    """Validate a shard folder that has a ``dataset.json`` (None when it has none).

    ``urls``: the shards a run will read from ``root`` (None: the whole folder, which must hold
    exactly the listed shards). ``resolution``/``channels``/``num_classes``: the config's (None:
    not checked; ``num_classes`` None means unconditional, so labels are not needed).
    ``checksums``: None → ``$VDMPP_VERIFY_SHARDS`` (auto: when the shards total ≤ 1 GiB).
    Every problem is a one-line :class:`ConfigError`.
    """
    root = Path(root)
    meta = _load_manifest(root)
    if meta is None:
        return None
    where = f"{root / MANIFEST}"
    _check_meta(root, meta, resolution, channels, num_classes)
    redo = shards_command(root, resolution if resolution is not None else meta.get("resolution"))
    listed = meta.get("files")
    if not isinstance(listed, list):
        return meta  # a manifest of vdmpp < 0.2 (no per-shard entries): metadata checked only
    by_name = {e.get("name"): e for e in listed if isinstance(e, dict)}
    if any(not isinstance(n, str) or Path(n).name != n or not n.endswith(".tar") for n in by_name):
        raise ConfigError(
            f"{where}: its 'files' must name .tar files inside {root}; rewrite the "
            f"shards with `{redo}`"
        )
    if urls is None:
        wanted = sorted(by_name)
        present = {p.name for p in root.glob("*.tar")}
        extra = sorted(present - set(by_name))
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise ConfigError(
                f"{root}: {extra[0]}{more} is not listed in {where}; move it "
                f"elsewhere or rewrite the shards with `{redo}`"
            )
    else:
        wanted = []
        for u in urls:
            name = Path(u).name
            if name not in by_name:
                raise ConfigError(
                    f"{u} is not listed in {where}; move it elsewhere or "
                    f"rewrite the shards with `{redo}`"
                )
            wanted.append(name)
    total = 0
    for name in wanted:
        e, p = by_name[name], root / name
        if not p.is_file():
            raise ConfigError(
                f"{root}: {name} is listed in {MANIFEST} but missing; restore it "
                f"or rewrite the shards with `{redo}`"
            )
        size = p.stat().st_size
        if size != e.get("bytes"):
            raise ConfigError(
                f"{p}: {size} bytes but {MANIFEST} says {e.get('bytes')} (a "
                f"truncated or replaced shard); rewrite the shards with `{redo}`"
            )
        total += size
    mode = _verify_mode()
    if checksums is None:
        checksums = mode == "all" or (mode == "auto" and total <= VERIFY_AUTO_BYTES)
    if checksums:
        bad = _bad_checksums([(root / n, by_name[n].get("sha256")) for n in wanted], workers)
        if bad:
            raise ConfigError(
                f"{bad[0]}: sha256 differs from {MANIFEST} ({len(bad)} shard(s) "
                f"corrupt); rewrite the shards with `{redo}`"
            )
    return meta


def _bad_checksums(pairs: list[tuple[Path, str | None]], workers: int) -> list[str]:
    paths = [str(p) for p, _ in pairs]
    if workers > 1 and len(paths) > 1:
        ctx = mp_context(__name__)
        with cf.ProcessPoolExecutor(min(workers, len(paths)), mp_context=ctx) as pool:
            sums = list(pool.map(sha256_file, paths))
    else:
        sums = [sha256_file(p) for p in paths]
    return [p for p, s, (_, want) in zip(paths, sums, pairs) if s != want]


def verify_shards(root: str | Path, *, workers: int = 1) -> dict[str, Any]:
    """Check every shard of ``root`` against its manifest, sha256 included (``--verify``)."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root}: no such shard folder")
    meta = check_manifest(root, None, None, None, None, checksums=True, workers=workers)
    if meta is None:
        raise ConfigError(
            f"{root}: no {MANIFEST} to verify against (shards written by "
            "`vdmpp-train shards` have one)"
        )
    if not isinstance(meta.get("files"), list):
        raise ConfigError(
            f"{root / MANIFEST}: has no per-shard checksums (written by an older "
            f"vdmpp); rewrite the shards with {shards_command(root, None)}"
        )
    return meta


def validate_manifests(
    urls: list[str], resolution: int, channels: int, num_classes: int | None
) -> None:
    """:func:`check_manifest` for every shard folder among ``urls`` that has a manifest (or an
    ``.incomplete`` marker): the whole folder when ``urls`` holds all its shards."""
    by_dir: dict[Path, list[str]] = {}
    for u in urls:
        if "://" not in u:
            by_dir.setdefault(Path(u).parent, []).append(u)
    for root, group in sorted(by_dir.items()):
        if (root / MANIFEST).is_file() or (root / INCOMPLETE).exists():
            whole = sorted(str(p) for p in root.glob("*.tar")) == sorted(group)
            check_manifest(root, None if whole else group, resolution, channels, num_classes)
