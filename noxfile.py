"""Build, test and release vdmpp: every library in a venv of its own (the proof that it installs
alone), every built wheel installed outside the clone, and the lowest declared versions tested."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import nox

ROOT = Path(__file__).parent
sys.path.insert(0, str(ROOT / "scripts"))
from dists import LIBRARIES, SOURCES, closure  # noqa: E402  (scripts/dists.py: release helpers)

LIBS = ["schedules", "losses", "samplers", "models"]
# The CPU wheel pinned here keeps CI off the multi-GB CUDA wheels; override on a GPU box,
# e.g. VDMPP_TORCH="torch==2.11.0" VDMPP_TORCHVISION="torchvision==0.26.0" (the torchvision
# that matches, which torch-fidelity needs in the apps session).
TORCH = os.environ.get("VDMPP_TORCH", "torch==2.13.0")
TORCHVISION = os.environ.get("VDMPP_TORCHVISION", "torchvision==0.28.0")
# The lowest torch the libraries declare (`torch>=2.4` in every pyproject): `nox -s compat` runs
# the library tests on it. PyPI only has CUDA builds of it for x86-64 Linux (~2.5 GB with the
# nvidia wheels), which run fine on a CPU.
TORCH_FLOOR = os.environ.get("VDMPP_TORCH_FLOOR", "torch==2.4.1")

# `tests` (each library from its source directory) is not in the default list: `release` runs
# the same tests against each library's built wheel installed alone outside the clone, which is
# the stronger check, and CI time goes to `compat` instead.
nox.options.sessions = ["lint", "kernels", "kernels_cuda_compile", "apps", "release", "compat"]
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = False


def _install_torch(session: nox.Session, *extra: str) -> None:
    """Install the pinned torch first (with any packages that must match it, in one resolve)."""
    if TORCH:
        session.install(TORCH, *[e for e in extra if e])


def _local(dist: str, extras: str = "") -> str:
    """pip argument installing DIST from its monorepo sources, e.g. './libs/losses[test]'."""
    return f"./{SOURCES[dist]}{extras}"


def _with_siblings(dist: str, extras: str = "[test]") -> list[str]:
    """DIST plus every vdmpp sibling it needs, all from local sources, for one pip command.

    Published metadata names siblings by version range only (`vdmpp-schedules>=0.2,<0.3`); a
    pip command that also names the sibling's source directory resolves the range to it, so no
    index (and no path in any metadata) is involved.
    """
    return [_local(d) for d in closure(dist)] + [_local(dist, extras)]


@nox.session
@nox.parametrize("lib", LIBS)
def tests(session: nox.Session, lib: str) -> None:
    """Install one library alone (plus its declared deps) and run its tests."""
    _install_torch(session)
    session.install(*_with_siblings(f"vdmpp-{lib}"))
    session.run("pytest", f"libs/{lib}/tests", *session.posargs)


@nox.session
def apps(session: nox.Session) -> None:
    """Install the train and eval apps (which pull every library) and run their tests."""
    _install_torch(session, TORCHVISION)
    libs = [_local(d) for d in closure("vdmpp-eval") if d in LIBRARIES]
    # [tensorboard]: test_logging's TensorBoard test runs here rather than being skipped
    session.install(*libs, "./apps/train[test,tensorboard]", "./apps/eval[test]")
    session.run("pytest", "apps/train/tests", "apps/eval/tests", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff over the whole tree with the root configuration."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", ".")


# --- vdmpp-kernels (csrc/) ----------------------------------------------------------------------
KERNEL_TEST_LIBS = ["schedules", "samplers"]  # whose tests also exercise the kernel dispatch
# csrc/setup.py's default: SASS for Turing, Ampere, Hopper + PTX so newer GPUs JIT-compile it
CUDA_ARCHS = os.environ.get("TORCH_CUDA_ARCH_LIST", "7.5;8.0;9.0+PTX")


def _install_kernels(session: nox.Session, *, cuda: bool) -> None:
    """torch, the build tools, then `pip install --no-build-isolation ./csrc` and the libs."""
    _install_torch(session)
    session.install("setuptools>=64", "wheel", "ninja")
    env = {"MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    if cuda:
        env["FORCE_CUDA"] = "1"
        env["TORCH_CUDA_ARCH_LIST"] = CUDA_ARCHS
    session.install("--no-build-isolation", "./csrc", env=env)
    libs = [
        f"./libs/{n}[test]"
        for n in KERNEL_TEST_LIBS
        if (ROOT / "libs" / n / "pyproject.toml").exists()
    ]
    session.install(*libs)


@nox.session
def kernels(session: nox.Session) -> None:
    """Build vdmpp-kernels (CPU) and run its tests against the pure-PyTorch references."""
    _install_kernels(session, cuda=False)
    # + the train app and every library it pulls: csrc/tests train digits through the fused
    # adaptive ops and trace a training step (losses) and a sampling call for host syncs
    session.install(*[_local(d) for d in closure("vdmpp-train") if d in LIBRARIES], "./apps/train")
    # + scripts/gpu_check.sh --cpu-dry-run, whose exactness/graph workers need the built ops
    session.run("pytest", "csrc/tests", "scripts/tests/test_gpu_check.py", *session.posargs)


def _nvcc_flags() -> list[str]:
    """csrc/nvcc_flags.py's flags (the list csrc/setup.py builds with): warnings are errors."""
    import importlib.util

    path = ROOT / "csrc" / "nvcc_flags.py"
    spec = importlib.util.spec_from_file_location("vdmpp_nvcc_flags", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.nvcc_flags()


@nox.session
def kernels_cuda_compile(session: nox.Session) -> None:
    """Compile every csrc/**/*.cu with nvcc alone (no GPU needed), warnings as errors (the flags
    of csrc/nvcc_flags.py, as the build): catches CUDA compile errors and, e.g., a host function
    that calls itself forever (-Werror=infinite-recursion)."""
    import shutil

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        session.skip("nvcc is not on PATH: install a CUDA toolkit to compile-check csrc/cuda")
    _install_torch(session)
    out_text = session.run(
        "python",
        "-W",
        "ignore",
        "-c",
        "import sysconfig, torch.utils.cpp_extension as c; "
        "print('\\n'.join(['-I' + p for p in c.include_paths()] "
        "+ ['-I' + sysconfig.get_paths()['include']] + c.COMMON_NVCC_FLAGS))",
        silent=True,
    )
    flags = [f for f in str(out_text).split() if f.startswith("-")]  # stderr is mixed in
    gencode = []
    for a in filter(None, CUDA_ARCHS.replace(" ", ";").split(";")):
        cc = a.replace("+PTX", "").replace(".", "")
        gencode.append(f"-gencode=arch=compute_{cc},code=sm_{cc}")
        if a.endswith("+PTX"):  # the PTX that forward-compatible drivers JIT for newer GPUs
            gencode.append(f"-gencode=arch=compute_{cc},code=compute_{cc}")
    out = Path(session.create_tmp()) / "nvcc"
    out.mkdir(parents=True, exist_ok=True)
    sources = sorted((ROOT / "csrc").rglob("*.cu"))
    if not sources:
        session.error("no .cu files under csrc/")
    for cu in sources:
        session.run(
            nvcc, "-c", str(cu), "-o", str(out / f"{cu.stem}.o"),
            "-Xcompiler", "-fPIC", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
            *_nvcc_flags(), *gencode, *flags, external=True,
        )  # fmt: skip


@nox.session(default=False)
def gpu(session: nox.Session) -> None:
    """Build vdmpp-kernels with CUDA, run every test and the benchmark on a GPU (fails without)."""
    _install_torch(session)  # a CUDA build of torch: set VDMPP_TORCH (see TORCH above)
    probe = session.run(
        "python", "-W", "ignore", "-c", "import torch; print(torch.cuda.is_available())",
        silent=True,
    )  # fmt: skip
    if not probe or str(probe).strip().splitlines()[-1] != "True":
        session.error("no CUDA GPU visible to torch (torch.cuda.is_available() is False)")
    _install_kernels(session, cuda=True)
    env = {"VDMPP_REQUIRE_CUDA": "1"}  # csrc/tests refuse to skip their CUDA variants
    tests = ["csrc/tests"] + [
        f"libs/{n}/tests" for n in KERNEL_TEST_LIBS if (ROOT / "libs" / n / "tests").is_dir()
    ]
    session.run("pytest", *tests, *session.posargs, env=env)
    session.run("python", "bench/kernels.py", "--device", "cuda", env=env)


# --- development setup and releases ------------------------------------------------------------
DEV_VENV = ROOT / ".venv"


def _editable_args() -> list[str]:
    """One pip command: every library and both apps editable, with their test extras."""
    args = []
    for dist in (*LIBRARIES, "vdmpp-train", "vdmpp-eval"):
        args += ["-e", _local(dist, "[test]")]
    return args


@nox.session(venv_backend="none", default=False)
def dev(session: nox.Session) -> None:
    """Create ./.venv with every library and both apps editable; then `.venv/bin/pytest libs`."""
    py = DEV_VENV / "bin" / "python"
    if not py.exists():
        session.run(sys.executable, "-m", "venv", str(DEV_VENV), external=True)
    pip = [str(py), "-m", "pip", "install"]
    session.run(*pip, TORCH, TORCHVISION, external=True)
    session.run(*pip, *_editable_args(), "ruff>=0.5", "nox>=2024.3", external=True)
    if "--kernels" in session.posargs:  # the C++ extension, built against the torch just installed
        session.run(*pip, "setuptools>=77", "wheel", "ninja", external=True)
        session.run(*pip, "--no-build-isolation", "./csrc", external=True)
    session.log(f"ready: . {DEV_VENV}/bin/activate && pytest libs/losses/tests")


def _outside_venv(session: nox.Session, where: Path, *packages: str) -> Path:
    """A fresh venv at WHERE (outside the clone) with torch and PACKAGES from the index."""
    session.run("python", "-m", "venv", str(where))
    py = where / "bin" / "python"
    session.run(str(py), "-m", "pip", "install", "--quiet", "--no-compile", TORCH, *packages,
                external=True)  # fmt: skip
    return py


def _check_installed(session: nox.Session, py: Path, dist: str) -> None:
    """DIST imports from PY's site-packages (not from the clone) at its pyproject version."""
    mod = "vdmpp." + dist.removeprefix("vdmpp-")
    src = str(ROOT / SOURCES[dist])
    session.run(
        str(py), "-c",
        f"import {mod} as m; f = m.__file__; "
        f"assert 'site-packages' in f and not f.startswith({src!r}), f; "
        f"assert m.__version__ == {_project_version(dist)!r}, m.__version__; "
        f"print('{dist}', m.__version__, 'from', f)",
        external=True,
    )  # fmt: skip


def _test_installed(session: nox.Session, py: Path, dist: str, tests: Path, *args: str) -> None:
    """Run TESTS (copied next to the venv) against DIST as installed in PY's venv, not the clone."""
    _check_installed(session, py, dist)
    copy = py.parent.parent / "tests" / dist
    shutil.copytree(tests, copy, dirs_exist_ok=True)
    (copy / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: slow test\n")
    with session.chdir(copy):
        session.run(str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    "--import-mode=importlib", ".", *args, external=True)  # fmt: skip


def _project_version(dist: str) -> str:
    from dists import project

    return project(dist)["version"]


@nox.session
def release(session: nox.Session) -> None:
    """Build every sdist + wheel, check metadata, test each installed alone outside the clone.

    Posargs: `--reuse-dist` skips the build when dist/ holds wheels; `libs`, `apps`, `editable`
    pick parts of the install tests (default: all); `--keep` leaves the venvs in /tmp.
    """
    _install_torch(session)
    session.install("build>=1", "twine>=6.1", "packaging", "pytest>=7", "setuptools>=77", "wheel",
                    "ninja")  # fmt: skip
    dist = ROOT / "dist"
    if "--reuse-dist" in session.posargs and any(dist.glob("*.whl")):
        _test_wheelhouse(session, dist)  # iterate on the install/test half only
        return
    shutil.rmtree(dist, ignore_errors=True)
    for name, src in SOURCES.items():
        if name == "vdmpp-kernels":  # setup.py imports torch: build against the installed one
            session.run("python", "-m", "build", "--sdist", "--no-isolation", "--outdir", str(dist),
                        src)  # fmt: skip
        else:  # sdist, then the wheel built from the unpacked sdist (proves the sdist complete)
            session.run("python", "-m", "build", "--outdir", str(dist), src)
    # vdmpp-kernels' wheel is built from its sdist, as a user does: against the installed torch.
    sdist = next(dist.glob("vdmpp_kernels-*.tar.gz"))
    env = {"MAX_JOBS": os.environ.get("MAX_JOBS", "2"), "FORCE_CUDA": "0"}
    session.run("python", "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w",
                str(dist), str(sdist), env=env)  # fmt: skip
    artifacts = sorted(str(p) for p in dist.iterdir() if p.suffix in (".whl", ".gz"))
    session.run("twine", "check", "--strict", *artifacts)
    session.run("python", "scripts/dists.py", "check", str(dist))
    session.run("pytest", "-q", "scripts/tests")
    _test_wheelhouse(session, dist)


def _test_wheelhouse(session: nox.Session, dist: Path) -> None:
    """Each library alone from DIST in a venv outside the clone, then kernels, apps, editable."""
    work = Path(tempfile.mkdtemp(prefix="vdmpp-release-"))  # outside the repository
    session.log(f"installing from {dist} into venvs under {work}")
    parts = {"libs", "apps", "editable"} & set(session.posargs) or {"libs", "apps", "editable"}
    try:
        for lib in LIBRARIES if "libs" in parts else []:  # each alone: its wheel, siblings, torch
            tests_extra = _project_extra(lib, "test")
            py = _outside_venv(session, work / lib, *tests_extra)
            session.run(str(py), "-m", "pip", "install", "--quiet", "--no-index", "--find-links",
                        str(dist), lib, external=True)  # fmt: skip
            session.run(str(py), "-m", "pip", "check", external=True)
            _test_installed(session, py, lib, ROOT / SOURCES[lib] / "tests")
            if lib == "vdmpp-samplers":  # the [kernels] extra resolves from the same wheelhouse
                session.run(str(py), "-m", "pip", "install", "--quiet", "--no-index",
                            "--find-links", str(dist), "vdmpp-samplers[kernels]",
                            external=True)  # fmt: skip
                _test_installed(session, py, "vdmpp-kernels", ROOT / "csrc" / "tests")
                _test_installed(session, py, lib, ROOT / SOURCES[lib] / "tests", "-k", "kernel")
        if "apps" in parts:
            _release_apps(session, work, dist)
        if "editable" in parts:
            _editable_in_one_command(session, work)
    finally:
        if "--keep" not in session.posargs:
            shutil.rmtree(work, ignore_errors=True)


def _project_extra(dist: str, extra: str) -> list[str]:
    from dists import project

    return list(project(dist).get("optional-dependencies", {}).get(extra, []))


def _release_apps(session: nox.Session, work: Path, dist: Path) -> None:
    """Both apps from the wheelhouse (third-party deps from the index): train, sample, bits/dim."""
    py = _outside_venv(session, work / "apps", TORCHVISION)
    ours = [d for d in SOURCES if d != "vdmpp-kernels"]
    # vdmpp distributions only from the wheelhouse (no index can shadow them), then their deps
    session.run(str(py), "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                "--find-links", str(dist), *ours, external=True)  # fmt: skip
    session.run(str(py), "-m", "pip", "install", "--quiet", "--find-links", str(dist),
                "vdmpp-train", "vdmpp-eval", external=True)  # fmt: skip
    session.run(str(py), "-m", "pip", "check", external=True)
    for d in ours:
        _check_installed(session, py, d)
    bin_ = py.parent
    run = work / "apps" / "run"
    small = ["--set", "steps=20", "--set", "batch.global=8", "--set", "log.progress=false",
             "--set", "sample.every=0", "--set", f"out={run}", "--set",
             "model.overrides={model_channels=16, channel_mult=[1, 2], num_res_blocks=1, "
             "attention_resolutions=[], head_channels=16}"]  # fmt: skip
    with session.chdir(work):
        session.run(str(bin_ / "vdmpp-train"), "digits", *small, external=True)
        session.run(str(bin_ / "vdmpp-eval"), "sample", str(run), "--seeds", "0-7",
                    "--steps", "4", "--out", str(work / "apps" / "samples"), "--no-progress",
                    external=True)  # fmt: skip
        session.run(str(bin_ / "vdmpp-eval"), "bpd", str(run), "--data", "digits:test",
                    "--limit", "64", "--no-progress", external=True)  # fmt: skip


def _editable_in_one_command(session: nox.Session, work: Path) -> None:
    """`pip install -e` of every library and both apps in one command resolves (what `dev` runs)."""
    py = _outside_venv(session, work / "editable", TORCHVISION)
    with session.chdir(ROOT):
        session.run(str(py), "-m", "pip", "install", "--quiet", *_editable_args(), external=True)
    session.run(str(py), "-m", "pip", "check", external=True)
    session.run(
        str(py), "-c",
        "import vdmpp.schedules, vdmpp.losses, vdmpp.samplers, vdmpp.models, vdmpp.train, "
        f"vdmpp.eval as e; assert e.__file__.startswith({str(ROOT)!r}), e.__file__",
        external=True,
    )  # fmt: skip


@nox.session
def compat(session: nox.Session) -> None:
    """Test each library against the lowest torch and lowest vdmpp siblings it declares."""
    session.install(TORCH_FLOOR, "packaging")
    session.run("python", "-c", "import torch; print('lowest torch:', torch.__version__)")
    libs = [f"vdmpp-{lib}" for lib in LIBS if not session.posargs or lib in session.posargs]
    for dist in libs:
        wheels = Path(session.create_tmp()) / "lowest" / dist
        shutil.rmtree(wheels, ignore_errors=True)
        session.run("python", "scripts/dists.py", "lowest", dist, str(wheels))
        # one library at a time: nothing of vdmpp's left from the previous one
        session.run("python", "-m", "pip", "uninstall", "--quiet", "-y", *SOURCES)
        lowest = sorted(str(p) for p in wheels.glob("*.whl"))
        # this tree's library on its siblings' lowest versions (wheels built from git history)
        session.install("--no-deps", *lowest, f"./{SOURCES[dist]}")
        session.install(*_project_extra(dist, "test"))
        session.run("python", "-m", "pip", "check")
        _test_installed(session, Path(session.bin) / "python", dist, ROOT / SOURCES[dist] / "tests")
