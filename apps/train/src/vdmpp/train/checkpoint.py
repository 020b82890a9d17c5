"""Atomic checkpoints: temp file + fsync + ``os.replace``, keep the last K, load weights-only.

A checkpoint is ``RUN/checkpoints/ckpt-<step:09d>.pt`` holding only tensors, numbers, strings,
lists and dicts, so ``torch.load(..., weights_only=True)`` reads it; anything else (a pickle
from elsewhere) is refused with :class:`CheckpointError`. A crash — even SIGKILL — while writing
leaves at most a ``.tmp`` file, which is never picked up: the previous checkpoint stays the
latest readable one.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .fileio import pid_alive, torch_save_atomic

__all__ = [
    "CheckpointError",
    "CheckpointIO",
    "Counter",
    "check_run_dir",
    "find_latest",
    "is_loadable",
    "list_checkpoints",
    "load_checkpoint",
    "prune",
    "rng_state",
    "save_atomic",
    "set_rng_state",
]

_NAME = re.compile(r"^ckpt-(\d+)\.pt$")
REQUIRED = ("format", "step", "model", "ema", "optimizer")
FORMAT = "vdmpp-train-checkpoint"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot (or must not) be loaded."""


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"ckpt-{step:09d}.pt"


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` atomically (:func:`vdmpp.train.fileio.torch_save_atomic`), then mark it
    loadable."""
    path = torch_save_atomic(obj, path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        mark_loadable(path)
    return path


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every finished checkpoint file, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _NAME.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a vdmpp-train checkpoint with ``weights_only=True``; refuse anything else."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError for pickles, RuntimeError for truncated zips
        raise CheckpointError(
            f"{path}: not a loadable vdmpp-train checkpoint (read with weights_only=True; "
            f"pickled objects are refused): {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a vdmpp-train checkpoint (format != {FORMAT!r})")
    missing = [k for k in REQUIRED if k not in obj]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}")
    return obj


def find_latest(
    directory: str | Path,
    map_location: str | torch.device = "cpu",
    warn: Callable[[str], None] | None = None,
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads, skipping (with a warning) any that do not.

    ``warn`` receives the one-line reason for each skipped file (default: ``warnings.warn``).
    """
    for _, path in reversed(list_checkpoints(directory)):
        try:
            state = load_checkpoint(path, map_location)
        except CheckpointError as e:
            msg = f"skipping unreadable checkpoint: {e}"
            if warn is not None:
                warn(msg)
            else:
                warnings.warn(msg, stacklevel=2)
            continue
        mark_loadable(path)
        return path, state
    return None


# (path, size, mtime_ns) of files known to load; a checkpoint is verified at most once.
_LOADABLE: set[tuple[str, int, int]] = set()


def _stat_key(path: Path) -> tuple[str, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def mark_loadable(path: str | Path) -> None:
    """Record that ``path`` (as it is now on disk) loads: e.g. this process just wrote it."""
    key = _stat_key(Path(path))
    if key is not None:
        _LOADABLE.add(key)


def is_loadable(path: str | Path) -> bool:
    """Whether ``path`` loads as a checkpoint (memory-mapped, weights-only; cached per file)."""
    path = Path(path)
    key = _stat_key(path)
    if key is None:
        return False
    if key in _LOADABLE:
        return True
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    ok = isinstance(obj, dict) and obj.get("format") == FORMAT and all(k in obj for k in REQUIRED)
    del obj
    if ok:
        _LOADABLE.add(key)
    return ok


def prune(directory: str | Path, keep: int, protect: int | None = None) -> list[Path]:
    """Keep the newest ``keep`` *loadable* checkpoints; delete older ones and stale temp files.

    An unreadable file (truncated, foreign, garbage) never counts towards ``keep``, so a
    loadable checkpoint is never deleted in favour of it; unreadable files newer than the
    kept ones are left alone (``find_latest`` skips them with a warning). Returns what went.
    """
    d = Path(directory)
    gone = []
    kept = 0
    for step, p in reversed(list_checkpoints(d)):
        if kept < keep:
            kept += is_loadable(p)
            continue
        if step == protect:  # checkpoint.keep_best: the best-scoring step stays
            continue
        p.unlink(missing_ok=True)
        gone.append(p)
    for p in d.glob(".ckpt-*.tmp"):
        pid = p.name.rsplit(".", 2)[-2]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def rng_state() -> dict[str, Any]:
    """torch, numpy, Python (and CUDA) generator states as weights-only-loadable values."""
    np_state = np.random.get_state()
    py = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [py[0], list(py[1]), py[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(state["cuda"])


def check_run_dir(out: str | Path, resume: bool) -> Path:
    """``out`` as a run directory: not under a file, and without checkpoints unless resuming
    (ConfigError naming the fix); the one check of ``vdmpp-train`` and ``--check``."""
    from .errors import ConfigError

    out = Path(out)
    bad = [q for q in (out, *out.parents) if q.exists() and not q.is_dir()]
    if bad:
        raise ConfigError(
            f"config: out = {str(out)!r}: {bad[0]} is a file, not a directory; "
            "choose another --set out=..."
        )
    existing = list_checkpoints(out / "checkpoints")
    if existing and not resume:
        raise ConfigError(
            f"{out} already holds checkpoints (latest step {existing[-1][0]}): pass "
            f"--resume to continue, or --set out=... for a new run"
        )
    return out


class Counter:
    """A run counter a checkpoint carries (one part of :class:`CheckpointIO`)."""

    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> int:
        return self.value

    def load_state_dict(self, v: int) -> None:
        self.value = int(v)


class CheckpointIO:
    """One checkpoint over the run's components.

    ``parts`` maps a checkpoint key to an object with ``state_dict()``/``load_state_dict()``
    (model, EMA, optimizer, schedule, data positions, counters, ...): a new piece of training
    state is one entry here, saved and restored with the rest. Keys in :data:`REQUIRED` must be
    in a checkpoint; any other part missing from an older checkpoint keeps its fresh state.
    """

    def __init__(self, directory: str | Path, keep: int, parts: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.keep = keep
        self.parts = parts

    def state(self, step: int, **extra: Any) -> dict[str, Any]:
        """The checkpoint dict of every part at ``step`` (plus the RNG states and ``extra``)."""
        state = {"format": FORMAT, "version": 1, "step": step, **extra}
        state.update({k: p.state_dict() for k, p in self.parts.items()})
        state["rng"] = rng_state()
        return state

    def save(self, state: dict[str, Any], protect: int | None = None) -> Path:
        """Write atomically, then keep the newest ``keep`` loadable checkpoints (and the one
        of step ``protect``)."""
        path = save_atomic(state, checkpoint_path(self.directory, int(state["step"])))
        prune(self.directory, self.keep, protect)
        return path

    def latest(
        self, warn: Callable[[str], None] | None = None
    ) -> tuple[Path, dict[str, Any]] | None:
        return find_latest(self.directory, map_location="cpu", warn=warn)

    def restore(self, state: dict[str, Any]) -> None:
        """Load every part from ``state`` (RuntimeError/ValueError/KeyError on a mismatch)."""
        for k, p in self.parts.items():
            if k in REQUIRED or state.get(k):
                p.load_state_dict(state[k])
        set_rng_state(state["rng"])
