"""Build vdmpp-kernels: `pip install --no-build-isolation ./csrc` (uses the installed torch).

CUDA kernels are built when the installed torch is a CUDA build and a CUDA toolkit is found
(``CUDA_HOME``), or when ``FORCE_CUDA=1`` — never because a GPU happens to be visible, so build
machines without a GPU produce the same wheel. ``TORCH_CUDA_ARCH_LIST`` (default "8.0;9.0")
picks the architectures; ``MAX_JOBS`` bounds the ninja build.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from setuptools import find_namespace_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = Path(__file__).parent.resolve()


def _build_cuda() -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extension():
    cpp = sorted(str(p.relative_to(HERE)) for p in HERE.glob("*.cpp"))
    cxx = ["-O3", "-std=c++20", "-ffp-contract=off", "-fvisibility=hidden"]
    if not _build_cuda():
        return CppExtension("vdmpp.kernels._C", cpp, extra_compile_args={"cxx": cxx})
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    cu = sorted(str(p.relative_to(HERE)) for p in (HERE / "cuda").glob("*.cu"))
    nvcc = ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"]
    return CUDAExtension(
        "vdmpp.kernels._C", cpp + cu, extra_compile_args={"cxx": cxx, "nvcc": nvcc}
    )


setup(
    packages=find_namespace_packages(where="src", include=["vdmpp.*"]),
    package_dir={"": "src"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
