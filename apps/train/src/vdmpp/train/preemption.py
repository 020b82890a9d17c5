"""Stop signals: SIGTERM/SIGINT end a run at the next step boundary with a checkpoint, and a
data wait that would never reach that boundary is broken after a grace period."""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

__all__ = ["DataWaitInterrupted", "Preemption", "stop_signals_ignored"]


class DataWaitInterrupted(Exception):
    """A stop signal arrived while the step waited on its data for longer than the grace."""


class Preemption:
    """SIGTERM/SIGINT set a flag; the loop checkpoints and exits at the next step boundary.

    A step blocked on its data (a stalled filesystem, a stream that cannot fill a batch) would
    never reach that boundary; so when a signal arrives during a data wait, or a wait starts
    after one, an alarm fires after ``grace`` seconds and, if that same wait is still going
    on, breaks out of it (:class:`DataWaitInterrupted`). The grace lets a normal wait finish
    so that ranks stop together at a step boundary. ``$VDMPP_SIGNAL_GRACE_S`` sets it.
    """

    def __init__(self, grace: float | None = None) -> None:
        self.signal: int | None = None
        self.grace = (
            grace if grace is not None else float(os.environ.get("VDMPP_SIGNAL_GRACE_S", "10"))
        )
        self._old: dict[int, Any] = {}
        self._wait = 0  # id of the current data wait (0: none)
        self._waits = 0
        self._armed_for = -1

    def __enter__(self) -> Preemption:
        for s, h in (
            (signal.SIGTERM, self._handle),
            (signal.SIGINT, self._handle),
            (signal.SIGALRM, self._alarm),
        ):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[s] = signal.signal(s, h)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: give up immediately
        self.signal = signum
        if self._wait:
            self._arm()

    def _arm(self) -> None:
        if self._armed_for != self._wait and signal.SIGALRM in self._old:
            self._armed_for = self._wait
            signal.setitimer(signal.ITIMER_REAL, max(self.grace, 1e-3))

    def _alarm(self, signum: int, frame: Any) -> None:
        if self._wait and self._armed_for == self._wait:
            raise DataWaitInterrupted

    @contextlib.contextmanager
    def data_wait(self) -> Any:
        self._waits += 1
        self._wait = self._waits
        if self.signal is not None:
            self._arm()
        try:
            yield
        finally:
            self._wait = 0

    def __exit__(self, *exc: Any) -> None:
        if signal.SIGALRM in self._old:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for s, h in self._old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def stop_signals_ignored() -> Any:
    """SIGINT/SIGTERM ignored while DataLoader workers are forked (they inherit it)."""
    old: dict[int, Any] = {}
    for s in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError):  # not the main thread
            old[s] = signal.signal(s, signal.SIG_IGN)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
