"""Helpers for the failure-injection suite: launch the CLI in its own process group, poll, kill.

Soak variants (many kills, 50 consecutive 2-rank runs) are marked ``slow`` and run only with
``VDMPP_SOAK=1``; without it CI runs the cheap variants of the same properties.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

SOAK = os.environ.get("VDMPP_SOAK", "") not in ("", "0")


class Proc:
    """A vdmpp-train (or torchrun) process group started with ``start_new_session``."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path | None = None) -> None:
        self.p = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def wait_until(self, cond: Callable[[], bool], timeout: float = 240.0) -> None:
        deadline = time.time() + timeout
        while not cond():
            if self.p.poll() is not None:
                _out, err = self.p.communicate()
                raise AssertionError(f"exited early ({self.p.returncode}):\n{err[-3000:]}")
            if time.time() > deadline:
                self.kill_group(signal.SIGKILL)
                raise AssertionError("timed out waiting")
            time.sleep(0.05)

    def kill_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.p.pid, sig)

    def finish(self, timeout: float = 120.0) -> tuple[int, str, str]:
        try:
            out, err = self.p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_group(signal.SIGKILL)
            out, err = self.p.communicate()
            raise AssertionError(f"did not exit within {timeout} s:\n{err[-3000:]}") from None
        return self.p.returncode, out, err


def metrics_steps(run: Path) -> list[int]:
    f = run / "metrics.jsonl"
    if not f.is_file():
        return []
    out = []
    for line in f.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError):
            out.append(json.loads(line)["step"])
    return out


@pytest.fixture
def train_argv(small) -> Callable[..., list[str]]:
    """argv of `python -m vdmpp.train digits` (or torchrun with ``ranks``) on the small config."""

    def make(out: Path, *sets: str, ranks: int = 1, config: str = "digits") -> list[str]:
        args = [config, *(a for s in [*small, *sets, f"out={out}"] for a in ("--set", s))]
        if ranks == 1:
            return [sys.executable, "-m", "vdmpp.train", *args]
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(ranks),
            "-m",
            "vdmpp.train",
            *args,
        ]

    return make


@pytest.fixture
def launch(cli_env) -> Callable[..., Proc]:
    procs: list[Proc] = []

    def start(argv: list[str], env: dict[str, str] | None = None) -> Proc:
        p = Proc(argv, env or cli_env)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.p.poll() is None:
            p.kill_group(signal.SIGKILL)
            p.p.communicate()
