"""csrc/setup.py's build switches: FORCE_CUDA=0/1 both honoured, the default arch list has PTX."""

from __future__ import annotations

import ast
import types
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / "setup.py"
pytestmark = pytest.mark.skipif(not SETUP.is_file(), reason="needs the csrc/ sources")


def _setup_namespace(env: dict[str, str], torch_cuda: str | None, cuda_home: str | None):
    """DEFAULT_ARCH_LIST and _build_cuda from setup.py, run against a stub torch/CUDA_HOME."""
    tree = ast.parse(SETUP.read_text())
    keep = [
        n for n in tree.body
        if (isinstance(n, ast.FunctionDef) and n.name == "_build_cuda")
        or (isinstance(n, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "DEFAULT_ARCH_LIST" for t in n.targets))
    ]  # fmt: skip
    assert len(keep) == 2, "setup.py must define DEFAULT_ARCH_LIST and _build_cuda"
    ns = {
        "os": types.SimpleNamespace(environ=env),
        "torch": types.SimpleNamespace(version=types.SimpleNamespace(cuda=torch_cuda)),
        "CUDA_HOME": cuda_home,
    }
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(SETUP), "exec"), ns)
    return ns


@pytest.mark.parametrize(
    ("force", "torch_cuda", "home", "expect"),
    [
        (None, "12.8", "/usr/local/cuda", True),  # auto: a CUDA torch and a toolkit
        (None, None, "/usr/local/cuda", False),  # auto: a CPU torch
        (None, "12.8", None, False),  # auto: no toolkit
        ("0", "12.8", "/usr/local/cuda", False),  # FORCE_CUDA=0 turns CUDA off
        ("1", None, "/usr/local/cuda", True),  # FORCE_CUDA=1 turns it on
        ("1", "12.8", None, SystemExit),  # ... and says why it cannot
        ("yes", "12.8", "/usr/local/cuda", SystemExit),  # anything else is an error
    ],
)
def test_force_cuda(force, torch_cuda, home, expect):
    env = {} if force is None else {"FORCE_CUDA": force}
    build_cuda = _setup_namespace(env, torch_cuda, home)["_build_cuda"]
    if expect is SystemExit:
        with pytest.raises(SystemExit, match="FORCE_CUDA"):
            build_cuda()
    else:
        assert build_cuda() is expect


def test_default_arch_list_has_ptx_for_newer_gpus():
    archs = _setup_namespace({}, None, None)["DEFAULT_ARCH_LIST"].split(";")
    assert any(a.endswith("+PTX") for a in archs)
    newest = max(float(a.removesuffix("+PTX")) for a in archs)
    assert f"{newest}+PTX" in archs or f"{newest:.1f}+PTX" in archs  # PTX of the newest arch
