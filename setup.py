"""Builds mingpt._C: a CppExtension (OpenMP) on any machine, a CUDAExtension where torch has CUDA and nvcc exists."""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def extension():
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    cxx_flags = ["-O3", "-fopenmp", "-std=c++17"]
    if os.environ.get("MINGPT_NATIVE", "1") == "1":
        # Tune for the machine that builds (AVX-512 and bf16 dot products where present).
        cxx_flags.append("-march=native")
    with_cuda = torch.cuda.is_available() or os.environ.get("MINGPT_FORCE_CUDA") == "1"
    if with_cuda and CUDA_HOME is not None and torch.version.cuda is not None and cuda_sources:
        return CUDAExtension(
            "mingpt._C", cpp_sources + cuda_sources,
            define_macros=[("MINGPT_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
            extra_link_args=["-fopenmp"])
    return CppExtension("mingpt._C", cpp_sources, extra_compile_args={"cxx": cxx_flags},
                        extra_link_args=["-fopenmp"])


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
