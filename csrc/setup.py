"""Build vdmpp-kernels: `pip install --no-build-isolation ./csrc` (uses the installed torch).

CUDA kernels are built when the installed torch is a CUDA build and a CUDA toolkit is found
(``CUDA_HOME``) — never because a GPU happens to be visible, so build machines without a GPU
produce the same wheel. ``FORCE_CUDA=1`` builds them regardless (an error without a toolkit),
``FORCE_CUDA=0`` never builds them (a CPU-only extension even on a CUDA box).
``TORCH_CUDA_ARCH_LIST`` picks the architectures; the default "7.5;8.0;9.0+PTX" has SASS for
Turing (T4), Ampere (A100) and Hopper (H100) and PTX of 9.0 that newer GPUs (Blackwell, ...)
JIT-compile. A GPU no image fits (e.g. a build for "9.0" on an A100) is detected at run time
(``vdmpp.kernels.device_ok``): the libraries stay on their PyTorch references with a warning.
``MAX_JOBS`` bounds the ninja build.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch
from setuptools import find_namespace_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = Path(__file__).parent.resolve()


def _nvcc_flags() -> list[str]:
    """csrc/nvcc_flags.py's list (shared with noxfile.py's kernels_cuda_compile): warnings are
    errors, no FMA contraction."""
    spec = importlib.util.spec_from_file_location("vdmpp_nvcc_flags", HERE / "nvcc_flags.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.nvcc_flags()


DEFAULT_ARCH_LIST = "7.5;8.0;9.0+PTX"


def _build_cuda() -> bool:
    force = os.environ.get("FORCE_CUDA", "").strip()
    if force not in ("", "0", "1"):
        raise SystemExit(f"FORCE_CUDA must be 0 or 1 (or unset), got {force!r}")
    if force == "0":
        return False
    if force == "1":
        if CUDA_HOME is None:
            raise SystemExit("FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extension():
    cpp = sorted(str(p.relative_to(HERE)) for p in [*HERE.glob("*.cpp"), *HERE.glob("cpu/*.cpp")])
    cxx = ["-O3", "-std=c++20", "-ffp-contract=off", "-fvisibility=hidden"]
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is an inline `#pragma omp parallel` (ATen/ParallelOpenMP.h): without
        # -fopenmp it silently runs on one thread. The extension then uses the libgomp.so.1 that
        # torch has already loaded (same soname), so there is one OpenMP runtime.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if not _build_cuda():
        return CppExtension(
            "vdmpp.kernels._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=link
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    cu = sorted(str(p.relative_to(HERE)) for p in (HERE / "cuda").glob("*.cu"))
    nvcc = _nvcc_flags()
    return CUDAExtension(
        "vdmpp.kernels._C",
        cpp + cu,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=link,
    )


setup(
    packages=find_namespace_packages(where="src", include=["vdmpp.*"]),
    package_dir={"": "src"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
