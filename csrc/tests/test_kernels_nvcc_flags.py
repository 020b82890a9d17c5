"""csrc/nvcc_flags.py (the flags of the build and of nox's kernels_cuda_compile) turns warnings
into errors: a host function that calls itself forever — what made every CUDA adaptive op of
0.2.0 spin in make_params — fails to compile. Needs nvcc (skipped without)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")
pytestmark = [
    pytest.mark.skipif(NVCC is None, reason="needs nvcc (a CUDA toolkit)"),
    pytest.mark.skipif(not (CSRC / "nvcc_flags.py").is_file(), reason="needs the csrc/ sources"),
]

PLANTED = """
struct Params { float a, b; };
Params make_params(int bins, double decay) {
  const Params p = make_params(bins, decay);  // 0.2.0's bug: the same call, forever
  return p;
}
__global__ void __launch_bounds__(32) k(float* x, Params p) { x[threadIdx.x] = p.a; }
void launch(float* x, cudaStream_t s) { k<<<1, 32, 0, s>>>(x, make_params(4, 0.5)); }
"""
FIXED = PLANTED.replace(
    "const Params p = make_params(bins, decay);", "const Params p{float(decay), float(bins)};"
)


def _flags() -> list[str]:
    spec = importlib.util.spec_from_file_location("vdmpp_nvcc_flags", CSRC / "nvcc_flags.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.nvcc_flags()


def _compile(tmp_path: Path, source: str) -> subprocess.CompletedProcess:
    cu = tmp_path / "planted.cu"
    cu.write_text(source)
    cmd = [NVCC, "-c", str(cu), "-o", str(tmp_path / "planted.o"), *_flags(),
           "-gencode=arch=compute_75,code=sm_75"]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_nvcc_flags_reject_a_planted_self_recursion(tmp_path):
    bad = _compile(tmp_path, PLANTED)
    assert bad.returncode != 0, bad.stdout + bad.stderr
    assert "infinite recursion" in (bad.stdout + bad.stderr)
    good = _compile(tmp_path, FIXED)  # the same file without it compiles: the flags are usable
    assert good.returncode == 0, good.stdout + good.stderr


def test_nvcc_flags_are_what_setup_py_builds_with():
    text = (CSRC / "setup.py").read_text()
    assert "nvcc_flags.py" in text and "_nvcc_flags()" in text
    flags = _flags()
    assert "--Werror" in flags and "all-warnings" in flags and "--fmad=false" in flags
    host = next(f for f in flags if f.startswith("-Xcompiler="))
    assert "-Werror=infinite-recursion" in host
