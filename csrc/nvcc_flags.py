"""nvcc flags of vdmpp-kernels' CUDA code, in one place: ``csrc/setup.py`` (the build) and the
``kernels_cuda_compile`` nox session (the GPU-less compile check) both read them, and
``tests/test_kernels_nvcc_flags.py`` shows that they reject a planted self-recursion.

Warnings are errors. nvcc's own front end does not see infinite recursion (it compiled the
self-calling ``make_params`` of vdmpp-kernels 0.2.0 silently); the host compiler does, so its
``-Wall`` set (``-Winfinite-recursion`` in GCC >= 12, unused results, narrowing, ...) is passed
through ``-Xcompiler`` and made fatal. Kept free of imports beyond the standard library.
"""

from __future__ import annotations

import os

# Host-compiler (gcc/clang, through -Xcompiler) warnings that are errors.
HOST_WERROR = [
    "-Wall",
    "-Werror=infinite-recursion",
    "-Werror=unused-result",
    "-Werror=narrowing",
    "-Werror=return-type",
    "-Werror=uninitialized",
    "-Werror=maybe-uninitialized",
    "-Werror=unused-variable",
    "-Werror=sign-compare",
]

# nvcc: launches without an explicit stream, and every other nvcc / front-end warning
# (cross-execution-space calls, ...) are errors. (-Wmissing-launch-bounds is left out: nvcc 13
# reports it for every template kernel, __launch_bounds__ or not.)
NVCC_WERROR = [
    "-Wdefault-stream-launch",
    "-Wreorder",
    "--Werror",
    "all-warnings",
    "-Xcompiler=" + ",".join(HOST_WERROR),
]

# Code generation: IEEE division/sqrt and no FMA contraction by the compiler (the kernels use
# explicit _rn intrinsics; --fmad=false makes any plain a * b + c in device code round twice too).
NVCC_CODEGEN = ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr", "--fmad=false"]


def nvcc_flags() -> list[str]:
    """Every nvcc flag of the build; ``VDMPP_PTXAS_VERBOSE=1`` adds ptxas' per-kernel register,
    spill and shared-memory report (``-Xptxas=-v``; scripts/gpu_check.sh keeps those lines)."""
    extra = ["-Xptxas=-v"] if os.environ.get("VDMPP_PTXAS_VERBOSE") == "1" else []
    return [*NVCC_CODEGEN, *NVCC_WERROR, *extra]
