"""Shared helpers: a small, fast variant of the digits config and subprocess launchers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
DIGITS = ROOT / "apps" / "train" / "configs" / "digits.toml"

# 8×8 digits, batch 8, a 2-level U-Net with 16 channels: a step is a few ms on a busy CPU.
SMALL = [
    "data.resolution=8",
    "batch.global=8",
    "model.overrides={model_channels=16, channel_mult=[1, 2], num_res_blocks=1, "
    "attention_resolutions=[], head_channels=16}",
    "log.progress=false",
    "log.every=5",
    "sample.every=0",
    "optimizer.warmup_images=0",
    "optimizer.lr=2e-3",
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    src = [
        str(ROOT / p)
        for p in (
            "libs/schedules/src",
            "libs/losses/src",
            "libs/models/src",
            "libs/samplers/src",
            "apps/train/src",
        )
    ]
    env["PYTHONPATH"] = os.pathsep.join([*src, env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture
def small() -> list[str]:
    return list(SMALL)


@pytest.fixture
def cli_env() -> dict[str, str]:
    """Environment for subprocesses: works from an install and from the source tree."""
    return _env()


def run_cli(args: list[str], env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vdmpp.train", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=kw.pop("timeout", 300),
        **kw,
    )


@pytest.fixture
def cli():
    env = _env()
    return lambda args, **kw: run_cli(args, env, **kw)
