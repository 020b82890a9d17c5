"""Build and test vdmpp: every library in a venv of its own (the proof that it installs alone)."""

from __future__ import annotations

import os
from pathlib import Path

import nox

ROOT = Path(__file__).parent
LIBS = ["schedules", "losses", "samplers", "models"]
# The CPU wheel pinned here keeps CI off the multi-GB CUDA wheels; override on a GPU box,
# e.g. VDMPP_TORCH="torch==2.11.0" VDMPP_TORCHVISION="torchvision==0.26.0" (the torchvision
# that matches, which torch-fidelity needs in the apps session).
TORCH = os.environ.get("VDMPP_TORCH", "torch==2.13.0")
TORCHVISION = os.environ.get("VDMPP_TORCHVISION", "torchvision==0.28.0")

nox.options.sessions = ["lint", "tests", "kernels", "kernels_cuda_compile", "apps"]
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = False


def _install_torch(session: nox.Session, *extra: str) -> None:
    """Install the pinned torch first (with any packages that must match it, in one resolve)."""
    if TORCH:
        session.install(TORCH, *[e for e in extra if e])


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
    _install_torch(session, TORCHVISION)
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


# --- vdmpp-kernels (csrc/) ----------------------------------------------------------------------
KERNEL_TEST_LIBS = ["schedules", "samplers"]  # whose tests also exercise the kernel dispatch


def _install_kernels(session: nox.Session, *, cuda: bool) -> None:
    """torch, the build tools, then `pip install --no-build-isolation ./csrc` and the libs."""
    _install_torch(session)
    session.install("setuptools>=64", "wheel", "ninja")
    env = {"MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    if cuda:
        env["FORCE_CUDA"] = "1"
        env["TORCH_CUDA_ARCH_LIST"] = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
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
    session.run("pytest", "csrc/tests", *session.posargs)


@nox.session
def kernels_cuda_compile(session: nox.Session) -> None:
    """Compile every csrc/**/*.cu with nvcc alone (no GPU needed): catches CUDA compile errors."""
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
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0").replace(" ", ";").split(";")
    gencode = []
    for a in filter(None, archs):
        cc = a.replace("+PTX", "").replace(".", "")
        gencode.append(f"-gencode=arch=compute_{cc},code=sm_{cc}")
    out = Path(session.create_tmp()) / "nvcc"
    out.mkdir(parents=True, exist_ok=True)
    sources = sorted((ROOT / "csrc").rglob("*.cu"))
    if not sources:
        session.error("no .cu files under csrc/")
    for cu in sources:
        session.run(
            nvcc, "-c", str(cu), "-o", str(out / f"{cu.stem}.o"), "-std=c++20", "-O3",
            "-Xcompiler", "-fPIC", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-lineinfo",
            *gencode, *flags, external=True,
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
