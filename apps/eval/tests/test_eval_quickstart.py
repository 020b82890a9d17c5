"""The README's quickstart (scripts/quickstart.sh), run as CI runs it: it finishes and prints
its numbers. Shortened by its own knobs (steps, samples); the packages are already installed in
CI's environment, so the script skips installing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "scripts" / "quickstart.sh"


def _shims(bin_dir: Path) -> None:
    """``vdmpp-train``/``vdmpp-eval`` for a source checkout where they are not installed."""
    bin_dir.mkdir()
    for cmd, mod in (("vdmpp-train", "vdmpp.train"), ("vdmpp-eval", "vdmpp.eval")):
        if shutil.which(cmd) is None:
            p = bin_dir / cmd
            p.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m {mod} "$@"\n')
            p.chmod(0o755)


@pytest.mark.slow
def test_quickstart_prints_its_numbers(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    _shims(tmp_path / "bin")
    env = {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}"
        f"{os.environ.get('PATH', '')}",
        "PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
        "VDMPP_QUICKSTART_OUT": str(tmp_path / "qs"),
        "VDMPP_QUICKSTART_STEPS": "20",
        "VDMPP_QUICKSTART_SAMPLES": "60",
        "VDMPP_QUICKSTART_ALLOW_SYSTEM": "1",
        "OMP_NUM_THREADS": "2",
    }
    r = subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    out = r.stdout
    for pattern in (
        r"bits/dim .*:\s+\d+\.\d+ ± \d+\.\d+",
        r"Fréchet distance .*NOT Inception",
        r"class accuracy .*:\s+\d\.\d+",
        r"sample grid\s+\S+grid\.png",
    ):
        assert re.search(pattern, out), (pattern, out[-2000:])
    assert (tmp_path / "qs" / "samples-step20" / "grid.png").is_file()
    assert (tmp_path / "qs" / "plots" / "run.png").is_file()
    # idempotent: a second run neither retrains nor resamples
    r2 = subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path
    )
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "already trained" in r2.stdout
