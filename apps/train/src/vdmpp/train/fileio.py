"""Atomic files: the one home of temp file + flush + fsync + ``os.replace`` + fsync of the dir.

Every file vdmpp-train and vdmpp-eval write for others to read (checkpoints, ``status.json``,
``config.toml``, shard manifests, exports, sample ``.npz`` files and records, metrics) goes
through :func:`write_atomic`: a reader sees the old file or the whole new one, and once the call
returns the new one is on disk (a power loss or SIGKILL right after cannot lose it). A crash
mid-write leaves at most ``.<name>.<pid>.tmp`` beside it, which :func:`clean_stale_temps`
removes once its writer is dead.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_open",
    "clean_stale_temps",
    "fsync_dir",
    "pid_alive",
    "temp_name",
    "torch_save_atomic",
    "write_atomic",
    "write_json_atomic",
    "write_npz_atomic",
]


def temp_name(path: Path) -> Path:
    """The temp file a writer of ``path`` uses: ``.<name>.<pid>.tmp`` beside it."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def fsync_dir(path: str | Path) -> None:
    """fsync a directory, so that a rename inside it survives a crash (POSIX; a no-op where
    directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", **kw: Any) -> Iterator[IO[Any]]:
    """Open a temp file for writing; on a clean exit flush, fsync, rename over ``path`` and
    fsync the directory. On an exception the temp file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, mode, **kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def write_atomic(path: str | Path, data: bytes | str | Callable[[IO[bytes]], None]) -> Path:
    """Write bytes, text (UTF-8) or whatever ``data(f)`` writes to a binary file, atomically."""
    with atomic_open(path, "wb") as f:
        if callable(data):
            data(f)
        else:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def write_json_atomic(path: str | Path, obj: Any, *, indent: int | None = 2) -> Path:
    """``json.dumps(obj)`` plus a newline, atomically."""
    return write_atomic(path, json.dumps(obj, indent=indent) + "\n")


def write_npz_atomic(path: str | Path, **arrays: Any) -> Path:
    """``numpy.savez`` (uncompressed, no pickles) atomically."""
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return write_atomic(path, buf.getvalue())


def torch_save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` atomically (checkpoints, snapshots)."""
    import torch

    return write_atomic(path, lambda f: torch.save(obj, f))


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a temp file of a live writer must not be removed)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_temps(directory: str | Path, pattern: str = ".*.tmp") -> list[Path]:
    """Remove ``.<name>.<pid>.tmp`` files in ``directory`` whose writer is dead (or unknown)."""
    d = Path(directory)
    gone: list[Path] = []
    if not d.is_dir():
        return gone
    for p in d.glob(pattern):
        if not p.is_file():
            continue
        parts = p.name.rsplit(".", 2)
        pid = int(parts[-2]) if len(parts) == 3 and parts[-2].isdigit() else None
        if pid is None or (pid != os.getpid() and not pid_alive(pid)):
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone
