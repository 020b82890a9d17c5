"""The README python blocks with every library installed (the apps' venv): none may be skipped.

The extraction and the runner live in libs/samplers/tests/test_samplers_readme_snippets.py
(which skips the blocks whose libraries its own venv lacks); this file runs all of them, here
where all four libraries are installed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[3]
_RUNNER = _ROOT / "libs" / "samplers" / "tests" / "test_samplers_readme_snippets.py"
_spec = importlib.util.spec_from_file_location("_vdmpp_readme_snippets", _RUNNER)
assert _spec is not None and _spec.loader is not None
R = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = R  # dataclasses look their module up there
_spec.loader.exec_module(R)


@pytest.mark.parametrize("snippet", R.SNIPPETS, ids=[s.id for s in R.SNIPPETS])
def test_readme_snippet_runs_with_every_library(snippet, capsys):
    R.run_snippet(snippet, allow_skip=False)
