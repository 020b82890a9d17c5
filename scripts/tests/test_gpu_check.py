"""scripts/gpu_check.sh --cpu-dry-run: every phase's CPU-side logic (arguments, timeouts, the
budget, JSON and logs written as it goes, the "hang" report of a planted sleeping op, the
exactness/graph workers on CPU tensors), so the first GPU run does not fail on a script bug."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
PHASES = ["build", "smoke", "tests", "exactness", "graphs", "bench", "train"]


def _kernels_built() -> bool:
    """The worker phases call the ops: they pass only where the extension is built (the
    `kernels` nox session); elsewhere (`release`) they must fail cleanly, not crash the run."""
    needed = ("torch", "vdmpp.kernels", "vdmpp.losses", "vdmpp.samplers", "vdmpp.schedules")
    try:  # find_spec of a dotted name imports its parent: no vdmpp at all raises
        if any(importlib.util.find_spec(m) is None for m in needed):
            return False
    except ModuleNotFoundError:
        return False
    import vdmpp.kernels as K

    return K.available()


def _run(
    tmp_path: Path, *args: str, timeout: float = 240
) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    p = subprocess.run(["bash", str(SCRIPT), "--cpu-dry-run", "--out", str(out), *args],
                       capture_output=True, text=True, timeout=timeout, env=env)  # fmt: skip
    summary = out / "summary.json"
    return p, (json.loads(summary.read_text()) if summary.is_file() else {})


def test_dry_run_runs_every_phase_and_reports_the_planted_hang(tmp_path):
    p, summary = _run(tmp_path)
    out = tmp_path / "out"
    assert summary["dry_run"] is True and summary["budget_s"] == 480
    assert [r["phase"] for r in summary["phases"]] == PHASES
    by = {r["phase"]: r for r in summary["phases"]}
    smoke = by["smoke"]
    assert smoke["planted"] == {"status": "hang", "hang_op": "_planted_sleep"}  # not a crash
    for name in ("build", "tests", "bench", "train"):  # stand-ins: the command logic ran
        assert by[name]["status"] == "ok", by[name]
    assert "dry run, would run:" in (out / "phases" / "01-build.log").read_text()
    assert by["build"]["ptxas_lines"] == 1 and by["build"]["arch"] == "dry-run"
    assert (out / "ptxas.txt").read_text().startswith("ptxas info")
    log = (out / "phases" / "03-tests.log").read_text()
    assert "VDMPP_REQUIRE_CUDA" not in log and "--timeout=90" in log and "csrc/tests" in log
    for i, name in enumerate(PHASES, 1):  # each phase's own record and log
        rec = json.loads((out / "phases" / f"{i:02d}-{name}.json").read_text())
        assert rec["phase"] == name and rec["log"] == f"phases/{i:02d}-{name}.log"
        assert (out / rec["log"]).is_file()
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"summary.json", "phases/07-train.json", "phases/02-smoke.log"} <= names
    if _kernels_built():
        for name in ("smoke", "exactness", "graphs"):
            assert by[name]["status"] == "ok", by[name]
        assert len(smoke["ops_ok"]) == 7
        cases = by["exactness"]["result"]["cases"]
        assert len(cases) == 6 and all(c["correction"] and c["euler"] and c["churn"] for c in cases)
        assert p.returncode == 0, p.stdout + p.stderr
    else:
        assert by["smoke"]["status"] == "failed" and p.returncode == 1


def test_budget_skips_late_phases_with_a_record(tmp_path):
    _, summary = _run(tmp_path, "--budget", "6", "--only", "build,smoke,train")
    by = {r["phase"]: r for r in summary["phases"]}
    assert list(by) == ["build", "smoke", "train"]
    assert by["build"]["status"] == "ok"
    assert by["train"]["status"] == "skipped" and "budget" in by["train"]["why"]
    assert by["smoke"]["limit_s"] <= 6


def test_bad_arguments_are_refused(tmp_path):
    p, summary = _run(tmp_path, "--only", "build,nope", timeout=60)
    assert p.returncode == 2 and "unknown phase" in p.stderr and summary == {}
    p, _ = _run(tmp_path, "--budget", "0", timeout=60)
    assert p.returncode == 2 and "--budget" in p.stderr


@pytest.mark.parametrize("flag", ["--help"])
def test_help_lists_the_options(flag):
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), flag],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 0 and "--cpu-dry-run" in p.stdout and "--budget" in p.stdout
