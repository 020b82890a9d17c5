"""A run's outcome: ``RUN/status.json``, the result line and the exit code say the same thing.

Statuses and exit codes: the table in :mod:`vdmpp.train.errors` (``EXIT_CODES``), plus
``running``, written at start-up and left behind by a run that was killed.

``status.json`` is written by rank 0 only, atomically (temp file + rename): a reader never
sees half a file. Consumers (``vdmpp-eval``, ``scripts/quickstart.sh``) refuse to report
results of a run whose status is not ``done`` (:func:`require_done`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .errors import EXIT_CODES, EXIT_CONFIG, STATUSES
from .fileio import write_json_atomic

__all__ = [
    "EXIT_CODES",
    "EXIT_CONFIG",
    "STATUSES",
    "StatusError",
    "read_status",
    "require_done",
    "write_status",
]

FILE = "status.json"


class StatusError(ValueError):
    """The run's results must not be reported: it did not finish (or has no status)."""


def write_status(run: str | Path, status: str, /, **fields: Any) -> Path:
    """Write ``run/status.json`` atomically: {"status", "exit_code", "time", **fields}."""
    if status not in (*STATUSES, "running"):
        raise ValueError(f"unknown run status {status!r}")
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    rec = {"status": status, "exit_code": EXIT_CODES.get(status), "time": time.time(), **fields}
    return write_json_atomic(run / FILE, rec)


def read_status(run: str | Path) -> dict[str, Any] | None:
    """``run/status.json`` as a dict; None when there is none (a run from before 0.2.0)."""
    path = Path(run) / FILE
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return {"status": "unreadable", "message": f"{path}: {e}"}
    return rec if isinstance(rec, dict) else {"status": "unreadable"}


def run_dir_of(path: str | Path) -> Path | None:
    """The training run directory that ``path`` (RUN, RUN/export, RUN/export/file) belongs to."""
    p = Path(path)
    for q in (p, *p.parents)[:3]:
        if (q / FILE).is_file() or (q / "checkpoints").is_dir():
            return q
    return None


def require_done(path: str | Path, *, allow_partial: bool = False) -> dict[str, Any] | None:
    """Raise :class:`StatusError` unless the run holding ``path`` finished with ``done``.

    A path outside any run directory (a bare export copied elsewhere) passes: there is no
    status to check. ``allow_partial`` lets a preempted/stopped/running run through.
    """
    run = run_dir_of(path)
    if run is None:
        return None
    rec = read_status(run)
    status = rec.get("status") if rec else "unknown (no status.json)"
    if status == "done" or allow_partial:
        return rec
    step = rec.get("step") if rec else None
    steps = rec.get("steps") if rec else None
    at = f" at step {step}/{steps}" if step is not None and steps is not None else ""
    hint = (
        "resume it with `vdmpp-train CONFIG --resume`"
        if status in ("preempted", "running")
        else "see its log.txt"
    )
    raise StatusError(
        f"{run}: the training run is {status}{at}, not done; {hint}, or pass "
        f"--allow-partial to use it anyway"
    )
