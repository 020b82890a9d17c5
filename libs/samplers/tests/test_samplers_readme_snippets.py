"""Every ```python block of the root README.md and of libs/*/README.md runs as pasted.

Each block is executed on its own, in a fresh namespace, on the CPU. A block that imports a
vdmpp library that is not installed here is skipped with the reason (each library's tests run in
a venv with only that library and its dependencies);
apps/eval/tests/test_eval_readme_snippets.py runs the same blocks where every library is
installed and refuses to skip.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).resolve()
ROOT = _HERE.parents[min(3, len(_HERE.parents) - 1)]  # the clone (libs/samplers/tests/..)
if not (ROOT / "README.md").is_file() or not (ROOT / "libs").is_dir():
    # `nox -s release` runs these tests against an installed wheel, outside the clone
    pytest.skip("the repository's READMEs are not here", allow_module_level=True)
_FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
_IMPORT = re.compile(r"^\s*(?:from|import)\s+(vdmpp\.\w+)", re.M)


@dataclass(frozen=True)
class Snippet:
    path: Path
    line: int
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def modules(self) -> list[str]:
        return sorted(set(_IMPORT.findall(self.code)))


def readme_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "libs").glob("*/README.md"))]


def snippets() -> list[Snippet]:
    out = []
    for path in readme_files():
        if not path.exists():
            continue
        text = path.read_text(encoding="utf-8")
        for m in _FENCE.finditer(text):
            out.append(Snippet(path, text.count("\n", 0, m.start()) + 1, m.group(1)))
    return out


def missing_modules(snippet: Snippet) -> list[str]:
    return [m for m in snippet.modules if importlib.util.find_spec(m) is None]


def run_snippet(snippet: Snippet, *, allow_skip: bool) -> None:
    missing = missing_modules(snippet)
    if missing:
        if allow_skip:
            pytest.skip(f"{snippet.id} needs {', '.join(missing)} (not installed here)")
        raise AssertionError(f"{snippet.id} needs {', '.join(missing)}, which is not installed")
    torch.manual_seed(0)
    code = compile(snippet.code, f"<{snippet.id}>", "exec")
    exec(code, {"__name__": f"readme_{snippet.line}"})  # the repository's own README, by design


SNIPPETS = snippets()


def test_the_readmes_have_python_snippets():
    files = {s.path.name if s.path.parent == ROOT else s.path.parent.name for s in SNIPPETS}
    assert "README.md" in files and {"samplers", "losses"} <= files


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.id for s in SNIPPETS])
def test_readme_snippet_runs(snippet: Snippet, capsys):
    run_snippet(snippet, allow_skip=True)


def test_a_broken_or_unrunnable_snippet_fails():
    readme = ROOT / "README.md"
    with pytest.raises(NameError):
        run_snippet(Snippet(readme, 1, "x0 = heun(D, noise, sigmas)\n"), allow_skip=True)
    missing = Snippet(readme, 1, "from vdmpp.nonexistent import thing\n")
    assert missing.modules == ["vdmpp.nonexistent"]
    with pytest.raises(AssertionError, match="not installed"):
        run_snippet(missing, allow_skip=False)
