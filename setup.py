"""Builds mingpt._C, an optional extension: a CppExtension on any machine, a CUDAExtension where torch
has CUDA (or MINGPT_FORCE_CUDA=1) and the CUDA toolkit is found.

The language standard is the one the installed torch asks for (torch's BuildExtension adds it);
compiler flags that not every compiler takes (-fopenmp, -march=native) are probed first. Where the
extension cannot build, the install still succeeds: one warning gives the reason, which is also
written beside the package (mingpt/_C_unbuilt.txt) so that every command can say it runs on the
reference path. MINGPT_REQUIRE_EXTENSION=1 makes a failed build an error (CI sets it).
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

REQUIRE_EXTENSION = os.environ.get("MINGPT_REQUIRE_EXTENSION") == "1"
FORCE_CUDA = os.environ.get("MINGPT_FORCE_CUDA") == "1"
UNBUILT_NOTE = "_C_unbuilt.txt"
OPENMP_PROBE = "#include <omp.h>\nint probe() { return omp_get_max_threads(); }\n"


def find_cuda_home():
    """(toolkit root or None, how it was found or what to set): CUDA_HOME, CUDA_PATH, then the folder the
    nvcc on the PATH really runs from (through links and wrapper scripts: /usr/local/bin/nvcc may be
    either, for /usr/local/cuda-13.0/bin/nvcc), then /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var], var
    nvcc = shutil.which("nvcc")
    root = nvcc_root(nvcc) if nvcc else None
    if root:
        return root, f"nvcc at {nvcc}"
    if os.path.isfile("/usr/local/cuda/include/cuda_runtime.h"):
        return "/usr/local/cuda", "/usr/local/cuda"
    return None, ("no CUDA toolkit found: set CUDA_HOME (or CUDA_PATH) to the toolkit's root, the folder "
                  "holding bin/nvcc and include/cuda_runtime.h")


def nvcc_root(nvcc: str):
    """The toolkit root nvcc runs from, as `nvcc -dryrun` reports it (_HERE_ is its real bin folder)."""
    try:
        result = subprocess.run([nvcc, "-dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True,
                                timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    here = re.search(r"^#\$ _HERE_=(.+)$", result.stdout + result.stderr, re.MULTILINE)
    root = os.path.dirname(here.group(1).strip()) if here else os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return root if os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")) else None


# torch.utils.cpp_extension reads CUDA_HOME once, when it is imported; without a CUDA_HOME it would take
# the folder above the first nvcc on the PATH (/usr/local for /usr/local/bin/nvcc), which has no headers.
CUDA_ROOT, CUDA_FOUND_BY = find_cuda_home()
if CUDA_ROOT:
    os.environ["CUDA_HOME"] = CUDA_ROOT

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def want_cuda() -> bool:
    return (torch.cuda.is_available() or FORCE_CUDA) and torch.version.cuda is not None


def extension():
    """csrc/: extension.cpp, ops/ (the CPU training kernels), sampler/ (the compiled sampler), probes/ (the
    bench's memory-bandwidth probe), cuda/ (the decode kernels, CUDA builds only); simd.h and openmp.h at
    the top serve them all."""
    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/ops/*.cpp") + glob.glob("csrc/sampler/*.cpp")
                         + glob.glob("csrc/probes/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    include_dirs = [os.path.abspath("csrc")]
    if want_cuda() and CUDA_ROOT:
        return CUDAExtension("mingpt._C", cpp_sources + cuda_sources, include_dirs=include_dirs,
                             define_macros=[("MINGPT_WITH_CUDA", None)],
                             extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]})
    return CppExtension("mingpt._C", cpp_sources, include_dirs=include_dirs, extra_compile_args={"cxx": ["-O3"]})


def compiler_accepts(compiler: list, flags: list, source: str = "int probe() { return 0; }\n") -> bool:
    """Whether the C++ compiler compiles and links a small shared object with these flags."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "probe.cpp")
        with open(path, "w") as f:
            f.write(source)
        result = subprocess.run([*compiler, "-shared", "-fPIC", *flags, path, "-o", os.path.join(tmp, "probe.so")],
                                capture_output=True)
        return result.returncode == 0


def short_reason(error: Exception) -> str:
    """The compiler's first error line where the build ran a compiler, else the error's first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return next((line for line in lines if "error:" in line.lower()), lines[0])


class OptionalBuildExtension(BuildExtension):
    """torch's BuildExtension with probed flags; a failed build leaves the package without mingpt._C."""

    def run(self):
        # An editable or --inplace build copies into the source tree afterwards; run() clears inplace meanwhile.
        self.into_source = self.inplace
        super().run()

    def build_extensions(self):
        compiler = list(self.compiler.compiler_so)
        ext = self.extensions[0]
        try:
            self.check_toolchain(compiler)
            self.add_probed_flags(ext, compiler)
            super().build_extensions()
        except Exception as e:
            self.fail(ext, short_reason(e))
        else:
            if os.path.exists(self.in_package(UNBUILT_NOTE)):
                os.unlink(self.in_package(UNBUILT_NOTE))

    def in_package(self, name: str) -> str:
        """Where a file beside the installed package goes: the source tree for an editable or in-place
        build, else the build folder the wheel is made from."""
        if self.into_source:
            return os.path.join(os.path.abspath(self.get_finalized_command("build_py").get_package_dir("mingpt")),
                                name)
        return os.path.join(os.path.dirname(self.get_ext_fullpath("mingpt._C")), name)

    @staticmethod
    def check_toolchain(compiler):
        if not compiler_accepts(compiler, []):
            raise RuntimeError(f"the C++ compiler ({' '.join(compiler[:1])}) cannot build a trivial shared object")
        if want_cuda() and not CUDA_ROOT:
            raise RuntimeError(f"the CUDA extension was asked for, but {CUDA_FOUND_BY}")

    @staticmethod
    def add_probed_flags(ext, compiler):
        args = ext.extra_compile_args
        cxx = args["cxx"] if isinstance(args, dict) else args
        if compiler_accepts(compiler, ["-fopenmp"], OPENMP_PROBE):
            cxx.append("-fopenmp")
            ext.extra_link_args.append("-fopenmp")
        else:
            print(f"WARNING: {compiler[0]} cannot build OpenMP code (no -fopenmp, or no omp.h and libomp): "
                  "mingpt._C is built without OpenMP, and its compiled sampler runs on one thread", file=sys.stderr)
        # Tune for the machine that builds (AVX-512 and bf16 dot products where present).
        if os.environ.get("MINGPT_NATIVE", "1") == "1" and compiler_accepts(compiler, ["-march=native"]):
            cxx.append("-march=native")

    def fail(self, ext, reason: str):
        if REQUIRE_EXTENSION:
            raise RuntimeError(f"mingpt._C failed to build and MINGPT_REQUIRE_EXTENSION=1: {reason}")
        self.extensions.remove(ext)  # nothing to copy into the package or list among its files
        stale = self.in_package(os.path.basename(self.get_ext_fullpath(ext.name)))
        if os.path.exists(stale):
            os.unlink(stale)  # an earlier build's module would otherwise load in its place
        os.makedirs(os.path.dirname(self.in_package(UNBUILT_NOTE)), exist_ok=True)
        with open(self.in_package(UNBUILT_NOTE), "w") as f:
            f.write(reason)
        print(f"WARNING: mingpt._C was not built ({reason}); mingpt installs without it and every op runs on "
              "the reference path. Set MINGPT_REQUIRE_EXTENSION=1 to make this an error.", file=sys.stderr)

setup(
    # Every package under mingpt/ (a new one cannot be left out of a wheel), and the Triton kernels, which live
    # at the top level as the design card has them, installed as mingpt.kernels.
    packages=find_packages(include=["mingpt", "mingpt.*"]) + ["mingpt.kernels"],
    package_dir={"mingpt.kernels": "kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": OptionalBuildExtension.with_options(use_ninja=True)},
)
