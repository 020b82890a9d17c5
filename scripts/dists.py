"""Release helpers for vdmpp's distributions (used by `nox -s release` and `nox -s compat`).

    python scripts/dists.py check DIST_DIR        # metadata of every sdist/wheel in DIST_DIR
    python scripts/dists.py lowest DIST OUT_DIR   # build each vdmpp sibling DIST declares at the
                                                  # lowest version its range admits (from git)

`check` fails when a `Requires-Dist` names a URL or a path (published metadata must name siblings
by version range), when a sibling range has no upper bound, when LICENSE, README or `py.typed` is
missing, or when the version in the artifact differs from the package's pyproject.toml.
"""

from __future__ import annotations

import email.parser
import io
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
# distribution -> source directory, in dependency order (a package after every sibling it needs)
SOURCES: dict[str, str] = {
    "vdmpp-schedules": "libs/schedules",
    "vdmpp-losses": "libs/losses",
    "vdmpp-samplers": "libs/samplers",
    "vdmpp-models": "libs/models",
    "vdmpp-kernels": "csrc",
    "vdmpp-train": "apps/train",
    "vdmpp-eval": "apps/eval",
}
LIBRARIES = ["vdmpp-schedules", "vdmpp-losses", "vdmpp-samplers", "vdmpp-models"]
# A Requires-Dist that points somewhere instead of naming a version range.
_PATHLIKE = re.compile(r"(@|file:|://|\{root|(^|\s)\.{0,2}/|\\)")


def project(dist: str) -> dict:
    """The [project] table of DIST's pyproject.toml."""
    return tomllib.loads((ROOT / SOURCES[dist] / "pyproject.toml").read_text())["project"]


def sibling_requirements(dist: str) -> list[Requirement]:
    """The vdmpp siblings DIST depends on at runtime (extras excluded)."""
    reqs = [Requirement(r) for r in project(dist).get("dependencies", [])]
    return [r for r in reqs if canonicalize_name(r.name) in SOURCES]


def closure(dist: str) -> list[str]:
    """DIST's vdmpp siblings, transitively, in dependency order (DIST itself excluded)."""
    seen: set[str] = set()

    def visit(d: str) -> None:
        for r in sibling_requirements(d):
            name = canonicalize_name(r.name)
            if name not in seen:
                seen.add(name)
                visit(name)

    visit(dist)
    return [d for d in SOURCES if d in seen]


def problems_in_metadata(text: str, *, where: str, version: str | None) -> list[str]:
    """Everything wrong with one METADATA / PKG-INFO text (empty list: publishable)."""
    msg = email.parser.Parser().parsestr(text)
    out = []
    name = msg.get("Name", "?")
    if version is not None and msg.get("Version") != version:
        out.append(f"{where}: Version {msg.get('Version')} != pyproject's {version}")
    for raw in msg.get_all("Requires-Dist") or []:
        try:
            req = Requirement(raw)
        except InvalidRequirement as e:
            out.append(f"{where}: unparsable Requires-Dist {raw!r}: {e}")
            continue
        if req.url or _PATHLIKE.search(raw.split(";")[0]):
            out.append(f"{where}: Requires-Dist {raw!r} names a URL or path, not a version range")
        if canonicalize_name(req.name) in SOURCES:
            if not any(s.operator in ("<", "<=", "==", "~=") for s in req.specifier):
                out.append(f"{where}: sibling {raw!r} has no upper bound")
            if not any(s.operator in (">=", ">", "==", "~=") for s in req.specifier):
                out.append(f"{where}: sibling {raw!r} has no lower bound")
    if not msg.get("License-Expression") and not msg.get("License"):
        out.append(f"{where}: no license in the metadata")
    body = msg.get_payload() or ""
    if len(body.strip()) < 200 or msg.get("Description-Content-Type") != "text/markdown":
        out.append(f"{where}: no markdown long description (README) for {name}")
    if not msg.get_all("Project-URL"):
        out.append(f"{where}: no Project-URL")
    return out


def tracked_package_files(dist: str) -> set[str]:
    """Wheel paths ('vdmpp/train/configs/digits.toml') of every file git tracks under src/."""
    src = ROOT / SOURCES[dist] / "src"
    ls = subprocess.run(
        ["git", "ls-files", "-z", "--", "."], cwd=src, capture_output=True, text=True, check=False
    )
    names = [n for n in ls.stdout.split("\0") if n] if ls.returncode == 0 else []
    return {n for n in names if not n.endswith((".pyc", ".so", ".o"))}


def _dist_of(filename: str) -> str:
    """'vdmpp_losses-0.2.0-py3-none-any.whl' -> 'vdmpp-losses'."""
    return canonicalize_name(re.split(r"-\d", filename, maxsplit=1)[0])


def check(dist_dir: Path) -> list[str]:
    """Check every artifact in DIST_DIR; also that each distribution has both sdist and wheel."""
    out: list[str] = []
    files = sorted(p for p in dist_dir.iterdir() if p.suffix in (".whl", ".gz"))
    kinds: dict[str, set[str]] = {}
    for p in files:
        dist = _dist_of(p.name)
        if dist not in SOURCES:
            out.append(f"{p.name}: not a vdmpp distribution")
            continue
        want = project(dist)["version"]
        kinds.setdefault(dist, set()).add("wheel" if p.suffix == ".whl" else "sdist")
        if p.suffix == ".whl":
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
                meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
                out += problems_in_metadata(z.read(meta).decode(), where=p.name, version=want)
                if not any(re.search(r"\.dist-info/licenses/LICENSE$", n) for n in names):
                    out.append(f"{p.name}: LICENSE missing from .dist-info/licenses/")
                if not any(n.endswith("/py.typed") for n in names):
                    out.append(f"{p.name}: py.typed missing")
                if any(n.startswith("vdmpp/__init__") for n in names):
                    out.append(f"{p.name}: ships vdmpp/__init__.py (vdmpp is a namespace package)")
                for missing in sorted(tracked_package_files(dist) - set(names)):
                    out.append(f"{p.name}: {missing} (tracked in git) is missing from the wheel")
        else:
            with tarfile.open(p) as t:
                names = t.getnames()
                top = names[0].split("/")[0]
                info = t.extractfile(f"{top}/PKG-INFO")
                text = info.read().decode() if info else ""
                out += problems_in_metadata(text, where=p.name, version=want)
                for need in ("LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml"):
                    if f"{top}/{need}" not in names:
                        out.append(f"{p.name}: {need} missing from the sdist")
                if not any("/tests/" in n for n in names):
                    out.append(f"{p.name}: tests missing from the sdist")
    for dist, k in kinds.items():
        if k != {"wheel", "sdist"}:
            out.append(f"{dist}: expected an sdist and a wheel, found {sorted(k)}")
    return out


def committed_versions(src: str) -> list[tuple[str, str]]:
    """(commit, version) of every commit that changed SRC/pyproject.toml, oldest first."""
    log = subprocess.run(
        ["git", "log", "--reverse", "--format=%H", "--", f"{src}/pyproject.toml"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    out = []
    for sha in log.stdout.split():
        show = subprocess.run(
            ["git", "show", f"{sha}:{src}/pyproject.toml"],
            cwd=ROOT, capture_output=True, text=True, check=False,
        )  # fmt: skip
        try:
            out.append((sha, tomllib.loads(show.stdout)["project"]["version"]))
        except (tomllib.TOMLDecodeError, KeyError):
            continue
    return out


def first_commit_at(src: str, version: str) -> str | None:
    """The oldest commit at which SRC/pyproject.toml declares VERSION (None: never committed)."""
    return next((sha for sha, v in committed_versions(src) if v == version), None)


def lowest_admitted(spec: SpecifierSet, src: str) -> str:
    """The lowest version of the sibling at SRC that SPEC admits, among those ever committed."""
    seen = {v for _, v in committed_versions(src)}
    seen.add(tomllib.loads((ROOT / src / "pyproject.toml").read_text())["project"]["version"])
    admitted = sorted(Version(v) for v in seen if spec.contains(v, prereleases=True))
    if not admitted:
        raise SystemExit(f"no committed version of {src} satisfies {spec}")
    return str(admitted[0])


def build_lowest(dist: str, out_dir: Path) -> list[str]:
    """Build a wheel of each sibling DIST needs (transitively) at the lowest admitted version.

    The sibling's sources are taken from the first commit that carried that version
    (`git archive`); a version that exists only in the working tree is built from it.
    Returns one line per sibling saying what was built from where.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    report = []
    for sib in closure(dist):
        src = SOURCES[sib]
        reqs = [r for d in [dist, *closure(dist)] for r in sibling_requirements(d)
                if canonicalize_name(r.name) == sib]  # fmt: skip
        spec = SpecifierSet(",".join(str(r.specifier) for r in reqs))
        low = lowest_admitted(spec, src)
        sha = first_commit_at(src, low)
        with tempfile.TemporaryDirectory() as tmp:
            if sha is None:
                build_src = ROOT / src
                where = "working tree"
            else:
                tar = subprocess.run(
                    ["git", "archive", "--format=tar", sha, src], cwd=ROOT, capture_output=True,
                    check=True,
                )  # fmt: skip
                with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as archive:
                    archive.extractall(tmp, filter="data")
                build_src = Path(tmp) / src
                where = f"commit {sha[:10]}"
            subprocess.run(
                [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w",
                 str(out_dir), str(build_src)],
                check=True,
            )  # fmt: skip
        report.append(f"{sib}=={low} (admitted by {spec}) built from {where}")
    return report


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "check":
        problems = check(Path(argv[1]))
        for p in problems:
            print(f"release check: {p}", file=sys.stderr)
        n = len([p for p in Path(argv[1]).iterdir() if p.suffix in (".whl", ".gz")])
        print(f"release check: {n} artifacts, {len(problems)} problems")
        return 1 if problems else 0
    if len(argv) == 3 and argv[0] == "lowest":
        for line in build_lowest(canonicalize_name(argv[1]), Path(argv[2])):
            print(f"lowest sibling: {line}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
