"""Build and test vdmpp: every library in a venv of its own (the proof that it installs alone)."""

from __future__ import annotations

import os
from pathlib import Path

import nox

ROOT = Path(__file__).parent
LIBS = ["schedules", "losses", "samplers", "models"]
# The CPU wheel pinned here keeps CI off the multi-GB CUDA wheels; override on a GPU box,
# e.g. VDMPP_TORCH="torch==2.11.0" (or "" to keep a preinstalled torch with --system-site).
TORCH = os.environ.get("VDMPP_TORCH", "torch==2.13.0")

nox.options.sessions = ["lint", "tests", "kernels", "kernels_cuda_compile", "apps"]
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = False


def _install_torch(session: nox.Session) -> None:
    if TORCH:
        session.install(TORCH)


@nox.session
@nox.parametrize("lib", LIBS)
def tests(session: nox.Session, lib: str) -> None:
    """Install one library alone (plus its declared deps) and run its tests."""
    _install_torch(session)
    session.install(f"./libs/{lib}[test]")
    session.run("pytest", f"libs/{lib}/tests", *session.posargs)


@nox.session
def apps(session: nox.Session) -> None:
    """Install the train and eval apps (which pull every library) and run their tests."""
    _install_torch(session)
    apps = [d for d in ("train", "eval") if (ROOT / "apps" / d / "pyproject.toml").exists()]
    if not apps:
        session.skip("no apps yet")
    session.install(*[f"./apps/{d}[test]" for d in apps])
    session.run("pytest", *[f"apps/{d}/tests" for d in apps], *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff over the whole tree with the root configuration."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", ".")
