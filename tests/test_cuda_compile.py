"""The CUDA sources compile (compile only: no GPU runs them here).

Each csrc/cuda/*.cu must build alone with a plain `nvcc -c`; the torch glue (csrc/cuda/*.cpp)
must compile against torch's headers with nvcc as the driver, which finds the CUDA headers.
Under `make test-cuda-build` (MINGPT_EXPECT_CUDA_BUILD=1) the loaded mingpt._C must be that CUDA build.
"""
import glob
import os
import shutil
import subprocess
import sysconfig

import pytest
import torch
from torch.utils.cpp_extension import CUDA_HOME, include_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
GLUE_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))


def find_nvcc():
    if shutil.which("nvcc"):
        return shutil.which("nvcc")
    candidate = os.path.join(CUDA_HOME or "/usr/local/cuda", "bin", "nvcc")
    return candidate if os.path.isfile(candidate) else None


NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed (CUDA_HOME unset, not on PATH)")


def compile_with_nvcc(args, tmp_path):
    result = subprocess.run([NVCC, *args, "-o", str(tmp_path / "out.o")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"nvcc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "out.o").stat().st_size > 0


def test_there_are_cuda_sources():
    assert CU_SOURCES and GLUE_SOURCES


@needs_nvcc
@pytest.mark.parametrize("source", CU_SOURCES, ids=os.path.basename)
def test_cu_source_compiles_with_plain_nvcc(source, tmp_path):
    compile_with_nvcc(["-c", source], tmp_path)


@needs_nvcc
@pytest.mark.parametrize("source", GLUE_SOURCES, ids=os.path.basename)
def test_torch_glue_compiles(source, tmp_path):
    # A CPU wheel of torch ships the c10/cuda headers but not the one its CMake build generates;
    # an empty stand-in (searched last, so a real one wins) is enough to compile against them.
    shim = tmp_path / "shim" / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("")
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}",
                                                      f"-I{tmp_path / 'shim'}"]
    # C++20: what torch's cpp_extension builds with, and what torch 2.14's headers need.
    compile_with_nvcc(["-std=c++20", "-c", source, *includes, "-DTORCH_EXTENSION_NAME=_C", "-Xcompiler", "-w"],
                      tmp_path)


@pytest.mark.skipif(os.environ.get("MINGPT_EXPECT_CUDA_BUILD") != "1", reason="only under make test-cuda-build")
def test_the_loaded_extension_is_the_cuda_build():
    from mingpt.ops.extension import UNAVAILABLE_REASON, _C
    assert _C is not None, UNAVAILABLE_REASON
    info = _C.build_info()
    assert info["cuda"], info
    assert torch.version.cuda is not None and info["torch_version"] == torch.__version__.split("+")[0]
