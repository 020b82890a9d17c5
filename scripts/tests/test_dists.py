"""The release checker (scripts/dists.py) refuses what an index must never receive."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dists

README = "# vdmpp-losses\n\n" + "Weighted ELBO losses over log-SNR. " * 10


def metadata(*requires: str, version: str = "0.2.0", license_: bool = True) -> str:
    head = [
        "Metadata-Version: 2.4",
        "Name: vdmpp-losses",
        f"Version: {version}",
        "Project-URL: Homepage, https://github.com/vdmpp/vdmpp",
        "Description-Content-Type: text/markdown",
    ]
    if license_:
        head.append("License-Expression: Apache-2.0")
    head += [f"Requires-Dist: {r}" for r in requires]
    return "\n".join(head) + "\n\n" + README


def test_a_version_range_passes():
    text = metadata("torch>=2.4", "vdmpp-schedules<0.3,>=0.2", "numpy; extra == 'test'")
    assert dists.problems_in_metadata(text, where="w", version="0.2.0") == []


@pytest.mark.parametrize(
    "req",
    [
        "vdmpp-schedules @ file:///home/ci/vdmpp/libs/schedules",
        "vdmpp-schedules @ https://example.org/vdmpp_schedules-0.2.0-py3-none-any.whl",
        "vdmpp-schedules @ git+https://github.com/vdmpp/vdmpp#subdirectory=libs/schedules",
    ],
)
def test_a_url_or_path_is_refused(req):
    problems = dists.problems_in_metadata(metadata(req), where="w", version="0.2.0")
    assert any("URL or path" in p for p in problems), problems


@pytest.mark.parametrize("req", ["vdmpp-schedules>=0.2", "vdmpp-schedules<0.3", "vdmpp-schedules"])
def test_a_sibling_range_needs_both_bounds(req):
    problems = dists.problems_in_metadata(metadata(req), where="w", version="0.2.0")
    assert any("bound" in p for p in problems), problems


def test_version_license_and_readme_are_checked():
    text = metadata("torch>=2.4", version="0.1.0", license_=False)
    problems = dists.problems_in_metadata(text.replace(README, "short"), where="w", version="0.2.0")
    assert any("Version 0.1.0" in p for p in problems)
    assert any("license" in p for p in problems)
    assert any("long description" in p for p in problems)


def test_check_reads_wheels(tmp_path):
    """A wheel with a path dependency, no LICENSE and no py.typed: three problems, one artifact."""
    whl = tmp_path / "vdmpp_losses-0.2.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("vdmpp/losses/__init__.py", "")
        z.writestr(
            "vdmpp_losses-0.2.0.dist-info/METADATA",
            metadata("vdmpp-schedules @ file:///tmp/x/libs/schedules"),
        )
    problems = dists.check(tmp_path)
    assert any("URL or path" in p for p in problems)
    assert any("LICENSE" in p for p in problems)
    assert any("py.typed" in p for p in problems)
    # package data git tracks but the wheel lacks (a sdist that dropped the shipped configs)
    assert any("vdmpp/losses/weightings.py (tracked in git) is missing" in p for p in problems)
    assert any("expected an sdist and a wheel" in p for p in problems)


def test_closure_is_in_dependency_order():
    order = list(dists.SOURCES)
    for dist in dists.SOURCES:
        sibs = dists.closure(dist)
        assert dist not in sibs
        assert all(order.index(s) < order.index(dist) for s in sibs), (dist, sibs)
    assert dists.closure("vdmpp-schedules") == []
    assert "vdmpp-schedules" in dists.closure("vdmpp-eval")


def test_every_sibling_range_admits_the_current_sibling():
    """The monorepo is consistent: each declared range contains the sibling's own version."""
    for dist in dists.SOURCES:
        for req in dists.sibling_requirements(dist):
            have = dists.project(req.name)["version"]
            assert req.specifier.contains(have), (dist, str(req), have)


def test_lowest_admitted_is_the_lowest_committed_version_in_range():
    src = dists.SOURCES["vdmpp-schedules"]
    current = dists.project("vdmpp-schedules")["version"]
    assert dists.lowest_admitted(SpecifierSet(f">={current}"), src) == current
    # the history holds 0.1.0 (the first release): an open range reaches back to it
    assert dists.lowest_admitted(SpecifierSet(">=0"), src) == "0.1.0"
    with pytest.raises(SystemExit):
        dists.lowest_admitted(SpecifierSet(">=99"), src)


def test_every_package_ships_license_and_changelog():
    root = dists.ROOT
    for src in dists.SOURCES.values():
        assert (root / src / "LICENSE").read_bytes() == (root / "LICENSE").read_bytes(), src
        assert "## " in (root / src / "CHANGELOG.md").read_text(), src


def test_no_file_cites_the_seed_texts():
    """Docs and docstrings cite the papers (VDM++, VDM, EDM), never this repo's seed files."""
    import re
    import subprocess

    files = subprocess.run(
        ["git", "ls-files"], cwd=dists.ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    pattern = re.compile(r"\bseeds? 00[0-4]\b|\b00[0-4]_[0-9a-f]{16}\.txt\b", re.I)
    hits = []
    for name in files:
        path = dists.ROOT / name
        if path.suffix not in {".py", ".md", ".toml", ".cpp", ".cu", ".cuh", ".h", ".sh", ".txt"}:
            continue
        if not path.is_file():
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{name}:{i}: {line.strip()}")
    assert not hits, "cite the paper, not the seed file:\n" + "\n".join(hits[:20])
