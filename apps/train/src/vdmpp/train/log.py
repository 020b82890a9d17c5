"""Logging that fits a cluster: one named logger per app, ``RUN/log.txt`` on rank 0.

* ``configure("train", rank=r)`` sets up the logger ``vdmpp.train`` (``vdmpp.eval`` for the eval
  app): on rank 0, INFO and above go to stderr; on other ranks only warnings and errors.
  Warnings and errors name their rank (``[vdmpp-train rank 1] ERROR: ...``), as does every
  console line of a rank > 0. Lines carry a timestamp.
* :func:`attach_file` adds ``RUN/log.txt`` (appended to on resume); messages logged before the
  file was opened are written after the start-up summary, so a log starts with the summary.
* :func:`progress_allowed`: a tqdm bar only when its stream (stderr) is a terminal — in a
  SLURM/torchrun log a bar is thousands of ``\\r`` updates; there the periodic status lines
  are the progress.
* :class:`Progress`: that bar on a terminal, else a plain line every few seconds (count, rate,
  ETA) — the progress of long work (shards, sampling) that has no status lines of its own.
* :class:`ConsoleHandler` writes through ``tqdm.write`` while a bar is shown, so log lines and
  the bar do not overwrite each other.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "ConsoleHandler",
    "Progress",
    "StepBar",
    "attach_file",
    "close",
    "configure",
    "git_sha",
    "progress_allowed",
    "vdmpp_versions",
]

_TAG = "_vdmpp_handler"  # marks handlers this module added (so configure() can replace them)


class _Formatter(logging.Formatter):
    def __init__(self, app: str, rank: int | None, datefmt: str) -> None:
        super().__init__(datefmt=datefmt)
        self.app, self.rank = app, rank

    def format(self, record: logging.LogRecord) -> str:
        rank = self.rank if self.rank is not None or record.levelno < logging.WARNING else 0
        who = f"vdmpp-{self.app}" if rank is None else f"vdmpp-{self.app} rank {rank}"
        level = "" if record.levelno == logging.INFO else f"{record.levelname}: "
        msg = record.getMessage().replace("\r", "")
        text = f"{self.formatTime(record, self.datefmt)} [{who}] {level}{msg}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class ConsoleHandler(logging.Handler):
    """stderr; through ``bar.write`` while a tqdm ``bar`` is shown (``handler.bar = bar``)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self._stream = stream
        self.bar: Any = None

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr  # pytest swaps stderr

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            if self.bar is not None:
                self.bar.write(msg, file=self.stream)
            else:
                self.stream.write(msg + "\n")
                self.stream.flush()
        except Exception:  # logging must never take the run down
            self.handleError(record)


def configure(
    app: str, *, rank: int = 0, stream: TextIO | None = None, buffer: bool = True
) -> logging.Logger:
    """The logger ``vdmpp.<app>`` with a fresh console handler for this process's rank
    (``buffer``: keep rank 0's records for :func:`attach_file`)."""
    logger = logging.getLogger(f"vdmpp.{app}")
    close(logger)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    h = ConsoleHandler(stream)
    h.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    h.setFormatter(_Formatter(app, rank if rank else None, "%H:%M:%S"))
    setattr(h, _TAG, True)
    logger.addHandler(h)
    if rank == 0 and buffer:  # what is logged before log.txt opens: written after the summary
        buf = _Buffer()
        setattr(buf, _TAG, True)
        logger.addHandler(buf)
    return logger


class _Buffer(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < 1000:
            self.records.append(record)


def attach_file(logger: logging.Logger, path: str | Path, summary: list[str]) -> Path:
    """Open ``path`` (append), write ``summary`` first, then what was logged before it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffered: list[logging.LogRecord] = []
    for h in list(logger.handlers):
        if isinstance(h, _Buffer):
            buffered = h.records
            logger.removeHandler(h)
    fh = logging.FileHandler(path, mode="a", encoding="utf-8")
    fh.setFormatter(_FileFormatter())
    setattr(fh, _TAG, True)
    logger.addHandler(fh)
    for line in summary:
        logger.info(line)
    for rec in buffered:
        fh.handle(rec)
    return path


class _FileFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S%z")

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\r", "")


def close(logger: logging.Logger) -> None:
    """Remove and close the handlers :func:`configure`/:func:`attach_file` added."""
    for h in list(logger.handlers):
        if getattr(h, _TAG, False):
            logger.removeHandler(h)
            with contextlib.suppress(Exception):
                h.close()


def console(logger: logging.Logger) -> ConsoleHandler | None:
    return next((h for h in logger.handlers if isinstance(h, ConsoleHandler)), None)


def progress_allowed(requested: bool, stream: TextIO | None = None) -> bool:
    """A progress bar only when asked for and its stream (stderr) is a terminal."""
    s = stream if stream is not None else sys.stderr
    try:
        return bool(requested and s.isatty())
    except (AttributeError, ValueError):
        return False


class StepBar:
    """The training loop's tqdm bar (loss as postfix) on a terminal; nothing in a log, where
    the metrics lines report progress. Log lines are written above the bar."""

    def __init__(
        self, logger: logging.Logger, enabled: bool, total: int, initial: int, desc: str
    ) -> None:
        self.bar = None
        self.console = console(logger)
        if progress_allowed(enabled):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
            if self.console is not None:
                self.console.bar = self.bar

    def update(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4g}", refresh=False)

    def close(self) -> None:
        if self.console is not None:
            self.console.bar = None
        if self.bar is not None:
            self.bar.close()


class Progress:
    """A tqdm bar when ``stream`` (stderr) is a terminal, otherwise a plain line at most every
    ``every`` seconds and one at :meth:`close` — never a ``\r``. ``emit`` (e.g. a logger's
    ``info``) takes the plain lines; by default they are printed to ``stream``."""

    def __init__(
        self,
        total: int,
        what: str,
        *,
        desc: str,
        enabled: bool = True,
        stream: TextIO | None = None,
        every: float = 10.0,
        emit: Callable[[str], Any] | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.what, self.desc, self.every, self.done = total, what, desc, every, 0
        self.enabled, self.emit = enabled, emit
        self.t0 = self.last = time.monotonic()
        self.bar = None
        if progress_allowed(enabled, self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=what, desc=desc, file=self.stream, dynamic_ncols=True)

    def update(self, n: int, force: bool = False) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.enabled and (force or now - self.last >= self.every):
            self.last = now
            el = max(now - self.t0, 1e-9)
            rate = self.done / el
            left = (self.total - self.done) / rate if rate > 0 else float("inf")
            pct = 100.0 * self.done / max(self.total, 1)
            line = (
                f"{self.desc}: {self.done}/{self.total} {self.what} ({pct:.0f}%), "
                f"{rate:.0f} {self.what}/s, elapsed {el:.0f}s, ETA {eta(left)}"
            )
            if self.emit is not None:
                self.emit(line)
            else:
                print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.done:
            self.update(0, force=True)


def vdmpp_versions() -> dict[str, str]:
    """``{distribution: version}`` of torch and every installed ``vdmpp-*`` distribution."""
    from importlib.metadata import PackageNotFoundError, distributions, version

    out: dict[str, str] = {}
    with contextlib.suppress(PackageNotFoundError):
        out["torch"] = version("torch")
    for d in distributions():
        name = (d.metadata.get("Name") or "").lower().replace("_", "-")
        if name.startswith("vdmpp"):
            out[name] = d.version
    return dict(sorted(out.items(), key=lambda kv: (kv[0] != "torch", kv[0])))


def git_sha(where: str | Path | None = None) -> str | None:
    """The commit of the git tree holding ``where`` (this package by default), or None.

    Cheap and silent: one ``git rev-parse`` with a 2 s limit; no git, no tree → None.
    """
    where = Path(where) if where is not None else Path(__file__).resolve().parent
    try:
        r = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=where,
            timeout=2,
            capture_output=True,
            text=True,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = r.stdout.strip()
    return sha if r.returncode == 0 and sha else None


def eta(seconds: float) -> str:
    """``1d02h03m`` / ``2h03m`` / ``3m04s`` / ``5s``."""
    if seconds != seconds or seconds in (float("inf"), float("-inf")) or seconds < 0:
        return "?"
    s = int(seconds + 0.5)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h:02d}h{m:02d}m"
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
